"""The registered ``h2o_sdpa``: H2O attention with an :class:`~hf_sinks.h2o.H2OCache`, stock SDPA without one."""

from __future__ import annotations

import torch

from ..attention.preamble import cache_attention
from .cache import H2O_ATTENTION, H2OCacheLayer


@cache_attention(H2OCacheLayer, "H2OCache")
def h2o_sdpa_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, layer: H2OCacheLayer, scaling: float
) -> torch.Tensor:
    """``attn_implementation="h2o_sdpa"``: H2O attention with an :class:`H2OCache`, stock SDPA without one.

    The cache refuses padded batches and dropout (:func:`~hf_sinks.attention.preamble.cache_attention`)."""
    if layer.cache.positions == "cache" and layer.cache.rotary is None:
        from ..rope import RotaryParams

        layer.cache.rotary = RotaryParams.from_config(module.config)
    return layer.attend(query, scaling)


def register() -> None:
    """Register ``h2o_sdpa`` with transformers (``AttentionInterface`` + ``AttentionMaskInterface``). Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from ..attention.masks import sink_sdpa_mask

    AttentionInterface.register(H2O_ATTENTION, h2o_sdpa_attention_forward)
    # the lazy mask: the attention reads only the padding; the dense mask is built only for the stock fallback
    AttentionMaskInterface.register(H2O_ATTENTION, sink_sdpa_mask)


__all__ = ["h2o_sdpa_attention_forward", "register"]
