"""The registered ``h2o_sdpa`` attention: H2O attention with an :class:`~hf_sinks.h2o.H2OCache`, stock SDPA without one."""

from __future__ import annotations

from typing import Any

import torch

from ..cache_layers import layer_of
from .cache import H2O_ATTENTION, H2OCacheLayer


def h2o_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="h2o_sdpa"``: H2O attention with an :class:`H2OCache`, stock SDPA without one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..attention.masks import new_token_validity, stock_mask

    layer = layer_of(key, H2OCacheLayer)
    if layer is None:
        dense = stock_mask(attention_mask)
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    if new_token_validity(attention_mask, query.shape[2]) is not None:
        raise ValueError("H2OCache does not support padded batches (the attention mask has padding).")
    if dropout > 0:
        raise ValueError(f"dropout={dropout} is not supported with an H2OCache (inference only).")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer.cache.positions == "cache" and layer.cache.rotary is None:
        from ..rope import RotaryParams

        layer.cache.rotary = RotaryParams.from_config(module.config)
    out = layer.attend(query, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``h2o_sdpa`` with transformers (``AttentionInterface`` + ``AttentionMaskInterface``). Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from ..attention.masks import sink_sdpa_mask

    AttentionInterface.register(H2O_ATTENTION, h2o_sdpa_attention_forward)
    # the lazy mask: the attention reads only the padding; the dense mask is built only for the stock fallback
    AttentionMaskInterface.register(H2O_ATTENTION, sink_sdpa_mask)


__all__ = ["h2o_sdpa_attention_forward", "register"]
