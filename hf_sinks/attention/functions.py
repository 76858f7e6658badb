"""The registered ``sink_*`` attention functions (``AttentionInterface``).

With a :class:`~hf_sinks.cache.SinkCache` they apply the exact visibility rule and cache-relative positions of
docs/design.md §2.1, §2.2 from the cache layer's per-slot bookkeeping:

* decode (one token, already written in place by the cache): shift the ``S`` sink keys to the query (O(S)), then
  one attention call over the resident slots;
* a multi-token chunk (prompt, multi-turn, chunked prefill): every query needs its own sink shift. The sink part of
  the scores uses a query rotated back by that shift, the window part the query as is; both go through *one*
  attention call by stacking them along the head dimension (``[q | q_sink] . [k*window | k*sink]``). Queries are
  processed in blocks over only the keys they can see, so memory is bounded by the block, never the prompt.

Without a ``SinkCache`` they defer to the stock transformers implementation of the same kernel.

Each cache layer follows its own rule (docs/design.md §2.3, :mod:`hf_sinks.layers`): the first call of a layer binds
it from the module (its config, ``layer_idx`` and the ``sliding_window`` the model hands its attention), so a
sliding layer whose window fits the cache attends natively and a layer without RoPE is never shifted.

Learned per-head sink logits join every softmax as one extra term per head (:func:`with_sink_logits`; not
``sink_flex``): hf_sinks' own ``module.sink_logits`` (:mod:`hf_sinks.attention.sink_logits`), with and without a
cache, and a model's native ones passed as the ``s_aux`` keyword (gpt-oss ``sinks``) with a cache (without one,
the model's stock function applies them itself). Logit soft-capping (the ``softcap`` keyword, Gemma 2) is applied
to every score before masking, as the model's eager attention does; the SDPA and flex kernels cannot, so a layer
with ``softcap`` runs the eager kernel.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..cache import SinkCacheLayer
from ..cache_layers import layer_of
from ..layers import LayerRule, layer_rules, rule_for
from ..models import check_config
from ..rope import layer_rotaries, shift_rotary
from ..visibility import sink_visible
from .masks import new_token_validity, stock_mask
from .preamble import default_scaling, refuse_dropout, to_model_layout
from .sink_logits import sink_logits_of

#: Queries per block in multi-token chunks: bounds the score matrix to ``BLOCK x (S + 2W + BLOCK)``.
QUERY_BLOCK = 512


# ----------------------------------------------------------------------------------------------- kernels
def _sdpa_kernel(q, k, v, mask, scaling, dropout, want_weights):
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    return out, None


def _eager_kernel(q, k, v, mask, scaling, dropout, want_weights, softcap=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scaling
    if softcap is not None:  # Gemma 2's attn_logit_softcapping, as its eager attention applies it
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return weights @ v, (weights if want_weights else None)


@functools.lru_cache(maxsize=None)
def _flex(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # compiled flex is the fused kernel; on CPU torch's Inductor flex is wrong at head_dim <= 16, so stay eager
    return torch.compile(flex_attention, dynamic=True) if compiled else flex_attention


def _flex_kernel(q, k, v, mask, scaling, dropout, want_weights):
    flex_attention = _flex(q.is_cuda)

    refuse_dropout(dropout, "sink_flex", "use sink_sdpa or sink_eager for training")
    score_mod = None
    if mask is not None:
        full = mask.expand(q.shape[0], 1, q.shape[2], k.shape[2])

        def score_mod(score, b, h, qi, ki):
            return torch.where(full[b, 0, qi, ki], score, -float("inf"))

    gqa = q.shape[1] != k.shape[1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the cache hands out strided views of its slots
    return flex_attention(q, k, v, score_mod=score_mod, scale=scaling, enable_gqa=gqa), None


def with_sink_logits(kernel: Callable, sink_logits: torch.Tensor | None) -> Callable:
    """``kernel`` with learned per-head sink logits (gpt-oss style): one extra softmax term per head, no value.

    Exact and differentiable through any of the kernels above: one extra key column whose score is the head's logit.
    GQA shares keys between query heads, so the logit rides on the *query*: ``q' = [q | b_h / scaling]``,
    ``k' = [k | 0]`` plus one key ``[0 .. 0 | 1]`` with a zero value, always visible. ``None``: ``kernel`` itself.
    """
    if sink_logits is None:
        return kernel

    def kernel_with_sink_logits(q, k, v, mask, scaling, dropout, want_weights):
        batch, heads, q_len, _ = q.shape
        column = (sink_logits.to(q.dtype) / scaling)[None, :, None, None].expand(batch, heads, q_len, 1)
        q = torch.cat([q, column], dim=-1)
        k = F.pad(F.pad(k, (0, 1)), (0, 0, 0, 1))
        k[..., -1, -1] = 1.0
        v = F.pad(v, (0, 0, 0, 1))
        if mask is not None:
            mask = F.pad(mask, (0, 1), value=True)
        out, weights = kernel(q, k, v, mask, scaling, dropout, want_weights)
        return out, (weights[..., :-1] if weights is not None else None)

    return kernel_with_sink_logits


def _boolean_mask(mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """A stock dense mask (``None`` = causal, bool, or additive float) as a ``[B|1, 1, q, k]`` bool mask."""
    if mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
    mask = mask[..., :k_len]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def with_softcap(kernel: Callable, softcap: float | None) -> Callable:
    """``kernel``, or the eager kernel with logit soft-capping when ``softcap`` is set (SDPA/flex cannot cap)."""
    if softcap is None:
        return kernel
    return functools.partial(_eager_kernel, softcap=float(softcap))


# ------------------------------------------------------------------------------------- stock fallbacks
def _stock_sdpa(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _stock_eager(module, query, key, value, attention_mask, **kwargs):
    # Each modeling file defines its own eager function; use the model's, so "no SinkCache" means "exactly eager".
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return eager(module, query, key, value, attention_mask, **kwargs)


def _stock_flex(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.flex_attention import flex_attention_forward

    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def without_sink_cache(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float,
    scaling: float | None,
    sink_logits: torch.Tensor | None,
    stock: Callable = _stock_sdpa,
    kernel: Callable | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An hf_sinks attention without a SinkCache: exactly ``stock`` on the stock dense mask; with learned sink
    logits (which ``stock`` cannot apply), ``kernel`` (default SDPA) on the same mask plus the sink logit column."""
    dense = stock_mask(attention_mask)
    if sink_logits is None:
        return stock(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    mask = _boolean_mask(dense, query.shape[2], key.shape[2], query.device)
    out, weights = with_sink_logits(kernel or _sdpa_kernel, sink_logits)(
        query, key, value, mask, default_scaling(query, scaling), dropout, bool(kwargs.get("output_attentions", False))
    )
    return to_model_layout(out), weights


# ----------------------------------------------------------------------------------- sink attention
def bind_layer_rule(layer: SinkCacheLayer, module: torch.nn.Module, kwargs: dict) -> LayerRule:
    """The layer's rule (docs/design.md §2.3); bound on its first call from the module the model hands us."""
    cache = layer.cache
    if layer.rule_bound and cache._rotary_bound:
        return layer.rule
    if not cache._rotary_bound:  # once per cache: rules from the model's config, checked against the cache's own
        try:
            modeling = sys.modules.get(type(module).__module__)
            rotaries = layer_rotaries(module.config, modeling=modeling)
            rules = layer_rules(module.config, cache.num_sink_tokens, cache.window_length, rotaries)
        except (AttributeError, KeyError, TypeError):  # TypeError: hf_sinks' "not a config" (SinkTypeError)
            if cache.rotary is None and not cache.rules_known:
                raise
            rules = None  # a bare module with no model config: only the cache's parameters are known
        if rules is not None:
            cache.bind_rules(rules)
    idx = getattr(module, "layer_idx", None)
    rule = cache.rule_of(idx) if idx is not None else None
    if rule is None:
        rule = LayerRule(cache.num_sink_tokens, cache.window_length, cache.rotary)
    elif "sliding_window" in kwargs and (kwargs["sliding_window"] or None) != rule.sliding_window:
        # the window the model itself applies in this layer wins over what its config suggests
        rule = rule_for(cache.num_sink_tokens, cache.window_length, rule.rotary, kwargs["sliding_window"] or None)
    layer.configure(rule)
    return layer.rule


def prepare_decode(layer: SinkCacheLayer, positions: torch.Tensor | None) -> torch.Tensor:
    """Decode step (the token is already in its slot): shift the sinks to the query; returns its real index ``[B]``."""
    batch = layer.real_seen.shape[0]
    rows = torch.arange(batch, device=layer.device)
    real = layer.real_seen - 1
    slot = layer.slot_of(real)
    if positions is not None:  # trust the model's positions over the cache's default guess
        layer.set_decode_position(rows, slot, positions[:, -1].to(layer.device).expand(batch))
    layer.place_sinks(layer.sink_shift_for(real, layer.positions[rows, slot]))
    return real


def _decode(layer, query, key, value, positions, kernel, scaling, dropout, want_weights, sink_logits=None):
    kernel = with_sink_logits(kernel, sink_logits)
    if layer.prepare_decode_fast(positions):
        # rows in lockstep, no padding: slot, position and sink shift were Python ints and no filled slot is empty,
        # so no mask and no host sync (docs/design.md §4.1)
        return kernel(query, key, value, None, scaling, dropout, want_weights)
    prepare_decode(layer, positions)
    valid = layer.real_idx[:, : layer.filled] >= 0
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    return kernel(query, key, value, mask, scaling, dropout, want_weights)


class ChunkInfo(NamedTuple):
    """Per-row bookkeeping of a multi-token chunk over ``stored + q`` key columns (``-1``: padding / empty slot)."""

    q_real: torch.Tensor  # [B, q] real-token index of each query
    k_real: torch.Tensor  # [B, stored + q] real-token index of each key column
    positions: torch.Tensor  # [B, q] rotation positions of the new tokens (what ``layer.commit`` stores)
    shift: torch.Tensor  # [B, q] how far each query is rotated back when it scores the sink columns


def prepare_chunk(
    layer: SinkCacheLayer, key: torch.Tensor, positions: torch.Tensor | None, valid: torch.Tensor | None
) -> ChunkInfo:
    """Bookkeeping of a pending chunk; also restores the original sink keys in ``key`` (a fresh concatenation).

    The sink slots may hold a copy shifted for the previous query; sink columns must start from the originals.
    """
    batch, q = key.shape[0], key.shape[2] - layer.filled
    s, stored = layer.num_sink_tokens, layer.filled
    real_new = layer.new_token_indices(valid, q)  # [B, q], -1 for padding
    if positions is None:  # the model did not pass position_ids on (Persimmon)
        positions = layer.new_token_positions(real_new)
    positions = positions.to(layer.device).expand(batch, q)
    col_real = torch.cat([layer.real_idx[:, :stored], real_new], dim=-1)  # [B, n]

    n_sink_slots = min(s, stored)
    if n_sink_slots:
        key[:, :, :n_sink_slots] = layer.sink_keys[:, :, :n_sink_slots].to(key.dtype)
    if stored:
        sink_offset = layer.sink_offset()
    else:  # sinks arrive in this chunk: offset of its first real token
        first = (real_new >= 0).long().argmax(-1)
        rows = torch.arange(batch, device=layer.device)
        sink_offset = positions[rows, first] - real_new[rows, first].clamp(min=0)
    shift = positions - layer.query_cache_positions(real_new.clamp(min=0)) - sink_offset[:, None]
    return ChunkInfo(real_new, col_real, positions, shift)


def _chunk(
    layer, query, key, value, positions, valid, rotary, kernel, scaling, dropout, want_weights, sink_logits=None
):
    kernel = with_sink_logits(kernel, sink_logits)
    batch, _, q, _ = query.shape
    s, w = layer.num_sink_tokens, layer.window_length
    stored = layer.filled
    real_new, col_real, positions, shift = prepare_chunk(layer, key, positions, valid)

    is_sink = (col_real >= 0) & (col_real < s)
    is_window = col_real >= s
    if s and bool(is_sink.any()):
        q_sink = shift_rotary(query, -shift[:, None, :], rotary)
        query = torch.cat([query, q_sink], dim=-1)
        key = torch.cat([key * is_window[:, None, :, None], key * is_sink[:, None, :, None]], dim=-1)

    pads = 0 if valid is None else int((~valid.bool()).sum(-1).max())
    outs, weights = [], []
    for t0 in range(0, q, QUERY_BLOCK):
        t1 = min(q, t0 + QUERY_BLOCK)
        cols = _block_columns(stored, q, t0, t1, s, w, pads, layer.device)
        k_blk = key if cols is None else key.index_select(2, cols)
        v_blk = value if cols is None else value.index_select(2, cols)
        c_real = col_real if cols is None else col_real.index_select(1, cols)
        c_idx = torch.arange(stored + q, device=layer.device) if cols is None else cols
        r_q = real_new[:, t0:t1, None]  # [B, b, 1]
        visible = sink_visible(r_q, c_real[:, None, :], s, w)
        # padding queries attend to themselves only (their output is never used; avoids empty softmax rows)
        own = c_idx[None, None, :] == (stored + torch.arange(t0, t1, device=layer.device))[None, :, None]
        visible = torch.where(r_q < 0, own, visible)
        out, wts = kernel(query[:, :, t0:t1], k_blk, v_blk, visible[:, None], scaling, dropout, want_weights)
        outs.append(out)
        if wts is not None:
            full = wts.new_zeros(*wts.shape[:-1], stored + q)
            weights.append(full.index_copy_(-1, c_idx, wts) if cols is not None else wts)
    layer.commit(valid, positions)
    return torch.cat(outs, dim=2), (torch.cat(weights, dim=2) if weights else None)


def _block_columns(stored, q, t0, t1, s, w, pads, device):
    """Key columns queries ``t0..t1-1`` of a chunk can see (stored slots + chunk sinks + chunk window)."""
    sink_hi = min(q, pads + s)
    lo = max(sink_hi, t0 - w + 1 - pads)
    if stored + sink_hi + (t1 - lo) >= stored + q:
        return None  # (almost) everything: skip the gather
    return torch.cat(
        [
            torch.arange(stored + sink_hi, device=device),
            stored + torch.arange(lo, t1, device=device),
        ]
    )


def make_sink_attention_forward(
    kernel: Callable | None, stock: Callable, name: str, decode: Callable = _decode, chunk: Callable = _chunk
) -> Callable:
    """The ``AttentionInterface`` function ``name``: ``stock`` without a SinkCache, else ``decode``/``chunk``.

    ``decode``/``chunk`` receive ``kernel`` (an SDPA-like callable taking a dense mask); backends that call their
    own kernel (``sink_triton``) pass ``kernel=None`` with their own ``decode``/``chunk``."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_config(module.config)
        layer = layer_of(key, SinkCacheLayer)
        sink_logits = sink_logits_of(module, query.shape[1])
        if sink_logits is not None and name == "sink_flex":
            raise ValueError(
                f"{type(module).__name__}.sink_logits (learned sink logits) is set, which sink_flex does not support; "
                "use sink_sdpa, sink_eager or sink_triton."
            )
        if layer is None:  # no SinkCache: exactly the stock implementation
            return without_sink_cache(
                module, query, key, value, attention_mask, dropout, scaling, sink_logits, stock, kernel, **kwargs
            )

        layer.acknowledge()
        rotary = bind_layer_rule(layer, module, kwargs).rotary
        if sink_logits is None and kwargs.get("s_aux") is not None:  # the model's own learned sinks (gpt-oss)
            sink_logits = kwargs["s_aux"]
            if name == "sink_flex":
                raise ValueError("sink_flex does not support learned sink logits (s_aux); use sink_sdpa or sink_eager.")
        softcap = kwargs.get("softcap")
        if softcap is not None:
            if sink_logits is not None:
                raise ValueError("hf_sinks cannot combine logit soft-capping (softcap) with learned sink logits.")
            if kernel is None:
                raise ValueError(f"{name} does not support logit soft-capping (softcap={softcap}); use sink_eager.")
        run_kernel = with_softcap(kernel, softcap)
        scaling = default_scaling(query, scaling)
        positions = kwargs.get("position_ids")
        want_weights = bool(kwargs.get("output_attentions", False))
        if layer.pending is None:
            out, weights = decode(
                layer, query, key, value, positions, run_kernel, scaling, dropout, want_weights, sink_logits=sink_logits
            )
        else:
            valid = new_token_validity(attention_mask, query.shape[2])
            out, weights = chunk(
                layer,
                query,
                key,
                value,
                positions,
                valid,
                rotary,
                run_kernel,
                scaling,
                dropout,
                want_weights,
                sink_logits=sink_logits,
            )
        return to_model_layout(out), weights

    attention.__name__ = attention.__qualname__ = f"{name}_attention_forward"
    attention.__doc__ = f"``attn_implementation={name!r}``: sink+window attention (see hf_sinks.attention.functions)."
    return attention


sink_sdpa_attention_forward = make_sink_attention_forward(_sdpa_kernel, _stock_sdpa, "sink_sdpa")
sink_eager_attention_forward = make_sink_attention_forward(_eager_kernel, _stock_eager, "sink_eager")
sink_flex_attention_forward = make_sink_attention_forward(_flex_kernel, _stock_flex, "sink_flex")
