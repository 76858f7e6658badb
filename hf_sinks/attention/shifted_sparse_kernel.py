"""Shifted sparse attention (S²-Attn / SF-Attn) on the best backend: the Triton kernel
``hf_sinks.kernels.shifted_sparse_attention`` on CUDA, a pure-PyTorch twin elsewhere.

Visibility (the kernel module's docstring is the reference), per row and query head ``h``, on real-token indices::

    query i sees key j  iff  j <= i  and ( j < S  or  floor((i + off_h) / G) == floor((j + off_h) / G) )

with ``off_h = 0`` for ``h < first_shifted_head`` (default ``H // 2``) and ``G // 2`` for the other heads; an
optional ``sliding_window`` further requires ``i - j < sliding_window`` for group keys (sinks exempt). Padding: the
real tokens of row ``b`` are the columns ``[valid_start[b], valid_end[b])`` (or a ``key_padding_mask`` with one
contiguous run of real tokens per row: left or right padding); padding queries give zeros and ``lse = -inf``.

The PyTorch twin (:func:`shifted_sparse_attention_torch`) cuts the (real-aligned) sequence into half-groups of
``P = G / 2`` tokens: both partitions are unions of half-groups, so the group keys of a query in half-group ``n``
all lie in half-groups ``n - 1`` and ``n``. Every query block therefore scores ``2P = G`` local keys plus the ``S``
sinks (a sink already among its local keys is counted there, once): memory ``O(B H T (G + S))``, never ``T x T``,
K/V never repeated for GQA, differentiable by autograd. Query half-groups are processed in chunks bounded by
:data:`CHUNK_ELEMENTS` scores.

Backend selection (:func:`select_backend`), environment toggles read at every call:

=========================== ===========================================================================
``HF_SINKS_DISABLE_TRITON=1`` always use the PyTorch fallback
``HF_SINKS_FORCE_TRITON=1``   always use Triton; raise a ``RuntimeError`` naming the reason if it cannot run
=========================== ===========================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.shifted_sparse_checks import check_inputs
from . import triton as _triton

KERNELS_MODULE = "hf_sinks.kernels.shifted_sparse_attention"
#: Scores per chunk of query half-groups in the PyTorch fallback (bounds the temporaries of one step).
CHUNK_ELEMENTS = 1 << 24

__all__ = [
    "padding_bounds",
    "select_backend",
    "dispatch_shifted_sparse_attention",
    "shifted_sparse_attention_torch",
    "triton_unavailable_reason",
]


# ----------------------------------------------------------------------------------------------- dispatch
def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton shifted sparse kernels cannot run on ``device`` here (``None`` when they can)."""
    return _triton.triton_unavailable_reason(device, KERNELS_MODULE)


def select_backend(device: torch.device | str, backend: str = "auto") -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``backend="auto"`` takes Triton where it can run and the PyTorch fallback otherwise; ``backend="triton"`` (or
    ``HF_SINKS_FORCE_TRITON=1``) raises a ``RuntimeError`` naming the reason when Triton cannot run.
    """
    return _triton.select_backend(device, backend, KERNELS_MODULE, "shifted sparse attention")


def padding_bounds(key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid_start, valid_end)`` int ``[B]`` of a ``[B, T]`` mask (True/1 = real token) with one contiguous run of
    real tokens per row (left or right padding; an all-padding row gives ``0, 0``)."""
    if key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must be [B, T]; got {tuple(key_padding_mask.shape)}")
    valid = key_padding_mask.bool()
    length = valid.shape[1]
    count = valid.sum(1)
    start = valid.int().argmax(1)
    end = length - valid.flip(1).int().argmax(1)
    start = torch.where(count > 0, start, torch.zeros_like(start))
    end = torch.where(count > 0, end, torch.zeros_like(end))
    bad = (end - start) != count
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"key_padding_mask row {row} is not one contiguous run of real tokens (only left or right padding is "
            f"supported); pack the real tokens of each row together first"
        )
    return start, end


def dispatch_shifted_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    num_sink_tokens: int = 0,
    scaling: float | None = None,
    sink_logits: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    valid_start: torch.Tensor | None = None,
    valid_end: torch.Tensor | None = None,
    first_shifted_head: int | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """S²-Attn (``num_sink_tokens=0``) / SF-Attn on the best available backend (differentiable in q, k, v and
    ``sink_logits``).

    Args:
        q: ``[B, H, T, D]``; k: ``[B, H_kv, T, D]``; v: ``[B, H_kv, T, Dv]`` (GQA: query head ``h`` uses KV head
            ``h // (H / H_kv)``).
        group_size: ``G``, even, ``>= 2``; ``num_sink_tokens``: ``S >= 0``; scaling: default ``D ** -0.5``.
        sink_logits: optional ``[H]`` learned per-head sink logits (gpt-oss style).
        key_padding_mask: optional ``[B, T]`` (True/1 = real), one contiguous run per row; or give
            ``valid_start``/``valid_end`` ``[B]`` directly (not both).
        first_shifted_head: heads ``>=`` it are shifted (default ``H // 2``); sliding_window: optional.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`select_backend`).

    Returns:
        ``(out [B, H, T, Dv] in q.dtype, lse [B, H, T] fp32)``.
    """
    check_inputs(
        q, k, v, group_size, num_sink_tokens, sink_logits, valid_start, valid_end, first_shifted_head, sliding_window
    )
    if key_padding_mask is not None:
        if valid_start is not None or valid_end is not None:
            raise ValueError("give either key_padding_mask or valid_start/valid_end, not both")
        if tuple(key_padding_mask.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(
                f"key_padding_mask must be [B, T] = {(q.shape[0], q.shape[2])}; got {tuple(key_padding_mask.shape)}"
            )
        valid_start, valid_end = padding_bounds(key_padding_mask)
    args = (
        q,
        k,
        v,
        group_size,
        num_sink_tokens,
        scaling,
        sink_logits,
        valid_start,
        valid_end,
        first_shifted_head,
        sliding_window,
    )
    if select_backend(q.device, backend) == "triton":
        from hf_sinks.kernels.shifted_sparse_attention import shifted_sparse_attention as triton_attention

        return triton_attention(*args)
    return shifted_sparse_attention_torch(*args)


# ------------------------------------------------------------------------------------------ PyTorch twin
def shifted_sparse_attention_torch(
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
    """The PyTorch twin of ``hf_sinks.kernels.shifted_sparse_attention.shifted_sparse_attention`` (same arguments,
    same results; softmax in fp32, or the input dtype if wider). See the module docstring for the blocking."""
    check_inputs(
        q, k, v, group_size, num_sink_tokens, sink_logits, valid_start, valid_end, first_shifted_head, sliding_window
    )
    batch, heads, length, head_dim = q.shape
    heads_kv = k.shape[1]
    groups = heads // heads_kv
    scaling = head_dim**-0.5 if scaling is None else float(scaling)
    compute = torch.promote_types(q.dtype, torch.float32)
    device = q.device
    first = heads // 2 if first_shifted_head is None else first_shifted_head
    window = length + 1 if sliding_window is None else sliding_window
    g = group_size
    p = g // 2

    start = (
        torch.zeros(batch, dtype=torch.long, device=device) if valid_start is None else valid_start.to(device).long()
    )
    end = (
        torch.full((batch,), length, dtype=torch.long, device=device)
        if valid_end is None
        else valid_end.to(device).long()
    )
    real_len = (end - start).clamp(min=0)  # real tokens of each row, aligned to column 0 below
    aligned = bool((start != 0).any())
    if aligned:  # move each row's real tokens to the front (differentiable gathers), put them back at the end
        idx = (torch.arange(length, device=device)[None] + start[:, None]).clamp(max=length - 1)
        q, k, v = (x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])) for x in (q, k, v))

    n_blocks = -(-length // p)
    padded = n_blocks * p
    qb = F.pad(q, (0, 0, 0, padded - length)).to(compute).view(batch, heads_kv, groups, n_blocks, p, head_dim)
    kb = F.pad(k, (0, 0, 0, padded - length)).to(compute).view(batch, heads_kv, n_blocks, p, head_dim)
    vb = F.pad(v, (0, 0, 0, padded - length)).to(compute).view(batch, heads_kv, n_blocks, p, v.shape[-1])
    # local keys of query half-group n: half-groups n - 1 and n (a zero half-group before the first)
    k_local = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb], dim=3)  # [B, Hkv, n, G, D]
    v_local = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb], dim=3)
    sinks = min(num_sink_tokens, length)
    k_sink, v_sink = k[:, :, :sinks].to(compute), v[:, :, :sinks].to(compute)

    off = torch.where(torch.arange(heads, device=device) >= first, p, 0)  # [H]
    out_chunks, lse_chunks = [], []
    per_block = batch * heads * p * (g + sinks + 1)
    step = max(1, CHUNK_ELEMENTS // per_block)
    for n0 in range(0, n_blocks, step):
        n1 = min(n_blocks, n0 + step)
        blocks = torch.arange(n0, n1, device=device)
        qi = blocks[:, None] * p + torch.arange(p, device=device)[None]  # [n, P] real query index
        kj = blocks[:, None] * p - p + torch.arange(g, device=device)[None]  # [n, G] real key index
        q_ok = qi[None] < real_len[:, None, None]  # [B, n, P]
        k_ok = (kj[None] >= 0) & (kj[None] < real_len[:, None, None])  # [B, n, G]
        same = ((qi[None] + off[:, None, None]) // g)[..., None] == ((kj[None] + off[:, None, None]) // g)[..., None, :]
        near = (qi[:, :, None] - kj[:, None, :]) < window
        causal = kj[:, None, :] <= qi[:, :, None]  # [n, P, G]
        local = (same & near) | (kj[:, None, :] < num_sink_tokens)  # [H, n, P, G]
        visible = (causal & local)[None] & q_ok[:, None, :, :, None] & k_ok[:, None, :, None, :]  # [B, H, n, P, G]

        q_c = qb[:, :, :, n0:n1]
        scores = torch.einsum("bkgnpd,bknjd->bkgnpj", q_c, k_local[:, :, n0:n1]) * scaling
        scores = scores.reshape(batch, heads, n1 - n0, p, g).masked_fill(~visible, float("-inf"))
        parts = [scores]
        if sinks:  # sinks before the local half-groups (a sink among the local keys is counted there)
            j = torch.arange(sinks, device=device)
            sink_vis = (
                (j[None, :] < (blocks[:, None] * p - p))[None, :, None, :]
                & q_ok[..., None]
                & (j < real_len[:, None])[:, None, None, :]
            )  # [B, n, P, S]
            s_sink = torch.einsum("bkgnpd,bksd->bkgnps", q_c, k_sink) * scaling
            s_sink = s_sink.reshape(batch, heads, n1 - n0, p, sinks).masked_fill(~sink_vis[:, None], float("-inf"))
            parts.append(s_sink)
        if sink_logits is not None:
            column = sink_logits.to(compute)[None, :, None, None, None].expand(batch, heads, n1 - n0, p, 1)
            parts.append(column.masked_fill(~q_ok[:, None, :, :, None], float("-inf")))
        scores = torch.cat(parts, dim=-1) if len(parts) > 1 else scores

        top = scores.detach().amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.exp(scores - top)
        total = weights.sum(-1, keepdim=True)
        empty = total == 0
        weights = weights / torch.where(empty, torch.ones_like(total), total)
        w = weights[..., :g].reshape(batch, heads_kv, groups, n1 - n0, p, g)
        out = torch.einsum("bkgnpj,bknje->bkgnpe", w, v_local[:, :, n0:n1])
        if sinks:
            w_sink = weights[..., g : g + sinks].reshape(batch, heads_kv, groups, n1 - n0, p, sinks)
            out = out + torch.einsum("bkgnps,bkse->bkgnpe", w_sink, v_sink)
        out_chunks.append(out.reshape(batch, heads, (n1 - n0) * p, -1))
        lse = (top + torch.log(torch.where(empty, torch.ones_like(total), total))).masked_fill(empty, float("-inf"))
        lse_chunks.append(lse.reshape(batch, heads, (n1 - n0) * p))

    out = torch.cat(out_chunks, dim=2)[:, :, :length]
    lse = torch.cat(lse_chunks, dim=2)[:, :, :length].float()
    if aligned:  # back to the original columns: column t holds real token t - start
        back = torch.arange(length, device=device)[None] - start[:, None]
        real = (back >= 0) & (back < real_len[:, None])
        back = back.clamp(0, length - 1)
        out = out.gather(2, back[:, None, :, None].expand_as(out)) * real[:, None, :, None]
        lse = lse.gather(2, back[:, None, :].expand_as(lse)).masked_fill(~real[:, None, :], float("-inf"))
    return out.to(q.dtype), lse
