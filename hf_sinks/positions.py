"""The position hook: lets a :class:`~hf_sinks.cache.SinkCache` own the ``position_ids`` of a forward.

``generate`` passes absolute positions that grow without bound; at position 10^6 an fp32 RoPE angle is off by
~0.03 rad. The hook (a forward pre-hook on the base model, installed per instance by :func:`hf_sinks.apply`) asks
the cache for bounded positions that keep every relative distance (see ``SinkCache.begin_forward``) and tells it
the padding of the new tokens before any layer runs, so even stock attentions get left padding right.

A streaming model given no cache (``model(ids, use_cache=True)`` with no cache, as attention_sinks' own loops do)
gets a fresh :class:`SinkCache` here, so a hand-written loop streams in bounded memory like ``generate`` does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.hooks import RemovableHandle

from .cache import SinkCache
from .compat import cache_from_kwargs, cache_kwarg_in
from .layers import layer_rules
from .rope import RotaryParams


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The base model (the module that takes ``position_ids`` and the cache), from transformers' own
    ``base_model_prefix`` (``model.base_model``)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        prefix = getattr(model, "base_model_prefix", "")
        raise ValueError(f"{type(model).__name__} has no base model to hook (base_model_prefix={prefix!r}).")
    return base


def install_position_hook(
    model: torch.nn.Module, rotaries: list[RotaryParams | None], new_cache: Callable[[], SinkCache]
) -> RemovableHandle:
    """Install the position hook on ``model``'s base model; returns the handle (``.remove()`` undoes it).

    Args:
        model: the causal LM.
        rotaries: each layer's own rotary parameters (:func:`hf_sinks.rope.layer_rotaries`); a cache built with
            other ones is refused.
        new_cache: builds the SinkCache of a forward that asks for a cache but brings none.
    """
    base = base_model_of(model)
    config = model.config.get_text_config(decoder=True)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        cache = cache_from_kwargs(kwargs)
        if cache is None and _wants_new_cache(module, kwargs):
            cache = new_cache()
            kwargs[cache_kwarg_in(kwargs)] = cache
        if not isinstance(cache, SinkCache):
            return None
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = args[0] if args and args[0] is not None else kwargs["inputs_embeds"]
        if not cache._rotary_bound:  # once per cache: each layer's rule for the cache's own sizes
            cache.bind_rules(layer_rules(config, cache.num_sink_tokens, cache.window_length, rotaries))
        kwargs["position_ids"] = cache.begin_forward(
            tokens.shape[0], tokens.shape[1], kwargs.get("attention_mask"), tokens.device
        )
        return args, kwargs

    return base.register_forward_pre_hook(hook, with_kwargs=True)


def _wants_new_cache(module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """A forward that will build a cache of its own (``use_cache``, inference): make it a SinkCache instead."""
    if module.training:  # training forwards keep full attention (and transformers' own caching rules)
        return False
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False)
    return bool(use_cache)
