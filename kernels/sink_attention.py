"""Sink+window attention (StreamingLLM) as one Triton kernel: forward, backward, launchers, autograd.

Visibility (docs/design.md §2.1), per batch row, from the real-token index of every query and key column::

    query r sees key j  iff  j >= 0, r >= 0, j <= r and (j < S or r - j < W)

``q_real [B, Tq]`` and ``k_real [B, Tk]`` carry those indices (``-1``: padding or an empty slot), so the same kernel
serves decode over a ring-ordered cache, multi-token chunks (stored slots + the new tokens) and plain training
sequences (``q_real = k_real = arange(T)``). This is :func:`hf_sinks.visibility.sink_visible`, the one Python
statement of the rule; Triton cannot call it, so the kernel keeps this inline copy and
tests/kernels/test_sink_attention_kernel.py checks it against attention masked by that function.

Sink columns (``0 <= j < S``) are scored with the query rotated back by a per-query integer ``shift`` (RoPE,
``rotate_half`` convention on the first ``rotary_dim`` channels): ``score = (R(-shift) q) . k``; window columns with
the query as is. The rotation happens on the query tile in registers (the rotated half is a second load of the same
rows at partner channel offsets); its cos/sin come from host tables ``[B, Tq, rotary_dim / 2]`` whose angles are
formed in fp64 and cast to fp32 (exact for any shift, as hf_sinks.rope.shift_rotary).

Optional learned ``sink_logits [H]`` (gpt-oss style): one extra logit per head in the softmax denominator with no
value attached (``softmax([scores, sink])[:-1]``). They are unrelated to the sink *tokens* ``S``.

Layout of the work: one program per (tile of query rows, batch row, KV head). A tile's rows are (query, head) pairs
of the ``H / H_kv`` query heads sharing that KV head, so K/V are loaded once per group and never repeated (GQA and
MQA). Key tiles that no query of the tile can see (all in the future, or out of every window and not sinks) are
skipped from their ``k_real`` alone. Decode (few query rows) splits the keys over several programs (flash-decoding)
and merges the partial results with a small combine kernel. Accumulation is fp32 (online softmax in base 2).

Backward (all Triton): a preprocess kernel (``delta = rowsum(dO * O)``), a dK/dV kernel (one program per key tile
and KV head, looping over the group's query rows: no atomics) and a dQ kernel (one program per query tile, with the
sink rotation transposed in registers). ``d sink_logits[h] = -sum_{b,t} exp(sink_h - lse) * delta`` is a reduction
over ``[B, H, Tq]`` done with torch on the host.

Running without a GPU: set ``TRITON_INTERPRET=1`` *before triton is imported at all* (triton reads it when
``@triton.jit`` decorators run: its own ``tl.max``/``tl.sum``... at ``import triton``, these kernels at this module's
import; torch._dynamo imports triton, and transformers / hf_sinks import torch._dynamo, so in practice: before
importing torch._dynamo, transformers or hf_sinks). :data:`INTERPRET` records what was in force here and
:func:`unavailable_reason` names a mismatch. The interpreter runs programs one by one with numpy on CPU tensors,
with no bf16. No transformers imports here.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "SinkAttentionFunction",
    "rotation_tables",
    "sink_attention",
    "sink_attn_bwd",
    "sink_attn_fwd",
    "unavailable_reason",
]

#: Whether the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` when this module was imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Whether triton's own library (``tl.max``, ...) was built for the interpreter, i.e. ``TRITON_INTERPRET=1`` was set
#: before triton itself was imported. torch._dynamo imports triton, and transformers / hf_sinks import torch._dynamo.
LANGUAGE_INTERPRETED = type(tl.max).__name__ == "InterpretedFunction"

_LOG2E = 1.4426950408889634
LOG2E: tl.constexpr = tl.constexpr(_LOG2E)
_BIG: tl.constexpr = tl.constexpr(1 << 30)  # "no such index" for min/max over k_real / q_real


# ----------------------------------------------------------------------------------------------------- forward
@triton.jit
def _sink_attn_fwd_kernel(
    Q,
    K,
    V,
    QR,
    KR,
    COS,
    SIN,
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
    stride_qrb,
    stride_qrt,
    stride_krb,
    stride_krt,
    stride_cb,
    stride_ct,
    stride_os,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_lt,
    Tq,
    Tk,
    H_KV,
    cols_per_split,
    num_sink_tokens,
    window_length,
    half_rot,
    qk_scale,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SINK_LOGITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of ``BLOCK_M`` (query, head) rows of one KV head over the key columns of split ``program_id(2)``.

    Writes the normalised output and the natural-log LSE of its rows (``-inf`` and zeros for a row that sees
    nothing, e.g. padding). With several splits ``O``/``LSE`` are fp32 partial buffers merged by the combine kernel.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H_KV).to(tl.int64)  # 64-bit offsets: B * H * T * D may pass 2**31
    kvh = pid_bh % H_KV

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // GROUPS
    h = kvh * GROUPS + rows % GROUPS
    row_ok = t < Tq
    qr = tl.load(QR + b * stride_qrb + t * stride_qrt, mask=row_ok, other=-1)
    q_valid = row_ok & (qr >= 0)
    q_hi = tl.max(tl.where(q_valid, qr, -1), 0)
    q_lo = tl.min(tl.where(q_valid, qr, _BIG), 0)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt
    q = tl.load(q_base + d[None, :] * stride_qd, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    q_sink = q
    if HAS_SHIFT:
        # R(-shift) q on the first 2*half_rot channels: q * cos + rotate_half(q) * sin, rotate_half by partner loads
        in_rot = d < 2 * half_rot
        first = d < half_rot
        partner = tl.where(first, d + half_rot, d - half_rot)
        sign = tl.where(first, -1.0, 1.0)
        rot_mask = row_ok[:, None] & in_rot[None, :]
        q_partner = tl.load(q_base + partner[None, :] * stride_qd, mask=rot_mask, other=0.0).to(tl.float32)
        freq = tl.where(first, d, d - half_rot)
        cs_off = b * stride_cb + t[:, None] * stride_ct + freq[None, :]
        cos = tl.load(COS + cs_off, mask=rot_mask, other=1.0)
        sin = tl.load(SIN + cs_off, mask=rot_mask, other=0.0)
        q_sink = (q.to(tl.float32) * cos + sign[None, :] * q_partner * sin).to(q.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINK_LOGITS:  # the sink logit starts the running max with mass exp(0) = 1 (first split only)
        sink = tl.load(SINKS + h, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        use = q_valid & (pid_s == 0)
        m_i = tl.where(use, sink, float("-inf"))
        l_i = tl.where(use, 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, Tk)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        kr = tl.load(KR + b * stride_krb + cols * stride_krt, mask=col_ok, other=-1)
        k_valid = kr >= 0
        k_lo = tl.min(tl.where(k_valid, kr, _BIG), 0)
        k_hi = tl.max(tl.where(k_valid, kr, -1), 0)
        # skip a tile when every key is in the future of every query, or out of every window and not a sink
        useful = (k_lo <= q_hi) & ((k_lo < num_sink_tokens) | (q_lo - k_hi < window_length))
        if useful:
            kt = tl.load(
                k_base + cols[None, :] * stride_kt + d[:, None] * stride_kd,
                mask=col_ok[None, :] & (d[:, None] < HEAD_DIM),
                other=0.0,
            )
            s = tl.dot(q, kt, input_precision=PRECISION)
            if HAS_SHIFT:
                if k_lo < num_sink_tokens:
                    s_sink = tl.dot(q_sink, kt, input_precision=PRECISION)
                    s = tl.where((k_valid & (kr < num_sink_tokens))[None, :], s_sink, s)
            visible = (
                k_valid[None, :]
                & q_valid[:, None]
                & (kr[None, :] <= qr[:, None])
                & ((kr[None, :] < num_sink_tokens) | (qr[:, None] - kr[None, :] < window_length))
            )
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + cols[:, None] * stride_vt + dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (dv[None, :] < HEAD_DIM_V),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    o_ptrs = (
        O
        + pid_s * stride_os
        + b * stride_ob
        + h[:, None] * stride_oh
        + t[:, None] * stride_ot
        + dv[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + pid_s * stride_ls + b * stride_lb + h * stride_lh + t * stride_lt, lse, mask=row_ok)


@triton.jit
def _sink_attn_combine_kernel(
    OP,
    LP,
    O,
    LSE,
    stride_ps,
    stride_pr,
    stride_pd,
    stride_ls,
    stride_lr,
    stride_or,
    stride_od,
    stride_lser,
    num_splits,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Merge the split partial results of one (batch, head, query) row: LSE-weighted sum of normalised outputs."""
    row = tl.program_id(0).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < HEAD_DIM_V
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(LP + s * stride_ls + row * stride_lr + tl.arange(0, 1)))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in range(0, num_splits):
        w = tl.exp(tl.load(LP + s * stride_ls + row * stride_lr + tl.arange(0, 1)) - m_safe)
        o = tl.load(OP + s * stride_ps + row * stride_pr + dv * stride_pd, mask=dv_ok, other=0.0)
        total += w
        acc += tl.sum(w) * o
    empty = total == 0.0
    out = acc / tl.sum(tl.where(empty, 1.0, total))
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total)))
    tl.store(O + row * stride_or + dv * stride_od, out.to(O.dtype.element_ty), mask=dv_ok)
    tl.store(LSE + row * stride_lser + tl.arange(0, 1), lse)


# ---------------------------------------------------------------------------------------------------- backward
@triton.jit
def _sink_attn_bwd_preprocess_kernel(
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
    """``delta = rowsum(dO * O)`` in fp32 over ``[B * H * Tq]`` rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dv = tl.arange(0, BLOCK_DV)
    mask = (rows < n_rows)[:, None] & (dv < HEAD_DIM_V)[None, :]
    o = tl.load(O + rows[:, None] * stride_or + dv[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * stride_dor + dv[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _bwd_scores(
    q,
    q_sink,
    kt,
    kr,
    k_valid,
    k_lo,
    qr,
    q_valid,
    lse2,
    num_sink_tokens,
    window_length,
    qk_scale,
    HAS_SHIFT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Recompute ``P`` (probabilities, 0 where invisible) and the sink-column mask of one (query, key) tile."""
    is_sink = k_valid & (kr < num_sink_tokens)
    s = tl.dot(q, kt, input_precision=PRECISION)
    if HAS_SHIFT:
        if k_lo < num_sink_tokens:
            s_sink = tl.dot(q_sink, kt, input_precision=PRECISION)
            s = tl.where(is_sink[None, :], s_sink, s)
    visible = (
        k_valid[None, :]
        & q_valid[:, None]
        & (kr[None, :] <= qr[:, None])
        & ((kr[None, :] < num_sink_tokens) | (qr[:, None] - kr[None, :] < window_length))
    )
    p = tl.where(visible, tl.math.exp2(tl.where(visible, s * qk_scale - lse2[:, None], 0.0)), 0.0)
    return p, is_sink


@triton.jit
def _sink_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    QR,
    KR,
    COS,
    SIN,
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
    stride_qrb,
    stride_qrt,
    stride_krb,
    stride_krt,
    stride_cb,
    stride_ct,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
    Tq,
    Tk,
    H_KV,
    num_sink_tokens,
    window_length,
    half_rot,
    qk_scale,
    scaling,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one key tile of one KV head, summed over every query row of the group (no atomics)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # 64-bit offsets: B * H * T * D may pass 2**31
    kvh = pid_bh % H_KV

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    kr = tl.load(KR + b * stride_krb + cols * stride_krt, mask=col_ok, other=-1)
    k_valid = kr >= 0
    k_lo = tl.min(tl.where(k_valid, kr, _BIG), 0)
    k_hi = tl.max(tl.where(k_valid, kr, -1), 0)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(
        K + b * stride_kb + kvh * stride_kh + cols[None, :] * stride_kt + d[:, None] * stride_kd,
        mask=col_ok[None, :] & (d[:, None] < HEAD_DIM),
        other=0.0,
    )
    vt = tl.load(
        V + b * stride_vb + kvh * stride_vh + cols[None, :] * stride_vt + dv[:, None] * stride_vd,
        mask=col_ok[None, :] & (dv[:, None] < HEAD_DIM_V),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if HAS_SHIFT:
        in_rot = d < 2 * half_rot
        first = d < half_rot
        partner = tl.where(first, d + half_rot, d - half_rot)
        sign = tl.where(first, -1.0, 1.0)
        freq = tl.where(first, d, d - half_rot)

    for m0 in range(0, Tq * GROUPS, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        t = rows // GROUPS
        h = kvh * GROUPS + rows % GROUPS
        row_ok = t < Tq
        qr = tl.load(QR + b * stride_qrb + t * stride_qrt, mask=row_ok, other=-1)
        q_valid = row_ok & (qr >= 0)
        q_hi = tl.max(tl.where(q_valid, qr, -1), 0)
        q_lo = tl.min(tl.where(q_valid, qr, _BIG), 0)
        useful = (k_lo <= q_hi) & ((k_lo < num_sink_tokens) | (q_lo - k_hi < window_length))
        if useful:
            q_base = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt
            q = tl.load(q_base + d[None, :] * stride_qd, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
            q_sink = q
            if HAS_SHIFT:
                rot_mask = row_ok[:, None] & in_rot[None, :]
                q_partner = tl.load(q_base + partner[None, :] * stride_qd, mask=rot_mask, other=0.0).to(tl.float32)
                cs_off = b * stride_cb + t[:, None] * stride_ct + freq[None, :]
                cos = tl.load(COS + cs_off, mask=rot_mask, other=1.0)
                sin = tl.load(SIN + cs_off, mask=rot_mask, other=0.0)
                q_sink = (q.to(tl.float32) * cos + sign[None, :] * q_partner * sin).to(q.dtype)
            lse = tl.load(LSE + b * stride_lb + h * stride_lh + t * stride_lt, mask=row_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
            delta = tl.load(DELTA + b * stride_lb + h * stride_lh + t * stride_lt, mask=row_ok, other=0.0)
            do = tl.load(
                DO + b * stride_dob + h[:, None] * stride_doh + t[:, None] * stride_dot + dv[None, :] * stride_dod,
                mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V),
                other=0.0,
            )
            p, is_sink = _bwd_scores(
                q,
                q_sink,
                kt,
                kr,
                k_valid,
                k_lo,
                qr,
                q_valid,
                lse2,
                num_sink_tokens,
                window_length,
                qk_scale,
                HAS_SHIFT,
                PRECISION,
            )
            dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SHIFT:
                if k_lo < num_sink_tokens:
                    ds_sink = tl.where(is_sink[None, :], ds, 0.0)
                    ds = tl.where(is_sink[None, :], 0.0, ds)
                    dk += tl.dot(tl.trans(ds_sink.to(q.dtype)), q_sink, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + cols[:, None] * stride_dkt + d[None, :] * stride_dkd
    tl.store(dk_ptrs, (dk * scaling).to(DK.dtype.element_ty), mask=col_ok[:, None] & (d[None, :] < HEAD_DIM))
    dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + cols[:, None] * stride_dvt + dv[None, :] * stride_dvd
    tl.store(dv_ptrs, dv_acc.to(DV.dtype.element_ty), mask=col_ok[:, None] & (dv[None, :] < HEAD_DIM_V))


@triton.jit
def _sink_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    QR,
    KR,
    COS,
    SIN,
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
    stride_qrb,
    stride_qrt,
    stride_krb,
    stride_krt,
    stride_cb,
    stride_ct,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    Tq,
    Tk,
    H_KV,
    num_sink_tokens,
    window_length,
    half_rot,
    qk_scale,
    scaling,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one tile of (query, head) rows. Sink columns: ``dq += R(-shift)^T (dS_sink @ K)``, where the transposed
    rotation is ``cos * (dS @ K) - sin * (dS @ rotate_half(K))`` (rotate_half commutes with the duplicated sin)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # 64-bit offsets: B * H * T * D may pass 2**31
    kvh = pid_bh % H_KV

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // GROUPS
    h = kvh * GROUPS + rows % GROUPS
    row_ok = t < Tq
    qr = tl.load(QR + b * stride_qrb + t * stride_qrt, mask=row_ok, other=-1)
    q_valid = row_ok & (qr >= 0)
    q_hi = tl.max(tl.where(q_valid, qr, -1), 0)
    q_lo = tl.min(tl.where(q_valid, qr, _BIG), 0)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt
    q = tl.load(q_base + d[None, :] * stride_qd, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    q_sink = q
    if HAS_SHIFT:
        in_rot = d < 2 * half_rot
        first = d < half_rot
        partner = tl.where(first, d + half_rot, d - half_rot)
        sign = tl.where(first, -1.0, 1.0)
        rot_mask = row_ok[:, None] & in_rot[None, :]
        q_partner = tl.load(q_base + partner[None, :] * stride_qd, mask=rot_mask, other=0.0).to(tl.float32)
        freq = tl.where(first, d, d - half_rot)
        cs_off = b * stride_cb + t[:, None] * stride_ct + freq[None, :]
        cos = tl.load(COS + cs_off, mask=rot_mask, other=1.0)
        sin = tl.load(SIN + cs_off, mask=rot_mask, other=0.0)
        q_sink = (q.to(tl.float32) * cos + sign[None, :] * q_partner * sin).to(q.dtype)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + t * stride_lt, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + t * stride_lt, mask=row_ok, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h[:, None] * stride_doh + t[:, None] * stride_dot + dv[None, :] * stride_dod,
        mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_sink = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_sink_half = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + kvh * stride_kh
    for n0 in range(0, Tk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        kr = tl.load(KR + b * stride_krb + cols * stride_krt, mask=col_ok, other=-1)
        k_valid = kr >= 0
        k_lo = tl.min(tl.where(k_valid, kr, _BIG), 0)
        k_hi = tl.max(tl.where(k_valid, kr, -1), 0)
        useful = (k_lo <= q_hi) & ((k_lo < num_sink_tokens) | (q_lo - k_hi < window_length))
        if useful:
            kt = tl.load(
                k_base + cols[None, :] * stride_kt + d[:, None] * stride_kd,
                mask=col_ok[None, :] & (d[:, None] < HEAD_DIM),
                other=0.0,
            )
            vt = tl.load(
                V + b * stride_vb + kvh * stride_vh + cols[None, :] * stride_vt + dv[:, None] * stride_vd,
                mask=col_ok[None, :] & (dv[:, None] < HEAD_DIM_V),
                other=0.0,
            )
            p, is_sink = _bwd_scores(
                q,
                q_sink,
                kt,
                kr,
                k_valid,
                k_lo,
                qr,
                q_valid,
                lse2,
                num_sink_tokens,
                window_length,
                qk_scale,
                HAS_SHIFT,
                PRECISION,
            )
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SHIFT:
                if k_lo < num_sink_tokens:
                    ds_sink = tl.where(is_sink[None, :], ds, 0.0).to(kt.dtype)
                    ds = tl.where(is_sink[None, :], 0.0, ds)
                    k_half = tl.load(  # rotate_half(K) for the sink columns: partner channels, signed
                        k_base + cols[:, None] * stride_kt + partner[None, :] * stride_kd,
                        mask=col_ok[:, None] & in_rot[None, :],
                        other=0.0,
                    )
                    k_half = (sign[None, :] * k_half.to(tl.float32)).to(kt.dtype)
                    dq_sink += tl.dot(ds_sink, tl.trans(kt), input_precision=PRECISION)
                    dq_sink_half += tl.dot(ds_sink, k_half, input_precision=PRECISION)
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)

    if HAS_SHIFT:
        dq += cos * dq_sink - sin * dq_sink_half
    dq_ptrs = DQ + b * stride_dqb + h[:, None] * stride_dqh + t[:, None] * stride_dqt + d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * scaling).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------------- launchers
def unavailable_reason(device: torch.device) -> str | None:
    """Why these kernels cannot run on tensors of ``device`` (``None`` when they can)."""
    if INTERPRET != LANGUAGE_INTERPRETED:
        return (
            f"TRITON_INTERPRET was {'set' if INTERPRET else 'unset'} when hf_sinks.kernels.sink_attention was imported "
            f"but {'unset' if INTERPRET else 'set'} when triton itself was imported; set it before anything imports "
            f"triton (torch._dynamo does, and transformers / hf_sinks import it)"
        )
    if INTERPRET:
        return (
            None
            if device.type == "cpu"
            else (
                f"hf_sinks.kernels.sink_attention was imported with TRITON_INTERPRET=1, which runs on CPU tensors, "
                f"but the tensors are on {device}"
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


def _block_sizes(rows: int, cols: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): small tiles for decode and the interpreter, 64x64 otherwise."""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = min(64, max(16, triton.next_power_of_2(cols)))
    if INTERPRET:
        return block_m, min(block_n, 32), 1, 1
    if head_dim > 128 or dtype == torch.float32:
        block_n = min(block_n, 32)
    return block_m, block_n, 4, 2


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are multiplied exactly (tf32 would lose ~1e-3); fp16/bf16 dots are exact anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def rotation_tables(
    q_shift: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, Tq, rotary_dim / 2]`` (fp32) of the rotation ``R(-shift)`` that sink columns use.

    Angles are formed in fp64 (``shift * inv_freq`` is then exact to fp32 rounding for any shift)."""
    angles = -q_shift.to(torch.float64)[..., None] * inv_freq.to(device=q_shift.device, dtype=torch.float64)
    return angles.cos().float().contiguous(), angles.sin().float().contiguous()


def _num_splits(rows: int, block_m: int, batch_heads: int, tk: int, block_n: int, device: torch.device) -> int:
    """Flash-decoding: split the keys when the (query tile x batch x KV head) grid cannot fill the GPU."""
    if INTERPRET or device.type != "cuda":
        return 1
    programs = triton.cdiv(rows, block_m) * batch_heads
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(tk, 4 * block_n), 64))


def sink_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_real: torch.Tensor,
    k_real: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    sink_logits: torch.Tensor | None,
    num_sink_tokens: int,
    window_length: int,
    scaling: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: ``out [B, H, Tq, Dv]`` (``q.dtype``) and ``lse [B, H, Tq]`` (fp32, natural log).

    ``cos``/``sin`` from :func:`rotation_tables` (``None``: sink columns use the query as is). ``q_real``/``k_real``
    int tensors ``[B, Tq]``/``[B, Tk]``. ``num_splits`` forces the number of key splits (default: heuristic).
    """
    batch, heads, tq, head_dim = q.shape
    _, heads_kv, tk, _ = k.shape
    head_dim_v = v.shape[-1]
    groups = heads // heads_kv
    block_m, block_n, warps, stages = _block_sizes(tq * groups, tk, head_dim, q.dtype)
    splits = num_splits or _num_splits(tq * groups, block_m, batch * heads_kv, tk, block_n, q.device)
    cols_per_split = triton.cdiv(triton.cdiv(max(tk, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(tk, cols_per_split))

    out = q.new_empty(batch, heads, tq, head_dim_v)
    lse = torch.empty(batch, heads, tq, device=q.device, dtype=torch.float32)
    if splits > 1:
        o_dst = torch.empty(splits, batch, heads, tq, head_dim_v, device=q.device, dtype=torch.float32)
        l_dst = torch.empty(splits, batch, heads, tq, device=q.device, dtype=torch.float32)
        o_strides, l_strides = o_dst.stride(), l_dst.stride()
    else:
        o_dst, l_dst = out, lse
        o_strides, l_strides = (0, *out.stride()), (0, *lse.stride())
    has_shift = cos is not None
    cos_t = cos if has_shift else lse  # unused placeholders when there is no shift
    sin_t = sin if has_shift else lse
    half_rot = cos.shape[-1] if has_shift else 0
    c_strides = (cos.stride(0), cos.stride(1)) if has_shift else (0, 0)
    grid = (triton.cdiv(tq * groups, block_m), batch * heads_kv, splits)
    _sink_attn_fwd_kernel[grid](
        q,
        k,
        v,
        q_real,
        k_real,
        cos_t,
        sin_t,
        sink_logits if sink_logits is not None else lse,
        o_dst,
        l_dst,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *q_real.stride(),
        *k_real.stride(),
        *c_strides,
        *o_strides,
        *l_strides,
        tq,
        tk,
        heads_kv,
        cols_per_split,
        num_sink_tokens,
        window_length,
        half_rot,
        scaling * _LOG2E,
        GROUPS=groups,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_SHIFT=has_shift,
        HAS_SINK_LOGITS=sink_logits is not None,
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        rows = batch * heads * tq
        o_p, l_p = o_dst.view(splits, rows, head_dim_v), l_dst.view(splits, rows)
        o_flat, l_flat = out.view(rows, head_dim_v), lse.view(rows)
        _sink_attn_combine_kernel[(rows,)](
            o_p,
            l_p,
            o_flat,
            l_flat,
            *o_p.stride(),
            *l_p.stride(),
            *o_flat.stride(),
            l_flat.stride(0),
            splits,
            HEAD_DIM_V=head_dim_v,
            BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
            num_warps=1,
        )
    return out, lse


def sink_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_real: torch.Tensor,
    k_real: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    sink_logits: torch.Tensor | None,
    num_sink_tokens: int,
    window_length: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward: ``dq, dk, dv`` (input dtypes) and ``d sink_logits`` (``None`` without sink logits)."""
    batch, heads, tq, head_dim = q.shape
    _, heads_kv, tk, _ = k.shape
    head_dim_v = v.shape[-1]
    groups = heads // heads_kv
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    do = do.contiguous()
    out = out.contiguous()

    delta = torch.empty(batch, heads, tq, device=q.device, dtype=torch.float32)
    rows = batch * heads * tq
    block_r = 16 if INTERPRET else 64
    o_flat, do_flat = out.view(rows, head_dim_v), do.view(rows, head_dim_v)
    _sink_attn_bwd_preprocess_kernel[(triton.cdiv(rows, block_r),)](
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
    has_shift = cos is not None
    cos_t = cos if has_shift else lse
    sin_t = sin if has_shift else lse
    half_rot = cos.shape[-1] if has_shift else 0
    c_strides = (cos.stride(0), cos.stride(1)) if has_shift else (0, 0)
    common = dict(
        GROUPS=groups,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        HAS_SHIFT=has_shift,
        PRECISION=_precision(q.dtype),
    )
    if INTERPRET:
        block_m, block_n, warps, stages = 32, 32, 1, 1
    else:
        block_m, block_n = (32, 32) if (head_dim > 64 or q.dtype == torch.float32) else (64, 64)
        warps, stages = 4, 1
    scalars = (tq, tk, heads_kv, num_sink_tokens, window_length, half_rot, scaling * _LOG2E, scaling)
    strides = (
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        *lse.stride(),
        *q_real.stride(),
        *k_real.stride(),
        *c_strides,
    )
    _sink_attn_bwd_dkdv_kernel[(triton.cdiv(tk, block_n), batch * heads_kv)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        q_real,
        k_real,
        cos_t,
        sin_t,
        dk,
        dv,
        *strides,
        *dk.stride(),
        *dv.stride(),
        *scalars,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
        **common,
    )
    _sink_attn_bwd_dq_kernel[(triton.cdiv(tq * groups, block_m), batch * heads_kv)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        q_real,
        k_real,
        cos_t,
        sin_t,
        dq,
        *strides,
        *dq.stride(),
        *scalars,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
        **common,
    )

    dsink = None
    if sink_logits is not None:
        # d lse / d sink = exp(sink - lse); d out / d sink = -exp(sink - lse) * out  =>  sum of -exp(sink - lse) * delta
        weight = torch.exp(sink_logits.float()[None, :, None] - lse)  # rows that see nothing: lse = -inf -> inf
        valid = (q_real >= 0)[:, None, :] & torch.isfinite(lse)
        dsink = -(torch.where(valid, weight * delta, torch.zeros_like(delta))).sum((0, 2)).to(sink_logits.dtype)
    return dq, dk, dv, dsink


class SinkAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward both in Triton (``lse`` is returned but not differentiable)."""

    @staticmethod
    def forward(
        ctx, q, k, v, q_real, k_real, cos, sin, sink_logits, num_sink_tokens, window_length, scaling, num_splits=None
    ):
        out, lse = sink_attn_fwd(
            q, k, v, q_real, k_real, cos, sin, sink_logits, num_sink_tokens, window_length, scaling, num_splits
        )
        ctx.save_for_backward(q, k, v, out, lse, q_real, k_real, cos, sin, sink_logits)
        ctx.params = (num_sink_tokens, window_length, scaling)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, q_real, k_real, cos, sin, sink_logits = ctx.saved_tensors
        dq, dk, dv, dsink = sink_attn_bwd(dout, q, k, v, out, lse, q_real, k_real, cos, sin, sink_logits, *ctx.params)
        return dq, dk, dv, None, None, None, None, dsink, None, None, None, None


def sink_attention(
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
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink+window attention in Triton (differentiable in ``q``, ``k``, ``v`` and ``sink_logits``).

    Args:
        q: ``[B, H, Tq, D]`` queries as the model rotated them. k: ``[B, H_kv, Tk, D]``; v: ``[B, H_kv, Tk, Dv]``
            (``H`` a multiple of ``H_kv``; never repeated). Any strides.
        q_real, k_real: ``[B, Tq]`` / ``[B, Tk]`` integer real-token indices, ``-1`` for padding / empty slots.
        q_shift: ``[B, Tq]`` integer shifts; sink columns see the query rotated back by ``shift`` positions.
            ``None``: no rotation (e.g. decode, where the cache already shifted the sinks).
        num_sink_tokens, window_length: ``S`` and ``W`` of the visibility rule.
        inv_freq: ``[rotary_dim / 2]`` RoPE inverse frequencies; rotary_dim: rotated channels (``<= D``, even).
        scaling: softmax scale (default ``D ** -0.5``).
        sink_logits: optional ``[H]`` learned per-head sink logits (gpt-oss style).
        num_splits: force the number of key splits of the forward (testing; default: heuristic).

    Returns:
        ``(out [B, H, Tq, Dv] in q.dtype, lse [B, H, Tq] fp32)``; padding queries give zeros and ``lse = -inf``.

    Raises:
        RuntimeError: when the kernels cannot run on these tensors (see :func:`unavailable_reason`).
    """
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"hf_sinks Triton sink attention cannot run: {reason}.")
    _check_inputs(q, k, v, q_real, k_real, q_shift, inv_freq, rotary_dim, sink_logits)
    scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    cos = sin = None
    if q_shift is not None and num_sink_tokens > 0 and rotary_dim > 0:
        cos, sin = rotation_tables(q_shift.to(q.device), inv_freq, rotary_dim)
    q_real = q_real.to(device=q.device, dtype=torch.int32)
    k_real = k_real.to(device=q.device, dtype=torch.int32)
    return SinkAttentionFunction.apply(
        q, k, v, q_real, k_real, cos, sin, sink_logits, int(num_sink_tokens), int(window_length), scaling, num_splits
    )


def _check_inputs(q, k, v, q_real, k_real, q_shift, inv_freq, rotary_dim, sink_logits) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, tq, head_dim = q.shape
    if k.shape[0] != batch or k.shape[-1] != head_dim or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if heads % k.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if tuple(q_real.shape) != (batch, tq) or tuple(k_real.shape) != (batch, k.shape[2]):
        raise ValueError(f"q_real {tuple(q_real.shape)} / k_real {tuple(k_real.shape)} must be [B, Tq] / [B, Tk]")
    if q_shift is not None:
        if tuple(q_shift.shape) != (batch, tq):
            raise ValueError(f"q_shift must be [B, Tq] = {(batch, tq)}; got {tuple(q_shift.shape)}")
        if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim ({head_dim}); got {rotary_dim}")
        if rotary_dim and (inv_freq is None or inv_freq.numel() != rotary_dim // 2):
            raise ValueError(f"inv_freq must have rotary_dim / 2 = {rotary_dim // 2} entries")
    if sink_logits is not None and tuple(sink_logits.shape) != (heads,):
        raise ValueError(f"sink_logits must be [H] = [{heads}]; got {tuple(sink_logits.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if math.prod(q.shape) == 0:
        raise ValueError("empty inputs")
