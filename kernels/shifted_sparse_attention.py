"""Shifted sparse attention for training (LongLoRA S²-Attn, SinkLoRA SF-Attn) as Triton kernels: forward, backward,
launchers, autograd.

Visibility, per batch row and query head ``h``, on real-token indices (``G`` = ``group_size``, ``S`` =
``num_sink_tokens``)::

    query i sees key j  iff  j <= i  and ( j < S  or  floor((i + off_h) / G) == floor((j + off_h) / G) )

    off_h = 0       for the plain heads    h <  first_shifted_head   (default H // 2)
    off_h = G // 2  for the shifted heads  h >= first_shifted_head

``S = 0`` is plain S²-Attn; ``S > 0`` adds SinkLoRA's global, causal sink keys (SF-Attn). The shift is done in index
space, not with LongLoRA's ``roll``: nothing wraps (the shifted heads' first group is the partial group
``[0, G / 2)``, so the first tokens never see the last ones, the future leak of the roll-based eager path), and the
heads come back in their original order with no roll back. With an odd ``H`` the heads ``h >= H // 2`` are shifted
(``first_shifted_head`` moves the split, e.g. ``H - H // 2`` for "plain heads first"). Groups need not divide ``T``:
the last group of either partition is simply shorter. An optional ``sliding_window`` further limits group keys to
``i - j < sliding_window`` (sinks exempt). Optional ``sink_logits [H]`` (gpt-oss style): one extra logit per head
in every softmax denominator with no value attached (unrelated to the sink *tokens*).

Padding: per batch row the real tokens are the columns ``[valid_start[b], valid_end[b])`` (left and right padding);
real index = column - ``valid_start[b]``, so a left-padded row is grouped exactly like its unpadded version.
Padding queries give zeros and ``lse = -inf``; padding keys are never seen.

Layout of the work: one program per (tile of query rows, batch row, query head); the KV head is ``h // (H / H_kv)``
(K/V are read in place, never repeated: GQA and MQA). A query tile visits only the key tiles that can hold a visible
key: the sink tiles (``[0, S)``) and the tiles from the start of its first row's group up to its last row, so the
work is ``O(T * (G + S))``, not ``O(T^2)``. Accumulation is fp32 (online softmax in base 2).

Backward (all Triton): a preprocess kernel (``delta = rowsum(dO * O)``), a dK/dV kernel (one program per key tile
and KV head, looping over the query heads of its group and only the query tiles that can see the key tile: the rest
of the group, or every later query for a sink tile; no atomics) and a dQ kernel (the forward's loops). ``d
sink_logits[h] = -sum_{b,t} exp(sink_h - lse) * delta`` is a reduction over ``[B, H, T]`` done with torch.

Running without a GPU: set ``TRITON_INTERPRET=1`` *before triton is imported at all* (as for
``hf_sinks.kernels.sink_attention``); :func:`unavailable_reason` names a mismatch. No transformers imports here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .shifted_sparse_checks import check_inputs

__all__ = [
    "INTERPRET",
    "ShiftedSparseAttentionFunction",
    "shifted_sparse_attention",
    "shifted_sparse_attn_bwd",
    "shifted_sparse_attn_fwd",
    "unavailable_reason",
]

#: Whether the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` when this module was imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Whether triton's own library was built for the interpreter (``TRITON_INTERPRET=1`` before triton was imported).
LANGUAGE_INTERPRETED = type(tl.max).__name__ == "InterpretedFunction"

_LOG2E = 1.4426950408889634
LOG2E: tl.constexpr = tl.constexpr(_LOG2E)
_NO_WINDOW = 1 << 30  # sliding_window=None


# ------------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _head_offset(h, first_shifted_head, shift):
    """``off_h``: ``shift`` (= G // 2) for the shifted heads, 0 for the plain ones."""
    return (h >= first_shifted_head).to(tl.int32) * shift


@triton.jit
def _query_tile_keys(t0, vs, ve, off, group_size, num_sink_tokens, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key columns a query tile ``[t0, t0 + BLOCK_M)`` may see, as two loops of ``BLOCK_N`` tiles.

    Returns ``(sink_end, group_start, end)``: sink tiles ``range(vs, sink_end)`` (tiles from ``vs``, covering the
    ``S`` sinks) and group tiles ``range(group_start, end)`` (from the start of the first real row's group, past the
    sink tiles, up to the last real row). The two never share a column."""
    lo = tl.maximum(t0, vs)
    end = tl.maximum(tl.minimum(t0 + BLOCK_M, ve), lo)  # exclusive; == lo for a tile of padding only
    sink_span = vs + ((num_sink_tokens + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    sink_end = tl.where(end > lo, tl.minimum(sink_span, end), vs)
    first_group = tl.maximum(((lo - vs + off) // group_size) * group_size - off, 0) + vs
    return sink_end, tl.maximum(first_group, sink_span), end


@triton.jit
def _visible(rq, q_ok, cols, vs, ve, off, group_size, num_sink_tokens, window):
    """``[M, N]`` visibility of query rows (real index ``rq``) x key columns ``cols`` (the module's rule)."""
    rk = cols - vs
    k_ok = (cols >= vs) & (cols < ve)
    same = ((rq + off) // group_size)[:, None] == ((rk + off) // group_size)[None, :]
    near = (rq[:, None] - rk[None, :]) < window
    return (
        q_ok[:, None] & k_ok[None, :] & (rk[None, :] <= rq[:, None]) & ((rk[None, :] < num_sink_tokens) | (same & near))
    ), k_ok


# ----------------------------------------------------------------------------------------------------- forward
@triton.jit
def _shifted_sparse_attn_fwd_kernel(
    Q,
    K,
    V,
    VS,
    VE,
    SINKS,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lt,
    T,
    H,
    group_size,
    shift,
    first_shifted_head,
    num_sink_tokens,
    window,
    qk_scale,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SINK_LOGITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of ``BLOCK_M`` query rows of one (batch row, query head): normalised output and natural-log LSE."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B * H * T * D may pass 2**31
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUPS
    off = _head_offset(h, first_shifted_head, shift)
    vs = tl.load(VS + b)
    ve = tl.load(VE + b)

    t0 = pid_m * BLOCK_M
    t = t0 + tl.arange(0, BLOCK_M)
    q_ok = (t >= vs) & (t < ve)
    rq = t - vs
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + t[:, None] * stride_qt + d[None, :] * stride_qd,
        mask=q_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINK_LOGITS:  # the sink logit starts the running max with mass exp(0) = 1
        sink = tl.load(SINKS + h).to(tl.float32) * LOG2E
        m_i = tl.where(q_ok, sink, float("-inf"))
        l_i = tl.where(q_ok, 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    sink_end, group_start, end = _query_tile_keys(t0, vs, ve, off, group_size, num_sink_tokens, BLOCK_M, BLOCK_N)
    for loop in range(2):  # 0: the sink tiles, 1: the tiles of the groups the query tile spans
        n_lo = tl.where(loop == 0, vs, group_start)
        n_hi = tl.where(loop == 0, sink_end, end)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            visible, k_ok = _visible(rq, q_ok, cols, vs, ve, off, group_size, num_sink_tokens, window)
            kt = tl.load(
                k_base + cols[None, :] * stride_kt + d[:, None] * stride_kd,
                mask=k_ok[None, :] & (d[:, None] < HEAD_DIM),
                other=0.0,
            )
            s = tl.dot(q, kt, input_precision=PRECISION)
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + cols[:, None] * stride_vt + dv[None, :] * stride_vd,
                mask=k_ok[:, None] & (dv[None, :] < HEAD_DIM_V),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    row_ok = t < T  # padding rows too: zeros and -inf
    o_ptrs = O + b * stride_ob + h * stride_oh + t[:, None] * stride_ot + dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + b * stride_lb + h * stride_lh + t * stride_lt, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------- backward
@triton.jit
def _shifted_sparse_attn_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    n_rows,
    stride_or,
    stride_od,
    stride_dor,
    stride_dod,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """``delta = rowsum(dO * O)`` in fp32 over ``[B * H * T]`` rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dv = tl.arange(0, BLOCK_DV)
    mask = (rows < n_rows)[:, None] & (dv < HEAD_DIM_V)[None, :]
    o = tl.load(O + rows[:, None] * stride_or + dv[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * stride_dor + dv[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _shifted_sparse_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    VS,
    VE,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
    T,
    H_KV,
    group_size,
    shift,
    first_shifted_head,
    num_sink_tokens,
    window,
    qk_scale,
    scaling,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one key tile of one KV head: summed over the query heads of its group and the query tiles that
    can see the tile (from its first key to the end of its last key's group; every later query for a sink tile)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    kvh = (pid_bh % H_KV).to(tl.int64)
    vs = tl.load(VS + b)
    ve = tl.load(VE + b)

    c0 = pid_n * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    k_ok = (cols >= vs) & (cols < ve)
    lo = tl.maximum(c0, vs)  # first real key of the tile
    hi = tl.minimum(c0 + BLOCK_N, ve)  # exclusive
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(
        K + b * stride_kb + kvh * stride_kh + cols[None, :] * stride_kt + d[:, None] * stride_kd,
        mask=k_ok[None, :] & (d[:, None] < HEAD_DIM),
        other=0.0,
    )
    vt = tl.load(
        V + b * stride_vb + kvh * stride_vh + cols[None, :] * stride_vt + dv[:, None] * stride_vd,
        mask=k_ok[None, :] & (dv[:, None] < HEAD_DIM_V),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    for g in range(GROUPS):
        h = kvh * GROUPS + g
        off = _head_offset(h, first_shifted_head, shift)
        last = tl.maximum(hi - 1 - vs, 0)  # real index of the tile's last key
        group_end = ((last + off) // group_size + 1) * group_size - off + vs
        q_end = tl.where(lo - vs < num_sink_tokens, ve, tl.minimum(group_end, ve))
        q_end = tl.where(hi > lo, q_end, lo)
        for m0 in range(lo, q_end, BLOCK_M):
            t = m0 + tl.arange(0, BLOCK_M)
            q_ok = t < ve  # t >= lo >= vs
            rq = t - vs
            q = tl.load(
                Q + b * stride_qb + h * stride_qh + t[:, None] * stride_qt + d[None, :] * stride_qd,
                mask=q_ok[:, None] & (d[None, :] < HEAD_DIM),
                other=0.0,
            )
            do = tl.load(
                DO + b * stride_dob + h * stride_doh + t[:, None] * stride_dot + dv[None, :] * stride_dod,
                mask=q_ok[:, None] & (dv[None, :] < HEAD_DIM_V),
                other=0.0,
            )
            lse = tl.load(LSE + b * stride_lb + h * stride_lh + t * stride_lt, mask=q_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
            delta = tl.load(DELTA + b * stride_lb + h * stride_lh + t * stride_lt, mask=q_ok, other=0.0)
            visible, _ = _visible(rq, q_ok, cols, vs, ve, off, group_size, num_sink_tokens, window)
            s = tl.dot(q, kt, input_precision=PRECISION)
            p = tl.where(visible, tl.math.exp2(tl.where(visible, s * qk_scale - lse2[:, None], 0.0)), 0.0)
            dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    col_ok = cols < T  # padding keys too: zero gradients
    dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + cols[:, None] * stride_dkt + d[None, :] * stride_dkd
    tl.store(dk_ptrs, (dk * scaling).to(DK.dtype.element_ty), mask=col_ok[:, None] & (d[None, :] < HEAD_DIM))
    dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + cols[:, None] * stride_dvt + dv[None, :] * stride_dvd
    tl.store(dv_ptrs, dv_acc.to(DV.dtype.element_ty), mask=col_ok[:, None] & (dv[None, :] < HEAD_DIM_V))


@triton.jit
def _shifted_sparse_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    VS,
    VE,
    DQ,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    T,
    H,
    group_size,
    shift,
    first_shifted_head,
    num_sink_tokens,
    window,
    qk_scale,
    scaling,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one tile of query rows of one (batch row, query head), over the key tiles of the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUPS
    off = _head_offset(h, first_shifted_head, shift)
    vs = tl.load(VS + b)
    ve = tl.load(VE + b)

    t0 = pid_m * BLOCK_M
    t = t0 + tl.arange(0, BLOCK_M)
    q_ok = (t >= vs) & (t < ve)
    rq = t - vs
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + t[:, None] * stride_qt + d[None, :] * stride_qd,
        mask=q_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + t[:, None] * stride_dot + dv[None, :] * stride_dod,
        mask=q_ok[:, None] & (dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + t * stride_lt, mask=q_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + t * stride_lt, mask=q_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    sink_end, group_start, end = _query_tile_keys(t0, vs, ve, off, group_size, num_sink_tokens, BLOCK_M, BLOCK_N)
    for loop in range(2):  # as the forward: sink tiles, then group tiles
        n_lo = tl.where(loop == 0, vs, group_start)
        n_hi = tl.where(loop == 0, sink_end, end)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            visible, k_ok = _visible(rq, q_ok, cols, vs, ve, off, group_size, num_sink_tokens, window)
            kt = tl.load(
                k_base + cols[None, :] * stride_kt + d[:, None] * stride_kd,
                mask=k_ok[None, :] & (d[:, None] < HEAD_DIM),
                other=0.0,
            )
            vt = tl.load(
                v_base + cols[None, :] * stride_vt + dv[:, None] * stride_vd,
                mask=k_ok[None, :] & (dv[:, None] < HEAD_DIM_V),
                other=0.0,
            )
            s = tl.dot(q, kt, input_precision=PRECISION)
            p = tl.where(visible, tl.math.exp2(tl.where(visible, s * qk_scale - lse2[:, None], 0.0)), 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + t[:, None] * stride_dqt + d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * scaling).to(DQ.dtype.element_ty), mask=(t < T)[:, None] & (d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------------- launchers
def unavailable_reason(device: torch.device) -> str | None:
    """Why these kernels cannot run on tensors of ``device`` (``None`` when they can)."""
    if INTERPRET != LANGUAGE_INTERPRETED:
        return (
            f"TRITON_INTERPRET was {'set' if INTERPRET else 'unset'} when hf_sinks.kernels.shifted_sparse_attention "
            f"was imported but {'unset' if INTERPRET else 'set'} when triton itself was imported; set it before "
            f"anything imports triton (torch._dynamo does, and transformers / hf_sinks import it)"
        )
    if INTERPRET:
        return (
            None
            if device.type == "cpu"
            else (
                f"hf_sinks.kernels.shifted_sparse_attention was imported with TRITON_INTERPRET=1, which runs on CPU "
                f"tensors, but the tensors are on {device}"
            )
        )
    if device.type != "cuda":
        return (
            f"the tensors are on {device.type!r}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            f"before triton is imported (CPU, slow)"
        )
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def _block_sizes(length: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): 16x16 under the interpreter, 64x64 (32 for fp32 / D > 128)."""
    if INTERPRET:
        return 16, 16, 1, 1
    block = min(64, max(16, triton.next_power_of_2(length)))
    if head_dim > 128 or dtype == torch.float32:
        block = min(block, 32)
    return block, block, 4, 2


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are multiplied exactly (tf32 would lose ~1e-3); fp16/bf16 dots are exact anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def _scalars(group_size, first_shifted_head, num_sink_tokens, sliding_window):
    window = _NO_WINDOW if sliding_window is None else int(sliding_window)
    return int(group_size), int(group_size) // 2, int(first_shifted_head), int(num_sink_tokens), window


def shifted_sparse_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid_start: torch.Tensor,
    valid_end: torch.Tensor,
    sink_logits: torch.Tensor | None,
    group_size: int,
    first_shifted_head: int,
    num_sink_tokens: int,
    sliding_window: int | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: ``out [B, H, T, Dv]`` (``q.dtype``) and ``lse [B, H, T]`` (fp32, natural log).

    ``valid_start``/``valid_end``: int32 ``[B]`` (the real columns of each row); arguments already checked."""
    batch, heads, length, head_dim = q.shape
    heads_kv = k.shape[1]
    head_dim_v = v.shape[-1]
    block_m, block_n, warps, stages = _block_sizes(length, head_dim, q.dtype)
    out = q.new_empty(batch, heads, length, head_dim_v)
    lse = torch.empty(batch, heads, length, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(length, block_m), batch * heads)
    _shifted_sparse_attn_fwd_kernel[grid](
        q,
        k,
        v,
        valid_start,
        valid_end,
        sink_logits if sink_logits is not None else lse,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *lse.stride(),
        length,
        heads,
        *_scalars(group_size, first_shifted_head, num_sink_tokens, sliding_window),
        scaling * _LOG2E,
        GROUPS=heads // heads_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_SINK_LOGITS=sink_logits is not None,
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return out, lse


def shifted_sparse_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    valid_start: torch.Tensor,
    valid_end: torch.Tensor,
    sink_logits: torch.Tensor | None,
    group_size: int,
    first_shifted_head: int,
    num_sink_tokens: int,
    sliding_window: int | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward: ``dq, dk, dv`` (input dtypes) and ``d sink_logits`` (``None`` without sink logits)."""
    batch, heads, length, head_dim = q.shape
    heads_kv = k.shape[1]
    head_dim_v = v.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    do = do.contiguous()
    out = out.contiguous()

    delta = torch.empty(batch, heads, length, device=q.device, dtype=torch.float32)
    rows = batch * heads * length
    block_r = 16 if INTERPRET else 64
    o_flat, do_flat = out.view(rows, head_dim_v), do.view(rows, head_dim_v)
    _shifted_sparse_attn_bwd_preprocess_kernel[(triton.cdiv(rows, block_r),)](
        o_flat,
        do_flat,
        delta,
        rows,
        *o_flat.stride(),
        *do_flat.stride(),
        HEAD_DIM_V=head_dim_v,
        BLOCK_R=block_r,
        BLOCK_DV=block_dv,
    )

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if INTERPRET:
        block_m, block_n, warps, stages = 16, 16, 1, 1
    else:
        block_m, block_n = (32, 32) if (head_dim > 64 or q.dtype == torch.float32) else (64, 64)
        warps, stages = 4, 1
    common = dict(
        GROUPS=heads // heads_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    scalars = (*_scalars(group_size, first_shifted_head, num_sink_tokens, sliding_window), scaling * _LOG2E, scaling)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride())
    _shifted_sparse_attn_bwd_dkdv_kernel[(triton.cdiv(length, block_n), batch * heads_kv)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        valid_start,
        valid_end,
        dk,
        dv,
        *strides,
        *dk.stride(),
        *dv.stride(),
        length,
        heads_kv,
        *scalars,
        **common,
    )
    _shifted_sparse_attn_bwd_dq_kernel[(triton.cdiv(length, block_m), batch * heads)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        valid_start,
        valid_end,
        dq,
        *strides,
        *dq.stride(),
        length,
        heads,
        *scalars,
        **common,
    )

    dsink = None
    if sink_logits is not None:
        # d lse / d sink = exp(sink - lse); d out / d sink = -exp(sink - lse) * out  =>  sum of -exp(sink - lse) * delta
        weight = torch.exp(sink_logits.float()[None, :, None] - lse)  # padding rows: lse = -inf -> inf, dropped
        dsink = -(torch.where(torch.isfinite(lse), weight * delta, torch.zeros_like(delta))).sum((0, 2))
        dsink = dsink.to(sink_logits.dtype)
    return dq, dk, dv, dsink


class ShiftedSparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward both in Triton (``lse`` is returned but not differentiable)."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        valid_start,
        valid_end,
        sink_logits,
        group_size,
        first_shifted_head,
        num_sink_tokens,
        sliding_window,
        scaling,
    ):
        params = (group_size, first_shifted_head, num_sink_tokens, sliding_window, scaling)
        out, lse = shifted_sparse_attn_fwd(q, k, v, valid_start, valid_end, sink_logits, *params)
        ctx.save_for_backward(q, k, v, out, lse, valid_start, valid_end, sink_logits)
        ctx.params = params
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, valid_start, valid_end, sink_logits = ctx.saved_tensors
        dq, dk, dv, dsink = shifted_sparse_attn_bwd(
            dout, q, k, v, out, lse, valid_start, valid_end, sink_logits, *ctx.params
        )
        return dq, dk, dv, None, None, dsink, None, None, None, None, None


def shifted_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    num_sink_tokens: int = 0,
    scaling: float | None = None,
    sink_logits: torch.Tensor | None = None,
    valid_start: torch.Tensor | None = None,
    valid_end: torch.Tensor | None = None,
    first_shifted_head: int | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S²-Attn / SF-Attn in Triton (differentiable in ``q``, ``k``, ``v`` and ``sink_logits``).

    Args:
        q: ``[B, H, T, D]``; k: ``[B, H_kv, T, D]``; v: ``[B, H_kv, T, Dv]`` (``H`` a multiple of ``H_kv``; never
            repeated). Any strides.
        group_size: ``G``, even and ``>= 2``; any ``T`` (the last groups may be partial).
        num_sink_tokens: ``S >= 0``, the first real tokens every later query sees (0: plain S²-Attn).
        scaling: softmax scale (default ``D ** -0.5``).
        sink_logits: optional ``[H]`` learned per-head sink logits (gpt-oss style).
        valid_start, valid_end: optional integer ``[B]``: the real tokens of row ``b`` are the columns
            ``[valid_start[b], valid_end[b])`` (defaults ``0`` and ``T``).
        first_shifted_head: heads ``>= first_shifted_head`` use the shifted partition (default ``H // 2``).
        sliding_window: optional limit ``i - j < sliding_window`` on group keys (sinks exempt).

    Returns:
        ``(out [B, H, T, Dv] in q.dtype, lse [B, H, T] fp32)``; padding queries give zeros and ``lse = -inf``.

    Raises:
        ValueError: bad arguments (named). RuntimeError: when the kernels cannot run here (see
        :func:`unavailable_reason`).
    """
    check_inputs(
        q, k, v, group_size, num_sink_tokens, sink_logits, valid_start, valid_end, first_shifted_head, sliding_window
    )
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"hf_sinks Triton shifted sparse attention cannot run: {reason}.")
    batch, heads, length, head_dim = q.shape
    scaling = head_dim**-0.5 if scaling is None else float(scaling)
    vs = torch.zeros(batch, dtype=torch.int32, device=q.device) if valid_start is None else valid_start
    ve = torch.full((batch,), length, dtype=torch.int32, device=q.device) if valid_end is None else valid_end
    vs = vs.to(device=q.device, dtype=torch.int32).contiguous()
    ve = ve.to(device=q.device, dtype=torch.int32).contiguous()
    first = heads // 2 if first_shifted_head is None else int(first_shifted_head)
    return ShiftedSparseAttentionFunction.apply(
        q,
        k,
        v,
        vs,
        ve,
        sink_logits,
        int(group_size),
        first,
        int(num_sink_tokens),
        None if sliding_window is None else int(sliding_window),
        scaling,
    )
