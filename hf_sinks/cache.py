"""`SinkCache`: a bounded transformers ``Cache`` keeping attention sinks plus a recent window (StreamingLLM).

Each layer follows its own rule (docs/design.md §2.3, :mod:`hf_sinks.layers`): a global layer keeps ``S`` sinks
and a ``W`` window; a layer with its own sliding window ``sw <= S + W`` keeps only that window (``S = 0``,
``W = sw``). Layout of one layer (per batch row), fixed at its ``S + W`` slots and allocated once:

* slots ``0..S-1`` hold the row's first ``S`` *real* tokens (the sinks; left padding is skipped);
* slots ``S..S+W-1`` are a ring holding the row's last ``W`` real tokens.

A new token overwrites, in place, the slot of the token that just left the window, so a decode step copies one
token per layer (a ``DynamicCache`` re-concatenates all of them). Keys are stored as the model rotated them. Window
keys keep their mutual distances for free (RoPE is relative); only the sinks must move relative to the query, so
their originals are kept aside and a shifted copy is written into their slots: O(S) work per step, always from the
original (no drift), with the angle computed in fp64 (exact at any position).

Two ways to attend over the cache:

* a stock attention (``"sdpa"``, ``"eager"``) gets the slots as they are: exact for token-by-token decoding of rows
  that carry no padding (one prompt, or copies of one as beam search and ``num_return_sequences`` make:
  :attr:`SinkCache.rows_unpadded`);
* a registered ``"sink_*"`` attention (hf_sinks.attention) finds the layer through ``key._hf_sinks_layer``
  (:mod:`hf_sinks.cache_layers`) and uses its per-slot bookkeeping for the exact visibility rule inside multi-token
  chunks (long prompts, multi-turn), left padding and per-query sink positions; it then commits the chunk
  (:meth:`SinkCacheLayer.commit`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from transformers.cache_utils import Cache

from .cache_layers import RowStateLayer, tag_keys
from .config import SinkConfig
from .layers import LayerRule, layer_rules
from .rope import RotaryParams, check_rope_config, layer_rotaries, rotate_with, shift_rotary, shift_tables
from .validation import SinkTypeError, check_batch_size, check_cache_update, check_layers_in_step

logger = logging.getLogger(__name__)


class SinkCacheLayer(RowStateLayer):
    """One layer of a :class:`SinkCache` (see the module docstring for the slot layout)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    #: Lockstep decode keeps slot, position and sink shift as Python ints (see _write_one); False forces the
    #: per-row path everywhere (the tests compare both, bit for bit).
    lockstep_fast_path = True

    def __init__(self, cache: "SinkCache", rule: LayerRule | None = None, rule_bound: bool = False):
        super().__init__()
        self.cache = cache
        self._set_rule(
            rule if rule is not None else LayerRule(cache.num_sink_tokens, cache.window_length, cache.rotary)
        )
        self.rule_bound = rule_bound  # the rule comes from the model (config, hook or the attention's module)
        self.updates = 0  # forwards seen: the rule may still change during the first one
        self.seen = 0  # tokens processed, padding included (what generate slices prompts by)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # a multi-token chunk not yet committed
        self.acknowledged: bool | None = None  # did a sink attention function consume the previous update?
        self._acknowledged_now = False
        self._pending_info = None
        self._clear_lazy()

    def _set_rule(self, rule: LayerRule) -> None:
        self.rule = rule
        self.rotary = rule.rotary
        self.num_sink_tokens = rule.num_sink_tokens
        self.window_length = rule.window_length
        self.capacity = rule.capacity

    # ------------------------------------------------------- lazy bookkeeping
    # Lockstep decode (every row at the same real-token count, no padding: the common case) keeps the token's slot,
    # its position and the sink shift as Python ints and records the per-slot bookkeeping instead of writing it
    # every step (docs/design.md §4.1): ``real_idx``, ``positions``, ``real_seen`` and ``sink_shift`` are properties
    # that first write what is recorded (:meth:`_flush`), so every other reader sees exact, current tensors.

    def _clear_lazy(self) -> None:
        self._lazy_slots: dict[int, tuple[int, int]] = {}  # slot -> (real index, position), same in every row
        self._lazy_count = False  # real_seen is `uniform` in every row (the tensor may be stale)
        self._lazy_shift: int | None = None  # sink_shift is this int in every row (the tensor may be stale)
        self._fast_pos: int | None = None  # position of the token the last update wrote by the lockstep path
        self._sink_offset_int: int | None | bool = False  # sink_offset() as an int (None: rows differ; False: unknown)
        self._compute_dtype: torch.dtype | None = None  # dtype the sinks are rotated in
        self._sinks_half: torch.Tensor | None = None  # rotate_half(sink_keys), kept until a sink is written

    def _flush(self) -> None:
        """Write the recorded lockstep bookkeeping into the tensors (one op per tensor)."""
        if self._lazy_slots:
            slots = torch.tensor(list(self._lazy_slots), device=self._real_idx_t.device)
            real, pos = zip(*self._lazy_slots.values())
            self._lazy_slots = {}
            # out of place: the tensors may be inference tensors read outside inference mode
            batch = self._real_idx_t.shape[0]
            real = torch.tensor(real, dtype=torch.long, device=slots.device).expand(batch, -1)
            pos = torch.tensor(pos, dtype=torch.long, device=slots.device).expand(batch, -1)
            self._real_idx_t = self._real_idx_t.index_copy(1, slots, real)
            self._positions_t = self._positions_t.index_copy(1, slots, pos)
        if self._lazy_count:
            self._lazy_count = False
            self._real_seen_t = torch.full_like(self._real_seen_t, self.uniform)
        if self._lazy_shift is not None:
            shift, self._lazy_shift = self._lazy_shift, None
            self._sink_shift_t = torch.full_like(self._sink_shift_t, shift)

    def _lazy_state(name: str):  # noqa: N805 (a property factory, used in the class body only)
        attr = f"_{name}_t"

        def get(self):
            self._flush()
            return getattr(self, attr)

        def set_(self, value):
            if attr in self.__dict__:
                self._flush()
            setattr(self, attr, value)
            self._sink_offset_int = False

        return property(get, set_, doc=f"``{name}`` ([B, ...] long), with the lockstep bookkeeping written.")

    real_idx = _lazy_state("real_idx")  # [B, S + W] real-token index of each slot (-1: empty)
    positions = _lazy_state("positions")  # [B, S + W] rotation position of each slot
    real_seen = _lazy_state("real_seen")  # [B] real tokens seen per row
    sink_shift = _lazy_state("sink_shift")  # [B] shift now in the sink slots
    del _lazy_state

    def configure(self, rule: LayerRule) -> None:
        """Adopt the model's rule for this layer (docs/design.md §2.3), at the latest during its first forward.

        A cache built without the model's config learns each layer's rule from the first sink attention call;
        until then at most one token (a one-token first forward) was written, at slot 0 under any rule.
        """
        if self.rule.same_as(rule) and self.rule.sliding_window == rule.sliding_window:
            self.rule, self.rule_bound = rule, True
            return
        if self.updates > 1:
            raise RuntimeError(
                f"SinkCache layer already holds tokens under {self.rule}; it cannot switch to {rule}. Build the cache "
                "with SinkCache(..., config=model.config) or SinkCache.from_model(model)."
            )
        self._set_rule(rule)
        self.rule_bound = True
        if not self.is_initialized:
            return
        self._flush()
        self._clear_lazy()
        keys, values, real_idx, positions, filled = self.keys, self.values, self.real_idx, self.positions, self.filled
        batch, heads, _, head_dim = keys.shape
        self.keys = keys.new_zeros(batch, heads, self.capacity, head_dim)
        self.values = values.new_zeros(batch, heads, self.capacity, values.shape[-1])
        self.sink_keys = keys.new_zeros(batch, heads, self.num_sink_tokens, head_dim)
        self.real_idx = real_idx.new_full((batch, self.capacity), -1)
        self.positions = positions.new_zeros(batch, self.capacity)
        self.sink_shift = torch.zeros_like(self.sink_shift)
        self.keys[:, :, :filled] = keys[:, :, :filled]  # real r < both capacities sits in slot r under any rule
        self.values[:, :, :filled] = values[:, :, :filled]
        self.real_idx[:, :filled] = real_idx[:, :filled]
        self.positions[:, :filled] = positions[:, :filled]
        n = min(filled, self.num_sink_tokens)
        self.sink_keys[:, :, :n] = keys[:, :, :n]

    # ------------------------------------------------------------------ state
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.cache._check_head_dim(head_dim)
        self.dtype, self.device = key_states.dtype, key_states.device
        cap, s = self.capacity, self.num_sink_tokens
        try:
            self.keys = key_states.new_zeros(batch, heads, cap, head_dim)
            self.values = value_states.new_zeros(batch, heads, cap, value_states.shape[-1])
        except RuntimeError as e:  # torch.OutOfMemoryError included
            need = batch * heads * cap * (head_dim + value_states.shape[-1]) * key_states.element_size()
            self.keys = self.values = None
            raise MemoryError(
                f"SinkCache(num_sink_tokens={s}, window_length={self.window_length}) cannot allocate its "
                f"{cap}-slot layer ({need / 2**30:.1f} GiB for batch {batch} x {heads} KV heads x head_dim "
                f"{head_dim} on {self.device}): use a smaller window_length ({type(e).__name__})."
            ) from None
        self.sink_keys = key_states.new_zeros(batch, heads, s, head_dim)  # sinks as first rotated
        self._clear_lazy()
        self.real_idx = torch.full((batch, cap), -1, dtype=torch.long, device=self.device)  # -1: empty slot
        self.positions = torch.zeros(batch, cap, dtype=torch.long, device=self.device)  # rotation of each slot
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.sink_shift = torch.zeros(batch, dtype=torch.long, device=self.device)  # shift now in the sink slots
        self.filled = 0  # slots 0..filled-1 are in use in at least one row
        self.uniform: int | None = 0  # real tokens per row when every row has the same count (fast path)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.capacity

    def stored_length(self) -> int:
        """Slots in use (at most ``S + W``), the pending chunk excluded."""
        return self.filled if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self._filled_after_pending()
        if query_length == 1:
            kv_length = min(stored + 1, self.capacity)  # decode writes in place
        else:
            kv_length = stored + query_length
        return kv_length, self.seen - (kv_length - query_length)

    def _filled_after_pending(self) -> int:
        if not self.is_initialized:
            return 0
        if self.pending is None:
            return self.filled
        most = int(self.real_seen.max()) + self.pending[0].shape[-2]
        return max(self.filled, min(most, self.capacity))

    # ----------------------------------------------------------------- update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.updates += 1
        if self.seen > 0:
            self.acknowledged = self._acknowledged_now
        if self.pending is not None:  # no sink attention committed the last chunk: a stock attention is in use
            self._warn_if_dense_prefill()
            self.commit()
        self._acknowledged_now = False
        # (rows in lockstep hold no padding: no slot among the filled ones is empty, nothing to check)
        if self.acknowledged is False and self.uniform is None and bool((self.real_idx[:, : self.filled] < 0).any()):
            raise ValueError(
                "This SinkCache holds a left-padded batch, which a stock attention (attn_implementation="
                "'sdpa'/'eager') cannot mask slot by slot; load the model with attn_implementation='sink_sdpa' "
                "or 'sink_eager' to stream padded batches."
            )
        q = key_states.shape[-2]
        if self.seen == 0 or (q > 1 and self is self.cache.layers[0]):  # are the rows copies of one row?
            self.cache._note_rows(key_states, value_states)  # (see SinkCache.rows_unpadded)
        incoming = self.cache._incoming_for(self.seen, q)
        self.seen += q

        if q == 1:
            valid, positions = incoming if incoming is not None else (None, None)
            self._write(key_states, value_states, valid, positions)
            self._shift_sinks_for_stock_attention(positions)
            keys, values = self._resident()
        else:
            # Queries of a chunk need keys that the chunk itself would evict: attend over a copy, commit afterwards.
            self.pending, self._pending_info = (key_states, value_states), incoming
            keys = torch.cat([self.keys[:, :, : self.filled], key_states], dim=-2)
            values = torch.cat([self.values[:, :, : self.filled], value_states], dim=-2)
        tag_keys(keys, self)
        return keys, values

    def _resident(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled slots' keys and values (the buffers themselves once full: no view op per step)."""
        if self.filled == self.capacity:
            return self.keys, self.values
        return self.keys.narrow(2, 0, self.filled), self.values.narrow(2, 0, self.filled)

    def acknowledge(self) -> None:
        """Called by a sink attention function: it handles visibility and sink positions for this update."""
        self._acknowledged_now = True

    def commit(self, valid: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        """Store the pending multi-token chunk: its row-wise validity (left padding) and rotation positions."""
        if self.pending is None:
            return
        key_states, value_states = self.pending
        if valid is None and positions is None and self._pending_info is not None:
            valid, positions = self._pending_info
        self.pending = self._pending_info = None
        self._write(key_states, value_states, valid, positions)

    def _warn_if_dense_prefill(self) -> None:
        if int(self.real_seen.max()) + self.pending[0].shape[-2] > self.capacity:
            logger.warning(
                "SinkCache: a %d-token chunk went past the cache capacity (%d) under a stock attention, which cannot "
                "mask it with the sink+window rule; load the model with attn_implementation='sink_sdpa' (or "
                "'sink_eager') for exact long-prompt prefill.",
                self.pending[0].shape[-2],
                self.capacity,
            )

    def new_token_indices(self, valid: torch.Tensor | None, q: int) -> torch.Tensor:
        """Real-token index of each of the next ``q`` tokens per row (``-1`` for padding)."""
        if valid is None:
            return self.real_seen[:, None] + torch.arange(q, device=self.device)
        valid = valid.to(self.device, torch.bool)
        idx = self.real_seen[:, None] + valid.long().cumsum(-1) - 1
        return torch.where(valid, idx, torch.full_like(idx, -1))

    def _write(self, key_states, value_states, valid, positions) -> None:
        if valid is None and self.uniform is not None and key_states.shape[-2] == 1:
            return self._write_one(key_states, value_states, positions)
        self._fast_pos = self._sinks_half = None
        self._sink_offset_int = False
        positions_unknown = positions is None and not self._padding_known()
        q = key_states.shape[-2]
        s, w = self.num_sink_tokens, self.window_length
        real = self.new_token_indices(valid, q)  # [B, q]
        total = self.real_seen + (real >= 0).sum(-1)  # real tokens per row after this chunk
        if positions is None:
            positions = self.new_token_positions(real)
        positions = positions.to(self.device).expand(real.shape[0], -1)
        keep = (real >= 0) & ((real < s) | (real >= (total - w)[:, None]))
        slots = self.slot_of(real)
        rows, cols = keep.nonzero(as_tuple=True)
        dest = slots[rows, cols]
        self.keys[rows, :, dest] = key_states[rows, :, cols]
        self.values[rows, :, dest] = value_states[rows, :, cols]
        self.real_idx[rows, dest] = real[rows, cols]
        self.positions[rows, dest] = positions[rows, cols]
        sink = keep & (real < s)
        if sink.any():
            srows, scols = sink.nonzero(as_tuple=True)
            self.sink_keys[srows, :, real[srows, scols]] = key_states[srows, :, scols]
            self.sink_shift[srows] = 0
        most = int(total.max())
        if most > self.capacity and positions_unknown:
            self._refuse_unknown_padding(key_states.shape[0])
        self.real_seen = total
        self.filled = max(self.filled, min(most, self.capacity))
        lockstep = self.uniform is not None and bool((real >= 0).all()) and bool((total == total[0]).all())
        self.uniform = int(total[0]) if lockstep else None

    def _write_one(self, key_states, value_states, positions) -> None:
        """Decode fast path: every row holds the same real-token count, so the slot is one Python int.

        The token's position is a Python int too when every row has the same one (read once per forward, shared by
        the layers); its ``real_idx``/``positions`` entries and ``real_seen`` are then recorded, not written
        (:meth:`_flush`). Otherwise they are written per row.
        """
        r = self.uniform
        if r >= self.capacity and positions is None and not self._padding_known():
            self._refuse_unknown_padding(key_states.shape[0])
        slot = self.slot_index(r)
        self.keys.narrow(2, slot, 1).copy_(key_states)
        self.values.narrow(2, slot, 1).copy_(value_states)
        if not self.lockstep_fast_path:
            pos = None
        elif positions is not None:
            pos = self.cache._row_int(positions)
        elif self.cache._base is None:
            pos = r
        else:
            base = self.cache._row_int(self.cache._base)
            pos = None if base is None else r - base
        if pos is not None:
            self._lazy_slots[slot] = (r, pos)
        else:  # rows at different positions: per-row bookkeeping
            self.real_idx[:, slot] = r
            if positions is not None:
                self.positions[:, slot] = positions[:, -1].to(self.device)
            elif self.cache._base is None:
                self.positions[:, slot] = r
            else:
                self.positions[:, slot] = r - self.cache._base.to(self.device)
        self._fast_pos = pos
        if r < self.num_sink_tokens:
            self.sink_keys.narrow(2, r, 1).copy_(key_states)
            self._sinks_half = None
            if r == 0:
                self._sink_offset_int = False
        self._lazy_count = True
        self.uniform = r + 1
        self.filled = max(self.filled, min(r + 1, self.capacity))

    def prepare_decode_fast(self, positions: torch.Tensor | None) -> bool:
        """Lockstep decode step (the token already in its slot): shift the sinks to the query with Python ints.

        ``positions``: the model's ``position_ids`` (trusted over the cache's own guess). Returns ``False``, having
        done nothing, when the step needs the per-row path (rows at different positions or sink offsets, a token
        not written by :meth:`_write_one`); ``True`` means also that no filled slot is empty (no mask needed).
        """
        pos = self._fast_pos
        if pos is None:
            return False
        r = self.uniform - 1
        if positions is not None:
            given = self.cache._row_int(positions)
            if given is None:
                return False
            if given != pos:
                self._lazy_slots[self.slot_index(r)] = (r, given)
                self._fast_pos = pos = given
        return self._place_sinks_fast(r, pos)

    def _place_sinks_fast(self, r: int, pos: int) -> bool:
        """:meth:`place_sinks` for one shift shared by every row (docs/design.md §2.2), as Python ints."""
        s = self.num_sink_tokens
        if s == 0:
            return True
        offset = self._sink_offset_int
        if offset is False:
            values = self.sink_offset().tolist()  # one host read, then kept until slot 0 or the rows change
            offset = self._sink_offset_int = values[0] if values.count(values[0]) == len(values) else None
        if offset is None:
            return False
        shift = pos - min(r, self.capacity - 1) - offset
        current = self._lazy_shift
        if current is None:
            values = self._sink_shift_t.tolist()
            if values.count(values[0]) != len(values):
                return False
            current = self._lazy_shift = values[0]
        if shift == current:
            return True
        n = min(s, self.filled)
        sinks = self.sink_keys if n == s else self.sink_keys.narrow(2, 0, n)
        if shift != 0 and not (self.rotary is None and self.cache.rules_known):
            rotary = self.rotary
            if rotary is None:
                return False  # the per-row path explains why it cannot shift
            if self._compute_dtype is None:
                self._compute_dtype = torch.promote_types(self.keys.dtype, torch.float32)
            cos, sin = self.cache.lockstep_sink_tables(shift, rotary, self.device, self._compute_dtype)
            if rotary.interleaved or rotary.rotary_dim != sinks.shape[-1] or sinks.dtype != cos.dtype:
                sinks = rotate_with(sinks, cos, sin, rotary.rotary_dim, rotary.interleaved)
            else:  # rotate_with's arithmetic (same ops, same bits) on a kept rotate_half(sinks), into the slots
                half = self._sinks_half
                if half is None or half.shape != sinks.shape:
                    x1, x2 = sinks.chunk(2, dim=-1)
                    half = self._sinks_half = torch.cat((-x2, x1), dim=-1)
                if not (torch.is_grad_enabled() and (sinks.requires_grad or self.keys.requires_grad)):
                    torch.add(sinks * cos, half * sin, out=self.keys.narrow(2, 0, n))  # out= cannot record grad
                    self._lazy_shift = shift
                    return True
                sinks = sinks * cos + half * sin
        self.keys.narrow(2, 0, n).copy_(sinks)
        self._lazy_shift = shift
        return True

    def _padding_known(self) -> bool:
        """Whether someone who saw the attention mask (the position hook, a sink attention) describes the tokens."""
        return bool(self.acknowledged or self._acknowledged_now)

    def _refuse_unknown_padding(self, batch: int) -> None:
        """Past capacity with nobody describing the padding: refuse unless the rows provably hold none of their own
        (:attr:`SinkCache.rows_unpadded`: one row, or copies of one row wherever padding can enter)."""
        if self.cache.rows_unpadded:
            return
        raise ValueError(
            f"SinkCache: a batch of {batch} rows is streaming past the cache capacity ({self.capacity}) under a stock "
            "attention (attn_implementation='sdpa'/'eager'), which never tells the cache which tokens are left "
            "padding: padding would become the rows' sinks and silently change the results (the rows differed in "
            "a multi-token forward, so they may be padded). Call hf_sinks.apply(model) first (its position hook tells "
            "the cache the padding), or load the model with attn_implementation='sink_sdpa'."
        )

    def slot_index(self, real: int) -> int:
        """:meth:`slot_of` for one Python int."""
        s = self.num_sink_tokens
        return real if real < s else s + (real - s) % self.window_length

    def slot_of(self, real: torch.Tensor) -> torch.Tensor:
        """Slot of the token with real index ``real``: its own sink slot, or its place in the window ring."""
        s = self.num_sink_tokens
        return torch.where(real < s, real, s + (real - s).remainder(self.window_length))

    # ------------------------------------------------------------ positions
    def _position_offset(self) -> torch.Tensor:
        """Per row, rotation position minus real index for new tokens (0 unless the cache re-based positions)."""
        return -self.cache.position_base(self.real_seen.shape[0], self.device)

    def new_token_positions(self, real: torch.Tensor) -> torch.Tensor:
        """Rotation positions of new tokens ``[B, q]`` with real indices ``real`` when the model's own are not at
        hand: the real index plus the window's offset (what :meth:`SinkCache.begin_forward` handed the rotary; the
        sinks' offset stays put when the cache re-bases). Padding (``-1``) gets the position of index 0."""
        return real.clamp(min=0) + self._position_offset()[:, None]

    def set_decode_position(self, rows: torch.Tensor, slot: torch.Tensor, position: torch.Tensor) -> None:
        """Record the rotation position the model gave the token just written to ``slot`` (per row)."""
        self.positions[rows, slot] = position
        self._sink_offset_int = False  # slot 0 may have been this token's

    def query_cache_positions(self, real: torch.Tensor) -> torch.Tensor:
        """Position of a query in its visible set (docs/design.md §2.2): its real index, capped at ``S + W - 1``."""
        return real.clamp(max=self.capacity - 1)

    def sink_offset(self) -> torch.Tensor:
        """Per row, the rotation position of sink ``j`` minus ``j``."""
        if self.filled == 0:
            return self._position_offset()
        return self.positions[:, 0] - self.real_idx[:, 0].clamp(min=0)

    def sink_shift_for(self, real: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        """How far the sinks must move so a query at ``query_positions`` sees sink ``j`` at cache position ``j``."""
        return query_positions - self.query_cache_positions(real) - self.sink_offset()

    def _sinks_at(self, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n = min(self.num_sink_tokens, self.filled)
        sinks = self.sink_keys[:, :, :n]
        if bool((shift == 0).all()) or (self.rotary is None and self.cache.rules_known):  # a layer without RoPE
            return sinks.to(dtype)
        rotary = self.rotary
        if rotary is None:
            raise ValueError(
                "SinkCache has no rotary parameters to re-position the sinks under a stock attention "
                "(attn_implementation='sdpa'/'eager') past its capacity of "
                f"{self.capacity} tokens. For a RoPE model (falcon, gpt_neox, llama, mistral) build it with "
                "SinkCache.from_model(model) or load the model with attn_implementation='sink_sdpa'; a model "
                "without rotary embeddings (e.g. GPT-2's learned absolute positions) cannot stream with a SinkCache."
            )
        cos, sin = self.cache.sink_tables(shift, self.device, torch.promote_types(dtype, torch.float32), rotary)
        return rotate_with(sinks, cos, sin, rotary.rotary_dim, rotary.interleaved).to(dtype)

    def place_sinks(self, shift: torch.Tensor) -> None:
        """Write the sinks, shifted by ``shift`` positions per row, into their slots (O(S) per call)."""
        if self.num_sink_tokens == 0 or self.filled == 0 or torch.equal(shift, self.sink_shift):
            return
        n = min(self.num_sink_tokens, self.filled)
        self.keys[:, :, :n] = self._sinks_at(shift, self.keys.dtype)
        self.sink_shift = shift.clone()

    def _shift_sinks_for_stock_attention(self, positions: torch.Tensor | None) -> None:
        if self.num_sink_tokens == 0 or self.acknowledged:  # a sink attention places them with exact positions
            return
        if self._fast_pos is not None and self._place_sinks_fast(self.uniform - 1, self._fast_pos):
            return
        last = self.real_seen - 1
        query_pos = last + self._position_offset() if positions is None else positions[:, -1].to(self.device)
        shift = self.sink_shift_for(last, query_pos)
        if self.rotary is None and not self.cache.rules_known and not bool((shift == self.sink_shift).all()):
            if self.acknowledged is False:
                self._sinks_at(shift, self.keys.dtype)  # raises the explanatory error
            return  # a sink attention function will place them (it knows the model config)
        self.place_sinks(shift)

    def rebase(self, delta: torch.Tensor) -> None:
        """Rotate window keys back by ``delta`` positions per row (sinks keep their originals)."""
        if not self.is_initialized or self.filled == 0:
            return
        self._sink_offset_int = False
        window = self.real_idx[:, : self.filled] >= self.num_sink_tokens  # [B, n]
        shift = torch.where(window, -delta[:, None], torch.zeros_like(self.real_idx[:, : self.filled]))
        self.keys[:, :, : self.filled] = shift_rotary(self.keys[:, :, : self.filled], shift[:, None, :], self.rotary)
        self.positions[:, : self.filled] += shift
        if self.pending is not None and self._pending_info is not None:
            valid, positions = self._pending_info
            self._pending_info = (valid, positions - delta[:, None])

    # ------------------------------------------------------------ batch ops
    _ROW_STATE = ("keys", "values", "sink_keys", "real_idx", "positions", "real_seen", "sink_shift")
    # (`uniform` survives row maps: reordering or repeating rows keeps them in lockstep; a selection does too)

    def _map_rows(self, fn) -> None:
        if not self.is_initialized:
            return
        self._flush()
        self._sink_offset_int = False
        self._sinks_half = None
        super()._map_rows(fn)
        if self.pending is not None:
            self.pending = tuple(fn(t) for t in self.pending)
            if self._pending_info is not None:
                self._pending_info = tuple(None if t is None else fn(t) for t in self._pending_info)

    def reset(self) -> None:
        self.keys = self.values = None
        self._clear_lazy()
        self.is_initialized = False
        self.uniform = 0
        self.seen = 0
        self.updates = 0
        self.pending = self._pending_info = None
        self.acknowledged = None
        self._acknowledged_now = False

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("SinkCache evicts tokens; it cannot be cropped (assisted decoding is unsupported).")


def _text_config(config: Any) -> Any:
    """The decoder text config of a transformers config; ``TypeError`` naming what was passed instead."""
    if isinstance(config, torch.nn.Module):
        raise SinkTypeError(
            f"config={type(config).__name__}(...) is a model, not a config: pass config=model.config or use "
            f"SinkCache.from_model(model)."
        )
    if not hasattr(config, "get_text_config"):
        raise SinkTypeError(
            f"config={config!r} is invalid: must be a transformers PretrainedConfig (e.g. model.config), not "
            f"{type(config).__name__}."
        )
    return config.get_text_config(decoder=True)


class SinkCache(Cache):
    """A ``Cache`` that keeps the first ``num_sink_tokens`` tokens and the last ``window_length`` tokens per layer.

    Use it with any supported model through ``generate``::

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sink_sdpa")
        cache = hf_sinks.SinkCache(num_sink_tokens=4, window_length=1020)
        model.generate(**inputs, cache=cache, max_new_tokens=20_000)  # past_key_values=cache before transformers 5.24

    Args:
        num_sink_tokens: sinks ``S`` (>= 0).
        window_length: recent window ``W`` (>= 1), the query included.
        config: the model's transformers config: each layer's rule (its own sliding window, its rotary parameters,
            docs/design.md §2.3) is known before the first forward. Needed when a *stock* attention
            (``"sdpa"``/``"eager"``) streams past capacity; ``sink_*`` attentions bring it on their first call.
        rotary: explicit :class:`~hf_sinks.rope.RotaryParams` for every layer (takes precedence over ``config``'s;
            layers then follow the global rule unless a sink attention finds the model's own rules).

    A ``config`` or ``rotary`` of another model (another ``rope_theta``, another sliding window) is refused at the
    first forward on every route: ``sink_*`` attentions and ``hf_sinks.apply`` compare it with the model's own
    rules; under a stock attention the cache compares it with the ``config`` of the attention module that calls
    :meth:`update` (the only view of the model that route gives). A cache driven by hand, from code that is not a
    module holding a transformers ``config``, is not checked.

    Under a stock attention without ``hf_sinks.apply``, a batch streams past capacity only when
    :attr:`rows_unpadded` (one row, or copies of one row such as ``generate`` makes for ``num_beams`` and
    ``num_return_sequences``); other batches are refused, since nobody tells the cache which tokens are padding.
    """

    def __init__(
        self,
        num_sink_tokens: int = 4,
        window_length: int = 1020,
        *,
        config: Any = None,
        rotary: RotaryParams | None = None,
    ):
        self.sink_config = SinkConfig(num_sink_tokens=num_sink_tokens, window_length=window_length)
        super().__init__(layers=[])
        self._config_head_dim: tuple[int, str] | None = None  # (head_dim, what it came from) to check at first update
        self.rules: list[LayerRule] | None = None  # per-layer rules, once known (config, hook, or a sink attention)
        if config is not None:
            config = check_rope_config(_text_config(config))
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            self._config_head_dim = (int(head_dim), f"config ({type(config).__name__}, head_dim {head_dim})")
            if rotary is None:
                self.rules = layer_rules(config, num_sink_tokens, window_length)
                rotary = next((r.rotary for r in self.rules if r.rotary is not None), None)
        if rotary is not None and not isinstance(rotary, RotaryParams):
            raise SinkTypeError(
                f"rotary={rotary!r} is invalid: must be a hf_sinks.RotaryParams (e.g. RotaryParams.from_model(model)) "
                f"or None, not {type(rotary).__name__}."
            )
        self.rotary = rotary  # the first RoPE layer's parameters (all layers' unless rules say otherwise)
        self._rotary_bound = False  # set once the model's own parameters were checked against the cache's
        self._announced: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # see begin_forward
        self._incoming: tuple[int, torch.Tensor | None, torch.Tensor | None] | None = None
        self._base: torch.Tensor | None = None  # per-row offset subtracted from positions (set by the hook)
        self._real_seen: torch.Tensor | None = None  # per-row real tokens, as counted by the hook
        self._sink_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._ints: dict[int, tuple[torch.Tensor, int | None]] = {}  # see _row_int (one forward)
        self._lockstep_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see lockstep_sink_tables
        self._rotary_keys: dict[int, tuple[torch.Tensor, tuple[float, ...]]] = {}  # inv_freq -> its values
        self._rows_unpadded: bool | None = None  # see rows_unpadded; None until a layer's first forward
        self._built_from = config  # the text config the rules came from (compared with the calling model's, see update)
        self._caller_checked = False  # the calling attention module's config was compared with the cache's

    @classmethod
    def from_config(cls, sink_config: SinkConfig | dict, **kwargs: Any) -> "SinkCache":
        """Build from a :class:`SinkConfig` (or its dict form)."""
        if isinstance(sink_config, dict):
            sink_config = SinkConfig.from_dict(sink_config)
        if not isinstance(sink_config, SinkConfig):
            raise SinkTypeError(
                f"sink_config={sink_config!r} is invalid: must be a SinkConfig or its dict form, not "
                f"{type(sink_config).__name__}."
            )
        return cls(sink_config.num_sink_tokens, sink_config.window_length, **kwargs)

    @classmethod
    def from_model(
        cls, model: Any, num_sink_tokens: int | None = None, window_length: int | None = None
    ) -> "SinkCache":
        """Build for ``model``: sizes from ``model.config.attention_sinks`` (or defaults) and the model's rotary."""
        sink_config = SinkConfig.for_model(model.config, num_sink_tokens, window_length)
        cache = cls.from_config(sink_config)
        cache.bind_rules(model_rules(model, sink_config.num_sink_tokens, sink_config.window_length))
        return cache

    # -------------------------------------------------------------- properties
    @property
    def num_sink_tokens(self) -> int:
        return self.sink_config.num_sink_tokens

    @property
    def window_length(self) -> int:
        return self.sink_config.window_length

    @property
    def capacity(self) -> int:
        return self.sink_config.capacity

    @property
    def rows_unpadded(self) -> bool:
        """Whether the rows provably carry no left padding of their own, so a stock attention may stream them past
        capacity without being told the padding (docs/design.md §2.1: padding must never become a row's sinks).

        True when the batch has one row, or its rows were copies of one row wherever padding can enter: bit-identical
        keys and values at every layer in the stream's first forward (identical tokens, positions and masks: one
        sequence, repeated) and at the first layer in every later multi-token forward (the same new tokens at the
        same positions in every row). Rows may differ only through one-token forwards (decode steps feed generated
        tokens, never padding) and row maps (``reorder_cache``, ``batch_repeat_interleave``,
        ``batch_select_indices`` copy or pick rows). That is what ``generate`` makes for ``num_beams`` /
        ``num_return_sequences`` from one prompt: it ``repeat_interleave``s the prompt before the first forward.

        Copies of one prompt are exactly as padded as that prompt, and one prompt is padded only if its caller padded
        it (generate never pads a single prompt): the premise a one-row batch has always streamed on. Rows that
        differ in a multi-token forward may be differently padded, and a stock attention passes the cache neither
        the attention mask nor (on transformers 5.23) the position ids, so the cache cannot tell: such a batch
        streams past capacity only with ``hf_sinks.apply`` or a ``sink_*`` attention.
        """
        return bool(self._rows_unpadded)

    def _note_rows(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record whether the ``[B, H, q, D]`` rows of this update are copies of one row (bitwise); once false,
        :attr:`rows_unpadded` stays false for the stream."""
        same = key_states.shape[0] == 1 or (
            torch.equal(key_states[1:], key_states[:1].expand_as(key_states[1:]))
            and torch.equal(value_states[1:], value_states[:1].expand_as(value_states[1:]))
        )
        self._rows_unpadded = same and self._rows_unpadded is not False

    @property
    def rules_known(self) -> bool:
        """Whether each layer's rule (window, rotary) comes from the model rather than the defaults."""
        return self.rules is not None

    def bind_rules(self, rules: list[LayerRule]) -> None:
        """Take the model's per-layer rules (docs/design.md §2.3); once per cache, before a forward uses them.

        Raises:
            ValueError: the cache was built with other rotary parameters (e.g. ``config=`` of another model): its
                sinks would be shifted with the wrong frequencies.
        """
        if self._rotary_bound:
            return
        mine = (
            self.rules
            if self.rules is not None
            else ([LayerRule(0, 1, self.rotary)] * len(rules) if self.rotary is not None else None)
        )
        if mine is not None:
            self._check_rotaries(mine, rules)
        self.rules = list(rules)
        self.rotary = next((r.rotary for r in rules if r.rotary is not None), self.rotary)
        self._rotary_bound = True
        for idx, layer in enumerate(self.layers):
            if idx < len(rules):
                layer.configure(rules[idx])

    @staticmethod
    def _check_rotaries(mine: list[LayerRule], rules: list[LayerRule]) -> None:
        """Raise when a layer rotates with other parameters than the cache was built with."""
        for idx, (have, want) in enumerate(zip(mine, rules)):
            if want.rotary is None or have.rotary is None:
                continue
            if not have.rotary.matches(want.rotary):
                raise ValueError(
                    f"This SinkCache was built with the rotary parameters of {have.rotary.describe()}, but the "
                    f"model rotates layer {idx} with {want.rotary.describe()}; its sinks would be re-positioned with "
                    "the wrong frequencies. Build the cache with SinkCache(..., config=model.config) or "
                    "SinkCache.from_model(model)."
                )

    def _caller(self) -> Any:
        """The ``self`` of the code that called :meth:`update` (a subclass's ``update`` calling ours skipped): the
        stock route's one view of the model, its attention module (see :meth:`_check_calling_model`)."""
        frame = sys._getframe(2)  # 0: here, 1: update
        while frame is not None and frame.f_locals.get("self") is self:
            frame = frame.f_back
        return None if frame is None else frame.f_locals.get("self")

    def _check_calling_model(self, module: Any) -> None:
        """Once per cache, at the first update, unless ``hf_sinks.apply`` already bound the model's rules: compare
        the rules the cache was built with (``config=`` / ``rotary=``) with those of the model that calls ``update``.
        This is the stock route's only check (a ``sink_*`` attention also binds the model's rules right after).

        ``module`` is the ``self`` of the frame that called :meth:`update`: in every supported model (transformers
        5.23 to 5.25, and hf_sinks' Falcon patch) the attention module, whose ``config`` is the model's. Nothing else
        reaches the cache on that route (5.23 passes no ``cache_kwargs``; 5.25 passes ``position_ids`` and
        ``use_cache`` only, no cos/sin), and RoPE'd keys do not reveal their frequencies. A caller that is not a
        module with a transformers config (a hand-driven cache) is not checked.
        """
        config = getattr(module, "config", None) if isinstance(module, torch.nn.Module) else None
        if not hasattr(config, "get_text_config"):
            return
        config = config.get_text_config(decoder=True)
        if config is self._built_from:  # the very config the cache's rules came from
            return
        try:
            rotaries = layer_rotaries(config, modeling=sys.modules.get(type(module).__module__))
            rules = layer_rules(config, self.num_sink_tokens, self.window_length, rotaries)
        except (AttributeError, KeyError, TypeError, ValueError):
            return  # not a config hf_sinks reads: nothing to compare with (the sink routes explain why)
        mine = self.rules if self.rules is not None else [LayerRule(0, 1, self.rotary)] * len(rules)
        self._check_rotaries(mine, rules)
        for idx, (have, want) in enumerate(zip(self.rules or (), rules)):
            if have.sliding_window != want.sliding_window:
                raise ValueError(
                    f"This SinkCache was built with a config whose layer {idx} has sliding_window="
                    f"{have.sliding_window}, but the model calling it ({type(module).__name__}) has sliding_window="
                    f"{want.sliding_window} there; the layer would keep the wrong window. Build the cache with "
                    "SinkCache(..., config=model.config) or SinkCache.from_model(model)."
                )

    def bind_rotary(self, rotary: RotaryParams) -> None:
        """Bind one rotary for every layer (a model with a single rotary configuration and no sliding layers)."""
        if self._rotary_bound:
            return
        if self.rotary is not None and not self.rotary.matches(rotary):
            raise ValueError(
                f"This SinkCache was built with the rotary parameters of {self.rotary.describe()}, but the model "
                f"rotates with {rotary.describe()}; its sinks would be re-positioned with the wrong frequencies. "
                "Build the cache with SinkCache(..., config=model.config) or SinkCache.from_model(model)."
            )
        self.rotary = rotary
        self._rotary_bound = True

    def rule_of(self, layer_idx: int) -> LayerRule | None:
        return self.rules[layer_idx] if self.rules is not None and layer_idx < len(self.rules) else None

    def get_stored_length(self, layer_idx: int = 0) -> int:
        """Tokens actually held by ``layer_idx`` (``get_seq_length`` counts every token seen, as generate expects)."""
        return self.layers[layer_idx].stored_length() if layer_idx < len(self.layers) else 0

    def __repr__(self) -> str:
        return (
            f"SinkCache(num_sink_tokens={self.num_sink_tokens}, window_length={self.window_length}, "
            f"layers={len(self.layers)}, seen={self.get_seq_length()})"
        )

    # ------------------------------------------------------------------ update
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            rule = self.rule_of(len(self.layers))
            self.layers.append(SinkCacheLayer(self, rule, rule_bound=rule is not None))
        if not self._caller_checked and not torch.compiler.is_compiling():
            self._caller_checked = True
            if not self._rotary_bound and (self.rules is not None or self.rotary is not None):
                self._check_head_dim(key_states.shape[-1])  # the plainer error for a config of another shape first
                self._check_calling_model(self._caller())
        layer = self.layers[layer_idx]
        held = (layer.keys.shape[0], layer.keys.shape[1], layer.keys.shape[-1]) if layer.is_initialized else None
        check_cache_update("SinkCache", self.layers, layer_idx, key_states, held)
        self._announced = None  # the forward the hook announced reached the layers
        if layer_idx == 0:
            self._ints.clear()  # a new forward: its position tensors are new
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("SinkCache evicts tokens; it cannot be cropped (assisted decoding is unsupported).")

    def _check_head_dim(self, head_dim: int) -> None:
        """At a layer's first update: the keys' head_dim must match the config / rotary the cache was built with."""
        if self._config_head_dim is not None and self._config_head_dim[0] != head_dim:
            expected, source = self._config_head_dim
            raise ValueError(
                f"SinkCache was built with a {source} but the model gives keys with head_dim {head_dim}: the config "
                f"is another model's. Build the cache from this model: SinkCache.from_model(model)."
            )
        if self.rotary is not None and self.rotary.rotary_dim > head_dim:
            raise ValueError(
                f"SinkCache's rotary parameters rotate {self.rotary.rotary_dim} channels but the model gives keys with "
                f"head_dim {head_dim}: they are another model's. Build the cache with SinkCache.from_model(model)."
            )

    # --------------------------------------------------------------- positions
    def position_base(self, batch_size: int, device: torch.device) -> torch.Tensor:
        if self._base is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return self._base.to(device)

    def begin_forward(self, batch_size: int, q: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
        """Own the positions of the next forward (called by the position hook, before any layer runs).

        Returns ``[B, q]`` position ids ``real_index - base``: relative distances are the true ones, and ``base``
        advances (re-rotating resident window keys once, O(S + W) per layer every ~``S + W`` tokens) so positions
        stay below ``2 (S + W)`` however long the stream: no fp32 angle loss at any stream length.
        """
        if self._announced is not None:  # the previous forward failed before its first layer: nothing was stored
            real_seen, base, delta = self._announced
            if delta is not None:
                for layer in self.layers:
                    layer.rebase(-delta)
            self._real_seen, self._base, self._incoming, self._announced = real_seen, base, None, None
        held = [layer for layer in self.layers if layer.is_initialized]
        for layer in held:
            check_batch_size("This SinkCache", layer.keys.shape[0], batch_size)
        if held:
            check_layers_in_step("SinkCache", self.layers, self.layers.index(held[0]), 0)
        for layer in self.layers:  # a chunk left by a stock attention is stored before positions move
            if layer.pending is not None:
                layer._warn_if_dense_prefill()
                layer.commit()
        if self._real_seen is None or self._real_seen.shape[0] != batch_size:
            self._real_seen = torch.zeros(batch_size, dtype=torch.long, device=device)
            self._base = torch.zeros(batch_size, dtype=torch.long, device=device)
        valid = None
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -q:].to(device=device, dtype=torch.bool)
            valid = None if bool(valid.all()) else valid
        if valid is None:
            real = self._real_seen[:, None] + torch.arange(q, device=device)
        else:
            real = self._real_seen[:, None] + valid.long().cumsum(-1) - 1
        announced = (self._real_seen, self._base, None)
        if int((real[:, -1] - self._base).max()) >= 2 * self.capacity:
            new_base = (self._real_seen - self.capacity).clamp(min=0)
            delta = new_base - self._base
            for layer in self.layers:
                layer.rebase(delta)
            self._base = new_base
            announced = (announced[0], announced[1], delta)
        positions = (real - self._base[:, None]).clamp(min=0)
        if valid is not None:
            positions = torch.where(valid, positions, torch.zeros_like(positions))
            self._real_seen = self._real_seen + valid.sum(-1)
        else:
            self._real_seen = self._real_seen + q
        self._incoming = (self.get_seq_length(), valid, positions)
        self._announced = announced  # cleared by the first layer update; restored if the forward never gets there
        return positions

    def _map_rows(self, fn) -> None:
        if self._real_seen is not None:
            self._real_seen, self._base = fn(self._real_seen), fn(self._base)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])
        super().batch_select_indices(indices)

    def reset(self) -> None:
        super().reset()
        self._real_seen = self._base = None
        self._incoming = self._announced = None
        self._rows_unpadded = None  # the next first forward decides again

    def sink_tables(
        self, shift: torch.Tensor, device, dtype, rotary: RotaryParams | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin moving the sinks by ``shift`` per row; layers sharing rotary parameters share one computation."""
        rotary = rotary if rotary is not None else self.rotary
        cached = self._sink_tables
        if (
            cached is not None
            and cached[3] is rotary
            and cached[0].device == shift.device
            and cached[1].dtype == dtype
            and torch.equal(cached[0], shift)
        ):
            return cached[1], cached[2]
        cos, sin = shift_tables(shift[:, None, None], rotary, device, dtype)
        self._sink_tables = (shift.clone(), cos, sin, rotary)
        return cos, sin

    def _row_int(self, values: torch.Tensor) -> int | None:
        """The one value of a ``[B]`` / ``[B|1, 1]`` tensor when every row has the same, else ``None``.

        One host read per tensor and forward: the layers of a forward get the same ``position_ids`` (and base)
        tensor, so the lockstep decode path reads it once, not once per layer (docs/design.md §4.1).
        """
        key = id(values)
        hit = self._ints.get(key)
        if hit is not None and hit[0] is values:
            return hit[1]
        if values.dim() > 2 or (values.dim() == 2 and values.shape[-1] != 1):
            result = None
        else:
            rows = values.reshape(-1).tolist()
            result = rows[0] if rows.count(rows[0]) == len(rows) else None
        if len(self._ints) > 8:
            self._ints.clear()
        self._ints[key] = (values, result)
        return result

    def lockstep_sink_tables(
        self, shift: int, rotary: RotaryParams, device, dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin moving the sinks of every row by ``shift`` (``[1, 1, 1, rotary_dim]``); computed once per step
        and rotary (the layers of a forward share it), with the angles in fp64 as in :meth:`sink_tables`."""
        freq = self._rotary_keys.get(id(rotary.inv_freq))
        if freq is None or freq[0] is not rotary.inv_freq:  # layers with equal frequencies share the tables
            freq = self._rotary_keys[id(rotary.inv_freq)] = (rotary.inv_freq, tuple(rotary.inv_freq.tolist()))
        key = (shift, freq[1], rotary.rotary_dim, rotary.interleaved, device, dtype)
        hit = self._lockstep_tables.get(key)
        if hit is not None:
            return hit
        if any(k[0] != shift for k in self._lockstep_tables):
            self._lockstep_tables.clear()  # the previous step's tables
        cos, sin = shift_tables(torch.full((1, 1, 1), shift, dtype=torch.long), rotary, device, dtype)
        self._lockstep_tables[key] = (cos, sin)
        return cos, sin

    def _incoming_for(self, seen: int, q: int):
        """Validity and positions announced by the position hook for the forward starting at ``seen``."""
        if self._incoming is None or self._incoming[0] != seen:
            return None
        _, valid, positions = self._incoming
        if positions is not None and positions.shape[-1] != q:
            positions = positions[:, -q:]
        return valid, positions


def model_rules(model: Any, num_sink_tokens: int, window_length: int) -> list[LayerRule]:
    """Every layer's rule for ``model``, with the rotary parameters of its own buffers (exact)."""
    config = model.config.get_text_config(decoder=True)
    rotaries = layer_rotaries(config, model=model)
    if all(r is None for r in rotaries):
        raise ValueError(
            f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}) has no rotary embedding in "
            "any layer: a SinkCache re-positions sinks by RoPE, so this model cannot stream with one."
        )
    return layer_rules(config, num_sink_tokens, window_length, rotaries)
