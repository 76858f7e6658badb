"""``hf_sinks.apply``: switch a loaded model to streaming, reversibly and per instance."""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from typing import Any

import torch

from .cache import SinkCache
from .compat import CACHE_KWARG, CACHE_KWARGS, cache_from_kwargs, cache_kwargs, deprecated_cache_kwarg
from .config import CONFIG_ATTRIBUTE, SinkConfig
from .layers import layer_rules
from .models import ModelSpec, check_model
from .positions import install_position_hook
from .rope import RotaryParams, layer_rotaries

_APPLIED = "_hf_sinks_handle"
logger = logging.getLogger(__name__)


class SinkHandle:
    """What :func:`apply` changed on one model; :meth:`remove` restores it exactly. Also a context manager."""

    def __init__(
        self,
        model: torch.nn.Module,
        sink_config: SinkConfig,
        attn_implementation: str,
        spec: ModelSpec,
        rotaries: list[RotaryParams | None],
        previous_flag: Any = None,
    ):
        self.model = model
        self.sink_config = sink_config
        self.rotaries = rotaries  # per layer (None: a layer without RoPE)
        self.rotary = next((r for r in rotaries if r is not None), None)
        self._previous_impl = model.config._attn_implementation
        self._previous_flag = previous_flag
        self._unpatch = None
        if spec.route == "patch":  # the model bypasses AttentionInterface: patch its attention instances
            self._unpatch = importlib.import_module(f"hf_sinks.patches.{spec.model_type}").patch_model(model)
            model.config._attn_implementation = attn_implementation
        else:
            model.set_attn_implementation(attn_implementation)
        setattr(model.config, CONFIG_ATTRIBUTE, sink_config.to_dict())
        self._hook = install_position_hook(model, rotaries, self.new_cache)
        self.num_attention_modules = self._count_attention_modules(spec.route)
        self._wrap_generate()
        logger.info(
            "hf_sinks: %d attention modules of %s stream with %s (num_sink_tokens=%d, window_length=%d)",
            self.num_attention_modules,
            spec.model_type,
            attn_implementation,
            sink_config.num_sink_tokens,
            sink_config.window_length,
        )

    def _count_attention_modules(self, route: str) -> int:
        if route == "patch":
            return self._unpatch.count
        count = sum(
            1 for m in self.model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
        )
        if count == 0:
            raise ValueError(
                f"hf_sinks.apply found no attention module in {type(self.model).__name__}; nothing would stream."
            )
        return count

    def new_cache(self) -> SinkCache:
        """A fresh :class:`SinkCache` for this model (its sizes and per-layer rules)."""
        cache = SinkCache.from_config(self.sink_config)
        config = self.model.config.get_text_config(decoder=True)
        cache.bind_rules(layer_rules(config, cache.num_sink_tokens, cache.window_length, self.rotaries))
        return cache

    def _wrap_generate(self) -> None:
        """``model.generate`` without a cache streams with a SinkCache of its own (instance attribute)."""
        original = self.model.generate
        handle = self

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any):
            _rename_deprecated_cache_kwarg(kwargs, f"{type(handle.model).__name__}.generate")
            generation_config = kwargs.get("generation_config") or handle.model.generation_config
            wants_cache = kwargs.get("use_cache", generation_config.use_cache) is not False
            chosen = kwargs.get("cache_implementation", generation_config.cache_implementation)
            # a custom_generate repo or folder brings its own cache (hf_sinks' own: hf_sinks.custom_generate)
            delegated = isinstance(kwargs.get("custom_generate"), str)
            if cache_from_kwargs(kwargs) is None and wants_cache and chosen is None and not delegated:
                for name in CACHE_KWARGS:  # an explicit `cache=None` must not collide with the new cache
                    kwargs.pop(name, None)
                kwargs.update(cache_kwargs(handle.new_cache()))
            return original(*args, **kwargs)

        self.model.generate = generate

    def remove(self) -> None:
        if getattr(self.model, _APPLIED, None) is not self:
            return
        self._hook.remove()
        del self.model.generate
        if self._unpatch is not None:
            self._unpatch()
            self.model.config._attn_implementation = self._previous_impl
        else:
            self.model.set_attn_implementation(self._previous_impl)
        if self._previous_flag is None:
            if hasattr(self.model.config, CONFIG_ATTRIBUTE):
                delattr(self.model.config, CONFIG_ATTRIBUTE)
        else:
            setattr(self.model.config, CONFIG_ATTRIBUTE, self._previous_flag)
        delattr(self.model, _APPLIED)

    def __enter__(self) -> "SinkHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply(
    model: torch.nn.Module,
    num_sink_tokens: int | None = None,
    window_length: int | None = None,
    attn_implementation: str | None = None,
) -> SinkHandle:
    """Make ``model`` stream with attention sinks.

    Per instance and reversibly: sets ``attn_implementation`` (a ``sink_*`` name; default ``"sink_sdpa"``, or
    ``"sink_eager"`` for a model whose class refuses SDPA (``_supports_sdpa = False``: Gemma 2, gpt-oss), since
    transformers checks SDPA support for every name containing "sdpa"; a Falcon whose attention bypasses
    transformers' AttentionInterface (before 5.25) gets its attention instances patched), records the setup in
    ``model.config.attention_sinks`` (saved by ``save_pretrained``), installs the position hook (bounded positions,
    padding known to the cache) and makes ``model.generate`` create a :class:`SinkCache` when given none.
    Sizes come from the arguments, else ``model.config.attention_sinks``, else the defaults (4 + 1020). Applying
    again replaces the previous setup.

    Returns:
        a :class:`SinkHandle`; ``.remove()`` (or leaving its ``with`` block) restores the model exactly.

    Raises:
        ValueError: unsupported model type (the message lists the supported ones), an ALiBi Falcon, a non-sink
            ``attn_implementation``, or a model in which no attention module was found.
    """
    # Everything is validated before the previous setup (if any) is touched: a bad call leaves the model streaming.
    spec = check_model(model)
    from .attention.registry import ATTENTION_IMPLEMENTATIONS

    if attn_implementation is None:
        attn_implementation = default_attention(model)
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not a sink attention; "
            f"use one of {sorted(ATTENTION_IMPLEMENTATIONS)}."
        )
    if spec.patch_module:  # re-checked here: check_model caches its verdict per config object
        importlib.import_module(f"hf_sinks.patches.{spec.model_type}").check_supported(model.config)
    previous = getattr(model, _APPLIED, None)
    # what remove() must restore: the flag as it was before the first apply
    original_flag = previous._previous_flag if previous is not None else getattr(model.config, CONFIG_ATTRIBUTE, None)
    sink_config = SinkConfig.for_model(model.config, num_sink_tokens, window_length)
    rotaries = layer_rotaries(model.config, model=model)
    if previous is not None:
        previous.remove()
    handle = SinkHandle(model, sink_config, attn_implementation, spec, rotaries, previous_flag=original_flag)
    setattr(model, _APPLIED, handle)
    return handle


def _rename_deprecated_cache_kwarg(kwargs: dict[str, Any], function: str) -> None:
    """Pass a cache given under a deprecated keyword (``past_key_values`` where ``cache`` is the name) on under the
    current one, warning at the caller's line.

    Passed on as given, transformers' own ``FutureWarning`` (``stacklevel=2``) would blame the wrapper calling it,
    i.e. hf_sinks, instead of the user's call; so the wrapper renames it and raises the warning one frame up
    (``stacklevel=3``: past this function and the wrapper). Both keywords given: the current one wins, as in
    transformers.
    """
    old = deprecated_cache_kwarg(kwargs)
    if old is None:
        return
    value = kwargs.pop(old)
    both = CACHE_KWARG in kwargs
    kwargs.setdefault(CACHE_KWARG, value)
    ignored = f"; both were given, so `{old}` is ignored" if both else ""
    warnings.warn(
        f"`{old}` is deprecated for `{function}` by this transformers release; use `{CACHE_KWARG}` instead "
        f"(hf_sinks.compat.cache_kwargs(cache) picks the right keyword){ignored}.",
        FutureWarning,
        stacklevel=3,
    )


def default_attention(model: Any) -> str:
    """``"sink_sdpa"``, or ``"sink_eager"`` for a model class that refuses SDPA (``_supports_sdpa = False``).

    transformers runs its SDPA support check on every attention name containing "sdpa", so such models (Gemma 2,
    gpt-oss) refuse ``sink_sdpa`` before hf_sinks sees a tensor; ``sink_eager`` is exact for them.
    """
    return "sink_sdpa" if getattr(type(model), "_supports_sdpa", True) else "sink_eager"
