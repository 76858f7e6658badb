"""``hf_sinks.apply``: switch a loaded model to streaming, reversibly and per instance."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .config import CONFIG_ATTRIBUTE, SinkConfig
from .models import get_spec
from .positions import install_position_hook

_APPLIED = "_hf_sinks_handle"


class SinkHandle:
    """What :func:`apply` changed on one model; :meth:`remove` restores it exactly. Also a context manager."""

    def __init__(self, model: torch.nn.Module, sink_config: SinkConfig, attn_implementation: str):
        self.model = model
        self.sink_config = sink_config
        self._previous_impl = model.config._attn_implementation
        self._previous_flag = getattr(model.config, CONFIG_ATTRIBUTE, None)
        self._unpatch = None
        spec = get_spec(getattr(model.config, "model_type", None))
        if spec.route == "patch":  # the model bypasses AttentionInterface: patch its attention instances
            self._unpatch = importlib.import_module(f"hf_sinks.patches.{spec.model_type}").patch_model(model)
            model.config._attn_implementation = attn_implementation
        else:
            model.set_attn_implementation(attn_implementation)
        setattr(model.config, CONFIG_ATTRIBUTE, sink_config.to_dict())
        self._hook = install_position_hook(model)

    def remove(self) -> None:
        if getattr(self.model, _APPLIED, None) is not self:
            return
        self._hook.remove()
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
    attn_implementation: str = "sink_sdpa",
) -> SinkHandle:
    """Make ``model`` stream with attention sinks.

    Sets ``attn_implementation`` (a ``sink_*`` name), records the setup in ``model.config.attention_sinks`` and
    installs the position hook (bounded positions, padding known to the cache). Sizes come from the arguments, else
    ``model.config.attention_sinks``, else the defaults (4 + 1020). Applying again replaces the previous setup.
    Use with ``model.generate(..., past_key_values=hf_sinks.SinkCache.from_model(model))``.
    """
    get_spec(getattr(model.config, "model_type", None))
    from .attention.registry import ATTENTION_IMPLEMENTATIONS

    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not a sink attention; use one of {sorted(ATTENTION_IMPLEMENTATIONS)}."
        )
    overrides = {k: v for k, v in (("num_sink_tokens", num_sink_tokens), ("window_length", window_length)) if v is not None}
    previous = getattr(model, _APPLIED, None)
    if previous is not None:
        previous.remove()
    sink_config = SinkConfig.from_model_config(model.config, **overrides) or SinkConfig()
    handle = SinkHandle(model, sink_config, attn_implementation)
    setattr(model, _APPLIED, handle)
    return handle
