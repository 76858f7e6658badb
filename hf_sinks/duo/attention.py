"""The registered ``duo_sdpa`` (inference, with a :class:`DuoCache`) and ``duo_gate`` (head identification) attentions."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from ..cache_layers import layer_of
from .cache import DUO_ATTENTION, DuoCacheLayer, visibility_mask

#: ``attn_implementation`` name of the gated training attention (``alpha * full + (1 - alpha) * streaming``).
DUO_GATE_ATTENTION = "duo_gate"

def duo_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="duo_sdpa"``: DuoAttention with a :class:`DuoCache`, stock SDPA without one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..attention.masks import new_token_validity, stock_mask

    layer = layer_of(key, DuoCacheLayer)
    if layer is None:
        dense = stock_mask(attention_mask)
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    if new_token_validity(attention_mask, query.shape[2]) is not None:
        layer.pending = None
        raise ValueError("DuoCache does not support padded batches (the attention mask has padding).")
    if dropout > 0:
        raise ValueError(f"dropout={dropout} is not supported with a DuoCache (inference only).")
    if getattr(module, "config", None) is not None:
        try:
            layer.cache.validate_model_config(module.config)
        except ValueError:
            layer.pending = None
            layer.seen -= key.shape[-2]  # nothing was stored: the cache stays usable with a fitting pattern
            raise
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(query, scaling)
    return out.transpose(1, 2).contiguous(), None


#: (alpha [L, KVH], S, W) of the running gated forward (set by :func:`gated_attention`).
_GATES: list[tuple[torch.Tensor, int, int]] = []


@contextmanager
def gated_attention(model: torch.nn.Module, alpha: torch.Tensor, num_sink_tokens: int, window_length: int):
    """Run ``model`` with the ``duo_gate`` attention mixing ``alpha * full + (1 - alpha) * streaming`` per KV head."""
    from ..attention.switch import use_attention

    register()
    _GATES.append((alpha, num_sink_tokens, window_length))
    try:
        with use_attention(model, DUO_GATE_ATTENTION):
            yield
    finally:
        _GATES.pop()


def duo_gate_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="duo_gate"`` (training, no cache): ``alpha * full + (1 - alpha) * streaming`` per head.

    ``alpha[layer, kv_head]`` comes from :func:`gated_attention`; outside it this is stock SDPA. Full attention is
    causal; streaming attention applies the sink + window rule; both at the model's absolute positions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..attention.masks import new_token_validity, stock_mask

    dense = stock_mask(attention_mask)
    if not _GATES:
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    if new_token_validity(attention_mask, query.shape[2]) is not None:
        raise ValueError("duo_gate does not support padded batches.")
    alpha, s, w = _GATES[-1]
    q, n = query.shape[2], key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    qi = torch.arange(n - q, n, device=query.device)
    kj = torch.arange(n, device=query.device)
    gqa = query.shape[1] != key.shape[1]
    if q == n:  # the usual training forward: the fused causal kernel (flash on GPU) needs no mask
        full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        causal = kj[None] <= qi[:, None]
        full = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling, enable_gqa=gqa)
    rule = visibility_mask(qi, kj, s, w)
    stream = F.scaled_dot_product_attention(query, key, value, attn_mask=rule, scale=scaling, enable_gqa=gqa)
    gate = alpha[module.layer_idx].to(query.dtype).repeat_interleave(query.shape[1] // key.shape[1])[None, :, None, None]
    out = gate * full + (1 - gate) * stream
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``duo_sdpa`` and ``duo_gate`` with transformers (both registries). Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from ..attention.masks import sink_sdpa_mask

    AttentionInterface.register(DUO_ATTENTION, duo_sdpa_attention_forward)
    AttentionInterface.register(DUO_GATE_ATTENTION, duo_gate_attention_forward)
    # the lazy mask: the functions read only the padding; the dense mask is built only for the stock fallback
    AttentionMaskInterface.register(DUO_ATTENTION, sink_sdpa_mask)
    AttentionMaskInterface.register(DUO_GATE_ATTENTION, sink_sdpa_mask)
