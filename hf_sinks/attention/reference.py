"""The specification of sink attention, written for clarity, not speed (docs/design.md §2.1, §2.2).

Every backend (the registered ``sink_*`` functions, the cache, the Triton kernels) is tested against this one
function, itself checked against plain causal attention when nothing is evicted. Inputs are *un-rotated* per-token
queries/keys of a whole stream; for each query it builds the visible set by the visibility rule
(:func:`hf_sinks.visibility.sink_visible`), gives it positions ``0..len-1``, applies RoPE at those positions and
attends. Run it in fp64 for tests.
"""

from __future__ import annotations

import torch

from ..rope import RotaryParams, apply_rotary
from ..visibility import visible_keys


def visible_indices(i: int, num_sink_tokens: int, window_length: int) -> list[int]:
    """Keys visible to query ``i`` in stream order, as a list (:func:`hf_sinks.visibility.visible_keys`)."""
    return visible_keys(i, num_sink_tokens, window_length).tolist()


def _per_query_head(query, key, value, scaling):
    """Keys and values repeated for every query head (GQA), the scale (default ``D ** -0.5``), the output buffer."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return key, value, scaling, query.new_empty(*query.shape[:3], value.shape[-1])


def reference_sink_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_sink_tokens: int,
    window_length: int,
    rotary: RotaryParams | None = None,
    scaling: float | None = None,
    sink_logits: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sink+window attention over a whole stream with cache-relative positions.

    One layer's rule (docs/design.md §2.3) is ``num_sink_tokens``/``window_length``/``rotary`` as
    :mod:`hf_sinks.layers` gives them: a sliding layer whose window fits the cache is ``(0, sw)``.

    Args:
        query: ``[B, H, T, D]`` un-rotated queries of tokens ``0..T-1``.
        key, value: ``[B, H_kv, T, D]`` un-rotated keys / values (GQA: ``H`` a multiple of ``H_kv``).
        num_sink_tokens, window_length: ``S`` and ``W``.
        rotary: rotary parameters; ``None`` means no RoPE (positions do not matter then).
        scaling: softmax scale, default ``D ** -0.5``.
        sink_logits: optional ``[H]`` learned per-head sink logits (gpt-oss style, unrelated to sink *tokens*): one
            extra logit column in every softmax, dropped afterwards (mass without a value).
        softcap: logit soft-capping ``tanh(s / softcap) * softcap`` of every score (Gemma 2).

    Returns:
        ``[B, H, T, D]`` attention outputs.
    """
    batch, heads, length, _ = query.shape
    key, value, scaling, out = _per_query_head(query, key, value, scaling)
    for i in range(length):
        idx = visible_keys(i, num_sink_tokens, window_length, device=query.device)
        k, v, qi = key[:, :, idx], value[:, :, idx], query[:, :, i : i + 1]
        if rotary is not None:
            positions = torch.arange(len(idx), device=query.device)
            k = apply_rotary(k, positions, rotary)
            qi = apply_rotary(qi, positions[-1:], rotary)
        scores = (qi @ k.transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if sink_logits is not None:
            column = sink_logits.to(scores.dtype)[None, :, None, None].expand(batch, heads, 1, 1)
            weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
        else:
            weights = torch.softmax(scores, dim=-1)
        out[:, :, i : i + 1] = weights @ v
    return out


# ------------------------------------------------------------------ training-time S²-Attn / SF-Attn (the spec)
def shifted_sparse_group(t: int, group_size: int, shifted: bool) -> int:
    """Group of real token ``t``: ``[0, G), [G, 2G), ...``, or shifted: ``[0, G//2), [G//2, G//2 + G), ...``."""
    if not shifted:
        return t // group_size
    half = group_size // 2
    return 0 if t < half else 1 + (t - half) // group_size


def shifted_sparse_visible(
    i: int,
    j: int,
    head: int,
    heads: int,
    length: int,
    group_size: int,
    num_sink_tokens: int = 0,
    sliding_window: int | None = None,
) -> bool:
    """Whether real token ``i`` sees real token ``j`` in ``head`` of ``sink_s2attn`` / ``sink_sfattn`` (``S > 0``).

    Plain heads are the first ``heads - heads // 2``; a batch ``length`` (padding included) ``<= group_size`` is
    plain causal attention.
    """
    if j > i:
        return False
    if j < num_sink_tokens:
        return True
    if sliding_window is not None and i - j >= sliding_window:
        return False
    if length <= group_size:
        return True
    shifted = head >= heads - heads // 2
    return shifted_sparse_group(i, group_size, shifted) == shifted_sparse_group(j, group_size, shifted)


def reference_shifted_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    num_sink_tokens: int = 0,
    padding_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    sink_logits: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """S²-/SF-Attn from an explicit boolean visibility mask, one row and head at a time (slow; run in fp64).

    Tokens are numbered by their rank among the real tokens of their row (padding removed); padding queries see
    only themselves. Shapes as :func:`hf_sinks.attention.shifted_sparse.shifted_sparse_attention`.
    """
    batch, heads, length, _ = query.shape
    key, value, scaling, out = _per_query_head(query, key, value, scaling)
    for b in range(batch):
        real = [t for t in range(length) if padding_mask is None or bool(padding_mask[b, t])]
        rank = {t: r for r, t in enumerate(real)}
        for h in range(heads):
            mask = torch.zeros(length, length, dtype=torch.bool)
            for qi in range(length):
                if qi not in rank:
                    mask[qi, qi] = True
                    continue
                for kj in real:
                    mask[qi, kj] = shifted_sparse_visible(
                        rank[qi], rank[kj], h, heads, length, group_size, num_sink_tokens, sliding_window
                    )
            scores = (query[b, h] @ key[b, h].T) * scaling
            scores = scores.masked_fill(~mask, float("-inf"))
            if sink_logits is not None:
                column = sink_logits[h].to(scores.dtype).expand(length, 1)
                weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[:, :-1]
            else:
                weights = torch.softmax(scores, dim=-1)
            out[b, h] = weights @ value[b, h]
    return out
