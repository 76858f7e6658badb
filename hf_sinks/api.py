"""``hf_sinks.apply``: switch a loaded model to streaming, reversibly and per instance."""

from __future__ import annotations

from typing import Any

import torch

from .config import CONFIG_ATTRIBUTE, SinkConfig
from .models import get_spec
from .positions import install_position_hook

_APPLIED = "_hf_sinks_handle"


class SinkHandle:
    """What :func:`apply` changed on one model; :meth:`remove` restores it exactly. Also a context manager."""

    def __init__(self, model: torch.nn.Module, sink_config: SinkConfig, previous_impl: str, previous_flag: Any):
        self.model = model
        self.sink_config = sink_config
        self._previous_impl = previous_impl
        self._previous_flag = previous_flag
        self._hook = install_position_hook(model)

    def remove(self) -> None:
        if getattr(self.model, _APPLIED, None) is not self:
            return
        self._hook.remove()
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
    previous_flag = getattr(model.config, "attention_sinks", None)
    previous_impl = model.config._attn_implementation
    model.set_attn_implementation(attn_implementation)
    model.config.attention_sinks = sink_config.to_dict()
    handle = SinkHandle(model, sink_config, previous_impl, previous_flag)
    setattr(model, _APPLIED, handle)
    return handle
