"""The registered attentions ``duo_sdpa`` (inference, with a :class:`DuoCache`) and ``duo_gate`` (identification)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from ..attention.preamble import cache_attention, default_scaling, refuse_padding, stock_sdpa, to_model_layout
from .cache import DUO_ATTENTION, DuoCacheLayer, visibility_mask

#: ``attn_implementation`` name of the gated training attention (``alpha * full + (1 - alpha) * streaming``).
DUO_GATE_ATTENTION = "duo_gate"


def _forget_pending(layer: DuoCacheLayer) -> None:
    layer.pending = None


@cache_attention(DuoCacheLayer, "DuoCache", on_padding=_forget_pending)
def duo_sdpa_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, layer: DuoCacheLayer, scaling: float
) -> torch.Tensor:
    """``attn_implementation="duo_sdpa"``: DuoAttention with a :class:`DuoCache`, stock SDPA without one.

    The cache refuses padded batches and dropout (:func:`~hf_sinks.attention.preamble.cache_attention`)."""
    if getattr(module, "config", None) is not None:
        try:
            layer.cache.validate_model_config(module.config)
        except ValueError:
            layer.pending = None
            layer.seen -= key.shape[-2]  # nothing was stored: the cache stays usable with a fitting pattern
            raise
    return layer.attend(query, scaling)


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
    if not _GATES:
        return stock_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    refuse_padding(attention_mask, query, "duo_gate")
    alpha, s, w = _GATES[-1]
    q, n = query.shape[2], key.shape[2]
    scaling = default_scaling(query, scaling)
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
    gate = (
        alpha[module.layer_idx].to(query.dtype).repeat_interleave(query.shape[1] // key.shape[1])[None, :, None, None]
    )
    out = gate * full + (1 - gate) * stream
    return to_model_layout(out), None


def register() -> None:
    """Register ``duo_sdpa`` and ``duo_gate`` with transformers (both registries). Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from ..attention.masks import sink_sdpa_mask

    AttentionInterface.register(DUO_ATTENTION, duo_sdpa_attention_forward)
    AttentionInterface.register(DUO_GATE_ATTENTION, duo_gate_attention_forward)
    # the lazy mask: the functions read only the padding; the dense mask is built only for the stock fallback
    AttentionMaskInterface.register(DUO_ATTENTION, sink_sdpa_mask)
    AttentionMaskInterface.register(DUO_GATE_ATTENTION, sink_sdpa_mask)
