"""Argument checks of the shifted sparse attention (kernel and PyTorch fallback alike); torch only, no triton, so
the fallback can validate without importing triton."""

from __future__ import annotations

import math


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(
    q,
    k,
    v,
    group_size,
    num_sink_tokens,
    sink_logits=None,
    valid_start=None,
    valid_end=None,
    first_shifted_head=None,
    sliding_window=None,
) -> None:
    """Raise a ``ValueError`` naming the offending value."""
    if not _is_int(group_size) or group_size <= 0 or group_size % 2:
        raise ValueError(
            f"group_size must be a positive even int (the shifted heads move by group_size / 2); got {group_size!r}"
        )
    if not _is_int(num_sink_tokens) or num_sink_tokens < 0:
        raise ValueError(f"num_sink_tokens must be an int >= 0; got {num_sink_tokens!r}")
    if sliding_window is not None and (not _is_int(sliding_window) or sliding_window <= 0):
        raise ValueError(f"sliding_window must be None or an int >= 1; got {sliding_window!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, length, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != length or k.shape[3] != head_dim or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} "
            f"(k must be [B, H_kv, T, D], v [B, H_kv, T, Dv])"
        )
    if heads % k.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if first_shifted_head is not None and (not _is_int(first_shifted_head) or not 0 <= first_shifted_head <= heads):
        raise ValueError(f"first_shifted_head must be an int in [0, {heads}]; got {first_shifted_head!r}")
    if sink_logits is not None and tuple(sink_logits.shape) != (heads,):
        raise ValueError(f"sink_logits must be [H] = [{heads}]; got {tuple(sink_logits.shape)}")
    for name, bound in (("valid_start", valid_start), ("valid_end", valid_end)):
        if bound is not None and tuple(bound.shape) != (batch,):
            raise ValueError(f"{name} must be [B] = [{batch}]; got {tuple(bound.shape)}")
    if valid_start is not None or valid_end is not None:  # out-of-range bounds would read out of bounds
        lo = valid_start.tolist() if valid_start is not None else [0] * batch
        hi = valid_end.tolist() if valid_end is not None else [length] * batch
        if not all(0 <= a <= b <= length for a, b in zip(lo, hi)):
            raise ValueError(
                f"need 0 <= valid_start <= valid_end <= T = {length} in every row; got valid_start {lo}, valid_end {hi}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if math.prod(q.shape) == 0 or math.prod(v.shape) == 0:
        raise ValueError(f"empty inputs: q {tuple(q.shape)}, v {tuple(v.shape)}")


__all__ = ["check_inputs"]
