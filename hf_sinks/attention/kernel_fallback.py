"""Pure-PyTorch twin of the Triton kernel ``hf_sinks.kernels.sink_attention`` (same signature, same results).

``sink_triton`` uses it when the kernel cannot run (see :func:`hf_sinks.attention.triton.select_backend`): triton
not installed, no CUDA and ``TRITON_INTERPRET`` unset, or ``HF_SINKS_DISABLE_TRITON=1``. Autograd goes through plain
torch ops. Queries are processed in blocks over only the key columns the block can see (sinks plus the window span of
its real indices), so memory is bounded by ``block x (S + W + block)`` per head, not by ``Tq x Tk``.
"""

from __future__ import annotations

import torch

from ..rope import RotaryParams, shift_rotary
from ..visibility import sink_visible

#: Queries per block (bounds the score matrix like ``functions.QUERY_BLOCK``).
QUERY_BLOCK = 512


def _visible_columns(q_real: torch.Tensor, k_real: torch.Tensor, s: int, w: int) -> torch.Tensor | None:
    """Key columns any query of the block may see (``None``: all of them)."""
    valid = q_real >= 0
    hi = torch.where(valid, q_real, -1).amax(-1, keepdim=True)
    lo = torch.where(valid, q_real, torch.iinfo(q_real.dtype).max).amin(-1, keepdim=True)
    keep = ((k_real >= 0) & (k_real <= hi) & ((k_real < s) | (k_real > lo - w))).any(0)
    if bool(keep.all()):
        return None
    cols = keep.nonzero().squeeze(-1)
    return cols if cols.numel() else torch.zeros(1, dtype=torch.long, device=k_real.device)


def sink_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_real: torch.Tensor,
    k_real: torch.Tensor,
    q_shift: torch.Tensor | None,
    num_sink_tokens: int,
    window_length: int,
    inv_freq: torch.Tensor | None,
    rotary_dim: int,
    scaling: float | None = None,
    sink_logits: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink+window attention in PyTorch; arguments and results as ``hf_sinks.kernels.sink_attention.sink_attention``.

    Query ``r`` sees key ``j`` by :func:`hf_sinks.visibility.sink_visible` (``j >= 0``, ``j <= r`` and (``j < S`` or
    ``r - j < W``)); sink columns are scored with the query rotated back by ``q_shift`` (angles in fp64). Returns
    ``(out [B, H, Tq, Dv], lse [B, H, Tq])``, softmax in fp32 (or the input dtype if wider); padding queries
    (``q_real < 0``) give zeros and ``lse = -inf``.
    """
    batch, heads, tq, head_dim = q.shape
    groups = heads // k.shape[1]
    s, w = int(num_sink_tokens), int(window_length)
    scaling = head_dim**-0.5 if scaling is None else float(scaling)
    compute = torch.promote_types(q.dtype, torch.float32)
    q_real = q_real.to(device=q.device, dtype=torch.long)
    k_real = k_real.to(device=q.device, dtype=torch.long)
    rotary = None
    if q_shift is not None and s > 0 and rotary_dim > 0:
        rotary = RotaryParams(inv_freq.to(q.device), rotary_dim)
    block = block_size or QUERY_BLOCK

    outs, lses = [], []
    for t0 in range(0, tq, block):
        t1 = min(tq, t0 + block)
        r_q = q_real[:, t0:t1]
        cols = _visible_columns(r_q, k_real, s, w)
        k_b = k if cols is None else k.index_select(2, cols)
        v_b = v if cols is None else v.index_select(2, cols)
        r_k = k_real if cols is None else k_real.index_select(1, cols)
        k_b = k_b.repeat_interleave(groups, dim=1).to(compute)
        v_b = v_b.repeat_interleave(groups, dim=1).to(compute)
        q_b = q[:, :, t0:t1]
        scores = (q_b.to(compute) @ k_b.transpose(-1, -2)) * scaling  # [B, H, b, n]
        if rotary is not None:
            q_sink = shift_rotary(q_b, -q_shift[:, None, t0:t1].to(q.device), rotary).to(compute)
            is_sink = (r_k >= 0) & (r_k < s)
            scores = torch.where(is_sink[:, None, None, :], (q_sink @ k_b.transpose(-1, -2)) * scaling, scores)
        visible = sink_visible(r_q[:, None, :, None], r_k[:, None, None, :], s, w)
        scores = scores.masked_fill(~visible, float("-inf"))
        if sink_logits is not None:
            column = sink_logits.to(compute)[None, :, None, None].expand(batch, heads, t1 - t0, 1)
            column = column.masked_fill((r_q < 0)[:, None, :, None], float("-inf"))
            scores = torch.cat([scores, column], dim=-1)
        top = scores.detach().amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.exp(scores - top)
        total = weights.sum(-1, keepdim=True)
        empty = total == 0
        weights = weights / torch.where(empty, torch.ones_like(total), total)
        if sink_logits is not None:
            weights = weights[..., :-1]
        outs.append((weights @ v_b).to(q.dtype))
        lse = (top + torch.log(torch.where(empty, torch.ones_like(total), total))).masked_fill(empty, float("-inf"))
        lses.append(lse.squeeze(-1).float())
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
