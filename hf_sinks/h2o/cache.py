"""`H2OCache` / `H2OCacheLayer`: sinks + window + heavy hitters per layer and KV head (see :mod:`hf_sinks.h2o`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from ..cache_layers import RowStateLayer, grow_layers, refuse_crop, tag_keys
from ..validation import (
    SinkTypeError,
    check_cache_size,
    check_cache_update,
    check_choice,
    check_int,
)
from ..visibility import sink_visible

#: ``attn_implementation`` name of the score-accumulating attention.
H2O_ATTENTION = "h2o_sdpa"
#: Queries per block in a multi-token chunk.
QUERY_BLOCK = 256
#: ``H2OCache(positions=...)``: keep original positions, or re-position inside the visible set.
POSITION_MODES = ("original", "cache")


class H2OCacheLayer(RowStateLayer):
    """One layer of an :class:`H2OCache`: ``C`` slots per batch row and KV head, allocated once.

    State: ``keys``/``values`` ``[B, KVH, C, D]``, ``token_index`` ``[B, KVH, C]`` (absolute index of the token in each
    slot, ``-1``: empty) and ``scores`` ``[B, KVH, C]`` float64 (accumulated attention). Every row and head holds the
    same number of tokens, ``count`` (at most ``C - 1`` between forwards), in slots ``0..count-1`` except for the one
    ``free`` slot (``[B, KVH]``) an eviction left, where the next token goes. Slots are not in text order;
    :meth:`kept_states` sorts.

    Decoding (one token) writes the token into its free slot, attends over the ``C`` slots and evicts in place:
    O(1) copies per step, like :class:`~hf_sinks.cache.SinkCache` (``positions="cache"`` adds one O(C) rotation of
    the held keys, on a temporary copy). A multi-token chunk attends over the slots plus the
    chunk (query by query inside, see :mod:`hf_sinks.h2o`) and then compacts the survivors into slots ``0..count-1``.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: "H2OCache"):
        super().__init__()
        self.cache = cache
        self.seen = 0
        self.count = 0
        # the forward in flight: (new keys, new values, index of the first) for a chunk; () for a decode step
        self.pending: tuple | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        cap = self.cache.capacity
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(batch, heads, cap, head_dim)
        self.values = value_states.new_zeros(batch, heads, cap, value_states.shape[-1])
        self.token_index = torch.full((batch, heads, cap), -1, dtype=torch.long, device=self.device)
        self.scores = torch.zeros(batch, heads, cap, dtype=torch.float64, device=self.device)
        self.free = torch.zeros(batch, heads, dtype=torch.long, device=self.device)
        self.count = 0
        self.is_initialized = True

    def get_max_length(self) -> int:
        return self.cache.capacity

    def stored_length(self) -> int:
        """Tokens each KV head holds (at most ``C - 1`` between forwards)."""
        return self.count if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.seen - stored

    def kept_states(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(token_index [B, KVH, n], keys [B, KVH, n, D], values, scores)`` of the held tokens, in text order."""
        big = torch.iinfo(torch.long).max
        order = self.token_index.masked_fill(self.token_index < 0, big).argsort(-1)[..., : self.count]
        gather = lambda t: t.gather(2, order[..., None].expand(-1, -1, -1, t.shape[-1]))  # noqa: E731
        return self.token_index.gather(-1, order), gather(self.keys), gather(self.values), self.scores.gather(-1, order)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.refuse_unattended_pending("H2OCache", H2O_ATTENTION, "h2o", "accumulate scores (a stock attention cannot)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if q == 1:  # decode: the token goes into its row/head's free slot, in place
            slot = self.free[..., None]  # [B, KVH, 1]
            self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, self.keys.shape[-1]), key_states)
            self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, self.values.shape[-1]), value_states)
            self.token_index.scatter_(-1, slot, self.seen)
            self.scores.scatter_(-1, slot, 0.0)
            self.count += 1
            self.pending = ()
            keys, values = self.keys[:, :, : self.count], self.values[:, :, : self.count]
        else:
            self.pending = (key_states, value_states, self.seen)
            used = self._used()
            keys = torch.cat([self.keys[:, :, :used], key_states], dim=-2)
            values = torch.cat([self.values[:, :, :used], value_states], dim=-2)
        self.seen += q
        tag_keys(keys, self)
        return keys, values

    def _used(self) -> int:
        """Slots that may hold a token. Until the first eviction tokens fill slots ``0..count-1`` in order; after it
        ``count == C - 1`` and the free slot can be any of the ``C``."""
        return self.cache.capacity if self.count == self.cache.capacity - 1 else self.count

    # ----------------------------------------------------------------------------------- attention
    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the pending tokens' queries ``[B, H, q, D]`` with H2O eviction; commits them.

        Returns ``[B, H, q, Dv]``.
        """
        if self.pending is None:
            raise ValueError("H2OCacheLayer.attend called without a pending update.")
        pending, self.pending = self.pending, None
        if not pending:
            return self._attend_decode(query, scaling)
        new_keys, new_values, first = pending
        q = query.shape[2]
        outs = []
        for b0 in range(0, q, QUERY_BLOCK):
            b1 = min(q, b0 + QUERY_BLOCK)
            outs.append(
                self._attend_block(
                    query[:, :, b0:b1], new_keys[:, :, b0:b1], new_values[:, :, b0:b1], first + b0, scaling
                )
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _evict(self, scores, index, held, nxt):
        """Per row and head, the held slot the next query (index ``nxt``) would not see by the sink + window rule
        (not a sink, outside its window) with the lowest score (oldest on ties): ``[B, KVH, 1]``."""
        s, w = self.cache.num_sink_tokens, self.cache.window_length
        candidates = held & ~sink_visible(nxt, index, s, w)  # held tokens are all earlier than nxt
        masked = scores.masked_fill(~candidates, float("inf"))
        lowest = masked.min(-1, keepdim=True).values
        return index.masked_fill(masked != lowest, torch.iinfo(torch.long).max).argmin(-1, keepdim=True)

    def _reposition(self, keys, ranks, index, visible, query_index, dtype):
        """Keys rotated from their original positions to cache positions (``positions="cache"``).

        The query at ``query_index`` seeing ``visible`` keys sits at ``visible - 1`` and the key of rank ``r`` at
        ``r``; the model rotated both at their original indices, so keeping the query where it is, the key moves by
        ``(r - index) + (query_index - (visible - 1))``: 0 for the window (its distances are the true ones).
        Always from the stored originals, angles in fp64: no drift."""
        from ..rope import shift_rotary

        if self.cache.rotary is None:
            raise ValueError(
                "H2OCache(positions='cache') needs the model's rotary parameters; pass rotary="
                "RotaryParams.from_model(model) (the h2o_sdpa attention sets them from the model config)."
            )
        shift = ranks - index + (query_index - (visible - 1))
        return shift_rotary(keys.to(dtype), shift, self.cache.rotary)

    def _attend_decode(self, query, scaling):
        batch, heads, _, head_dim = query.shape
        kv_heads = self.keys.shape[1]
        n = self.count  # slots 0..n-1 all hold a token now (the new one filled the free slot)
        compute = torch.promote_types(query.dtype, torch.float32)
        q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim).to(compute)
        keys, values = self.keys[:, :, :n], self.values[:, :, :n]
        if self.cache.positions == "cache":
            index = self.token_index[:, :, :n]
            ranks = torch.empty_like(index).scatter_(
                -1, index.argsort(-1), torch.arange(n, device=self.device).expand_as(index)
            )
            keys = self._reposition(keys, ranks, index, n, self.seen - 1, compute)
        p = torch.softmax(torch.matmul(q, keys.to(compute).transpose(-1, -2)) * scaling, dim=-1)  # [B, KVH, g, n]
        self.scores[:, :, :n] += p.sum(2, dtype=torch.float64)
        out = torch.matmul(p.to(values.dtype), values).reshape(batch, heads, 1, values.shape[-1])
        if n >= self.cache.capacity:
            index = self.token_index[:, :, :n]
            slot = self._evict(self.scores[:, :, :n], index, index >= 0, self.seen)
            self.token_index.scatter_(-1, slot, -1)
            self.scores.scatter_(-1, slot, 0.0)
            self.free = slot[..., 0]
            self.count -= 1
        else:
            self.free.fill_(n)
        return out.to(query.dtype)

    def _attend_block(self, query, new_keys, new_values, first, scaling):
        batch, heads, c, head_dim = query.shape
        kv_heads = self.keys.shape[1]
        groups = heads // kv_heads
        capacity = self.cache.capacity
        old = self._used()
        cache_positions = self.cache.positions == "cache"
        old_keys, old_values = self.keys[:, :, :old], self.values[:, :, :old]
        old_index, old_scores = self.token_index[:, :, :old], self.scores[:, :, :old]
        if cache_positions and old:  # text order (slots are not, after decode steps): ranks are then a cumsum
            big = torch.iinfo(torch.long).max
            order = old_index.masked_fill(old_index < 0, big).argsort(-1)
            old_keys = old_keys.gather(2, order[..., None].expand(-1, -1, -1, old_keys.shape[-1]))
            old_values = old_values.gather(2, order[..., None].expand(-1, -1, -1, old_values.shape[-1]))
            old_index, old_scores = old_index.gather(-1, order), old_scores.gather(-1, order)
        keys = torch.cat([old_keys, new_keys], dim=2)  # [B, KVH, n, D]
        values = torch.cat([old_values, new_values], dim=2)
        arrivals = first + torch.arange(c, device=self.device)
        index = torch.cat([old_index, arrivals.expand(batch, kv_heads, c)], dim=-1)  # [B, KVH, n]
        scores = torch.cat([old_scores, self.scores.new_zeros(batch, kv_heads, c)], dim=-1)
        n = old + c

        compute = torch.promote_types(query.dtype, torch.float32)
        if cache_positions:  # logits depend on each query's visible set: computed step by step below
            q = query.reshape(batch, kv_heads, groups, c, head_dim).to(compute)
            logits = None
            probs = torch.empty(batch, kv_heads, groups, c, n, dtype=compute, device=self.device)
        else:
            q = query.reshape(batch, kv_heads, groups * c, head_dim).to(compute)
            logits = torch.matmul(q, keys.to(compute).transpose(-1, -2)) * scaling  # [B, KVH, g * c, n]
            logits = logits.view(batch, kv_heads, groups, c, n)
            probs = torch.empty_like(logits)
        held = torch.cat([index[..., :old] >= 0, index.new_zeros(batch, kv_heads, c, dtype=torch.bool)], dim=-1)
        count = self.count  # tokens held per head, equal for every row and head
        for t in range(c):
            held[..., old + t] = True  # a new token joins as its query arrives
            count += 1
            if logits is None:
                ranks = held.long().cumsum(-1) - 1  # columns are in text order
                rotated = self._reposition(keys, ranks, index, count, first + t, compute)
                row = torch.matmul(q[:, :, :, t], rotated.transpose(-1, -2)) * scaling  # [B, KVH, g, n]
            else:
                row = logits[:, :, :, t]
            row = row.masked_fill(~held[:, :, None], float("-inf"))
            p = torch.softmax(row, dim=-1)  # [B, KVH, g, n]
            probs[:, :, :, t] = p
            scores += p.sum(2, dtype=torch.float64)  # the GQA group's query heads add into the KV head's scores
            if count >= capacity:  # make room for the next query (index first + t + 1: a Python int, no sync)
                held.scatter_(-1, self._evict(scores, index, held, first + t + 1), False)
                count -= 1
        out = torch.matmul(probs.view(batch, kv_heads, groups * c, n).to(values.dtype), values)
        out = out.view(batch, kv_heads, groups, c, -1).reshape(batch, heads, c, values.shape[-1])

        # compact the held columns into slots 0..count-1 (in text order: columns are sorted within each head)
        order = torch.argsort((~held).to(torch.int8), dim=-1, stable=True)[..., :count]
        self.keys[:, :, :count] = keys.gather(2, order[..., None].expand(-1, -1, -1, keys.shape[-1]))
        self.values[:, :, :count] = values.gather(2, order[..., None].expand(-1, -1, -1, values.shape[-1]))
        self.token_index[:, :, :count] = index.gather(-1, order)
        self.scores[:, :, :count] = scores.gather(-1, order)
        self.token_index[:, :, count:] = -1
        self.scores[:, :, count:] = 0.0
        self.count = count
        self.free.fill_(count)
        return out.to(query.dtype)

    # ------------------------------------------------------------------------------------ batch ops
    _ROW_STATE = ("keys", "values", "token_index", "scores", "free")

    def reset(self) -> None:
        super().reset()
        self.count = 0

    def crop(self, max_length: int) -> None:
        refuse_crop("H2OCache")


class H2OCache(Cache):
    """Sinks + recent window + heavy hitters, per layer and KV head (see :mod:`hf_sinks.h2o` for the semantics).

    Needs ``attn_implementation="h2o_sdpa"`` (call :func:`register` first); rows must not be padded.

    Args:
        num_sink_tokens: ``S`` first tokens always kept (>= 0).
        window_length: ``W`` most recent tokens always kept, the query included (>= 1).
        heavy_budget: ``H`` further tokens kept by accumulated attention (>= 0; 0 gives sinks + window).
        positions: ``"original"`` (default; H2O's scheme: every token keeps its position in the text) or
            ``"cache"`` (StreamingLLM-style: the query at ``m - 1`` and the ``m`` keys it sees at ``0..m-1`` in text
            order; with ``heavy_budget=0`` the cache positions of docs/design.md §2.2). See :mod:`hf_sinks.h2o`.
        rotary: the model's :class:`~hf_sinks.rope.RotaryParams` (``"cache"`` only; taken from the model's config at
            the first forward when omitted).
    """

    def __init__(
        self,
        num_sink_tokens: int = 4,
        window_length: int = 128,
        heavy_budget: int = 124,
        *,
        positions: str = "original",
        rotary: Any = None,
    ):
        check_int("num_sink_tokens", num_sink_tokens, 0)
        check_int("window_length", window_length, 1)
        check_int("heavy_budget", heavy_budget, 0)
        check_cache_size(
            "H2OCache", num_sink_tokens=num_sink_tokens, window_length=window_length, heavy_budget=heavy_budget
        )
        check_choice("positions", positions, POSITION_MODES)
        from ..rope import RotaryParams

        if rotary is not None and not isinstance(rotary, RotaryParams):
            raise SinkTypeError(
                f"rotary={rotary!r} is invalid: must be a hf_sinks.RotaryParams (e.g. RotaryParams.from_model(model)) "
                f"or None, not {type(rotary).__name__}."
            )
        super().__init__(layers=[])
        self.num_sink_tokens = num_sink_tokens
        self.window_length = window_length
        self.heavy_budget = heavy_budget
        self.positions = positions
        self.rotary = rotary

    @property
    def capacity(self) -> int:
        """Keys a query sees at most (itself included): ``S + W + H``."""
        return self.num_sink_tokens + self.window_length + self.heavy_budget

    def __repr__(self) -> str:
        return (
            f"H2OCache(num_sink_tokens={self.num_sink_tokens}, window_length={self.window_length}, "
            f"heavy_budget={self.heavy_budget}, positions={self.positions!r}, layers={len(self.layers)}, "
            f"seen={self.get_seq_length()})"
        )

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = grow_layers(self.layers, layer_idx, lambda _: H2OCacheLayer(self))
        held = (layer.keys.shape[0], layer.keys.shape[1], layer.keys.shape[-1]) if layer.is_initialized else None
        check_cache_update("H2OCache", self.layers, layer_idx, key_states, held)
        return layer.update(key_states, value_states, *args, **kwargs)

    def get_stored_length(self, layer_idx: int = 0) -> int:
        """Tokens each KV head of ``layer_idx`` holds (``get_seq_length`` counts every token seen)."""
        return self.layers[layer_idx].stored_length() if layer_idx < len(self.layers) else 0

    def kept_token_indices(self, layer_idx: int = 0) -> torch.Tensor:
        """``[B, KVH, n]`` absolute indices of the tokens each KV head of ``layer_idx`` holds, ascending."""
        return self.layers[layer_idx].kept_states()[0]

    def crop(self, max_length: int) -> None:
        refuse_crop("H2OCache")


__all__ = ["H2OCache", "H2OCacheLayer", "H2O_ATTENTION", "POSITION_MODES", "QUERY_BLOCK"]
