"""The specification of sink attention, written for clarity, not speed (DESIGN §2).

Every backend (the registered ``sink_*`` functions, the cache, the Triton kernels) is tested against this one
function, itself checked against plain causal attention when nothing is evicted. Inputs are *un-rotated* per-token
queries/keys of a whole stream; for each query it builds the visible set by the visibility rule, gives it positions
``0..len-1``, applies RoPE at those positions and attends. Run it in fp64 for tests.
"""

from __future__ import annotations

import torch

from ..rope import RotaryParams, apply_rotary


def visible_indices(i: int, num_sink_tokens: int, window_length: int) -> list[int]:
    """Keys visible to query ``i``: ``j <= i`` and (``j < S`` or ``i - j < W``), in stream order."""
    return [j for j in range(i + 1) if j < num_sink_tokens or i - j < window_length]


def reference_sink_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_sink_tokens: int,
    window_length: int,
    rotary: RotaryParams | None = None,
    scaling: float | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sink+window attention over a whole stream with cache-relative positions.

    Args:
        query: ``[B, H, T, D]`` un-rotated queries of tokens ``0..T-1``.
        key, value: ``[B, H_kv, T, D]`` un-rotated keys / values (GQA: ``H`` a multiple of ``H_kv``).
        num_sink_tokens, window_length: ``S`` and ``W``.
        rotary: rotary parameters; ``None`` means no RoPE (positions do not matter then).
        scaling: softmax scale, default ``D ** -0.5``.
        sink_logits: optional ``[H]`` learned per-head sink logits (gpt-oss style, unrelated to sink *tokens*): one
            extra logit column in every softmax, dropped afterwards (mass without a value).

    Returns:
        ``[B, H, T, D]`` attention outputs.
    """
    batch, heads, length, head_dim = query.shape
    groups = heads // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = head_dim**-0.5 if scaling is None else scaling
    out = torch.empty(batch, heads, length, value.shape[-1], dtype=query.dtype, device=query.device)
    for i in range(length):
        idx = torch.tensor(visible_indices(i, num_sink_tokens, window_length), device=query.device)
        k, v, qi = key[:, :, idx], value[:, :, idx], query[:, :, i : i + 1]
        if rotary is not None:
            positions = torch.arange(len(idx), device=query.device)
            k = apply_rotary(k, positions, rotary)
            qi = apply_rotary(qi, positions[-1:], rotary)
        scores = (qi @ k.transpose(-1, -2)) * scaling
        if sink_logits is not None:
            column = sink_logits.to(scores.dtype)[None, :, None, None].expand(batch, heads, 1, 1)
            weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
        else:
            weights = torch.softmax(scores, dim=-1)
        out[:, :, i : i + 1] = weights @ v
    return out
