"""The position hook: lets a :class:`~hf_sinks.cache.SinkCache` own the ``position_ids`` of a forward.

``generate`` passes absolute positions that grow without bound; at position 10^6 an fp32 RoPE angle is off by
~0.03 rad. The hook (a forward pre-hook on the base model, installed per instance by :func:`hf_sinks.apply`) asks
the cache for bounded positions that keep every relative distance (see ``SinkCache.begin_forward``) and tells it
the padding of the new tokens before any layer runs, so even stock attentions get left padding right.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .cache import SinkCache
from .models import get_spec
from .rope import RotaryParams


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    spec = get_spec(getattr(model.config, "model_type", None))
    base = getattr(model, spec.base_model_attr, None)
    if base is None:
        raise ValueError(f"{type(model).__name__} has no `.{spec.base_model_attr}` base model to hook.")
    return base


def install_position_hook(model: torch.nn.Module) -> RemovableHandle:
    """Install the position hook on ``model``'s base model; returns the handle (``.remove()`` undoes it)."""
    rotary = RotaryParams.from_model(model)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, SinkCache):
            return None
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = args[0] if args and args[0] is not None else kwargs["inputs_embeds"]
        if cache.rotary is None:
            cache.rotary = rotary
        kwargs["position_ids"] = cache.begin_forward(
            tokens.shape[0], tokens.shape[1], kwargs.get("attention_mask"), tokens.device
        )
        return args, kwargs

    return base_model_of(model).register_forward_pre_hook(hook, with_kwargs=True)
