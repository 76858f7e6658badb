"""`StaticSinkCache`: a :class:`~hf_sinks.cache.SinkCache` whose decode step ``torch.compile`` and CUDA graphs accept.

Same slot layout and semantics as ``SinkCache`` (docs/design.md §2): ``S`` sink slots plus a ``W``-slot ring per
layer, allocated once. What changes is *how* a one-token step is bookkept:

* every piece of decode state is a device tensor that lives at a fixed address (``keys``, ``values``, the sink
  originals, a per-layer token counter ``count`` and position base ``base``), updated in place; no Python int
  changes per token, nothing is read back to the host, no branch depends on data;
* the new token's slot is computed from ``count`` (``S + (r - S) mod W``) and written with ``index_copy_``;
* the sinks are re-positioned for the query from their originals every step (O(S), angles formed in fp64 from
  ``count``), so the slots always hold what a stock attention needs;
* the attention is plain SDPA/eager over all ``S + W`` slots with transformers' own mask: the filled slots are
  always a prefix of the layout (slot ``s`` holds token ``s`` until the ring wraps), so the causal mask with
  ``kv_length = S + W``, ``kv_offset = 0`` and query offset ``count`` hides exactly the empty slots.

Multi-token chunks (prompts, later turns) stay eager and exact: they go through the ``SinkCache`` machinery (the
``sink_*`` attentions' blocked chunk attention), sharing the same buffers. Before a chunk the eager bookkeeping is
re-derived from ``count`` (one host read per chunk, never per token).

Limits (each refused with a clear error, see :meth:`StaticSinkCache.begin_forward` and ``commit``):

* left-padded batches: rows must stay in lockstep (every row the same number of real tokens);
* beam search / batch expansion after the first forward keep the buffers' addresses (in-place row maps);
* positions are not re-based during compiled decode. With :func:`hf_sinks.apply`, a chunk re-bases them as
  ``SinkCache`` does; during decode they grow from there by one per token, as with transformers' own caches (RoPE
  angles of the model are fp32: fine for streams up to ~10^5-10^6 tokens; re-basing would need a data-dependent
  O(S + W) branch per step, see docs/backends.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import SinkCache, SinkCacheLayer
from .rope import RotaryParams, rotate_with
from .validation import SinkTypeError


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tag buffers as fixed-address (CUDA graphs may then keep them across steps); a no-op while tracing."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        torch._dynamo.mark_static_address(t)


class StaticSinkLayer(SinkCacheLayer):
    """One layer of a :class:`StaticSinkCache`: fixed-address buffers and a tensor-only decode step."""

    is_compileable = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        device = self.device
        self.count = torch.zeros((), dtype=torch.long, device=device)  # real tokens stored so far (all rows alike)
        self.base = torch.zeros((), dtype=torch.long, device=device)  # position base of the window (see begin_forward)
        rotary = self.cache.rotary
        self.inv_freq64 = (
            rotary.inv_freq.to(device=device, dtype=torch.float64) if rotary is not None else None
        )  # fp64 on the device: the sink angle never leaves it
        if self.cache._base is not None:  # the position hook already re-based (a first chunk past 2 (S + W))
            self.base.fill_(int(self.cache._base[0]))
        _mark_static(self.keys, self.values, self.sink_keys, self.count, self.base)
        if self.inv_freq64 is not None:
            _mark_static(self.inv_freq64)

    # --------------------------------------------------------------- sizes
    def get_seq_length(self) -> torch.Tensor | int:
        """Tokens seen, as a device tensor (``generate`` and the model derive positions from it without a sync)."""
        return self.count if self.is_initialized else 0

    def stored_length(self) -> int:
        """Slots in use (at most ``S + W``); reads the device counter (a host sync: not for compiled code)."""
        return min(int(self.count), self.capacity) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 1:
            # all S + W slots; with the query offset ``count`` the causal rule hides exactly the empty slots
            return self.capacity, 0
        self.cache._sync_eager_state()
        return super().get_mask_sizes(query_length)

    # -------------------------------------------------------------- update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if q != 1:  # a chunk: eager SinkCache machinery on the same buffers
            self.cache._sync_eager_state()
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self.count.add_(q)
            return keys, values
        if self.pending is not None:  # a one-layer model's chunk left by a stock attention (eager only)
            self.commit()
        return self._decode(key_states, value_states)

    def _decode(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for every row: write it into its slot, re-position the sinks for it. Tensor ops only."""
        s, w, cap = self.num_sink_tokens, self.window_length, self.capacity
        r = self.count  # real index of the new token
        ring = (s + (r - s).remainder(w)).reshape(1)  # its ring slot (for r < S: an empty, masked slot)
        key_states = key_states.to(self.keys.dtype)
        if not s:
            self.keys.index_copy_(2, ring, key_states)
            self.values.index_copy_(2, ring, value_states.to(self.values.dtype))
        else:
            j = r.clamp(max=s - 1).reshape(1)
            original = torch.where(r < s, key_states.to(self.sink_keys.dtype), self.sink_keys.index_select(2, j))
            self.sink_keys.index_copy_(2, j, original)
            # the query sits at position r - base; it must see sink j at cache position j (docs/design.md §2.2)
            shift = (r - self.base) - r.clamp(max=cap - 1)
            angles = shift.to(torch.float64) * self.inv_freq64
            angles = torch.cat((angles, angles), dim=-1)
            compute = torch.promote_types(self.keys.dtype, torch.float32)
            sinks = rotate_with(self.sink_keys, angles.cos().to(compute), angles.sin().to(compute), angles.shape[-1])
            # ONE in-place write per buffer (the shifted sinks and the new key together): inductor then updates the
            # buffer in place instead of cloning all S + W slots. A sink (r < S) reaches its slot through `sinks`.
            slots = torch.cat((torch.arange(s, device=ring.device), ring))
            self.keys.index_copy_(2, slots, torch.cat((sinks.to(self.keys.dtype), key_states), dim=2))
            value_slot = torch.where(r < s, r, ring[0]).reshape(1)
            self.values.index_copy_(2, value_slot, value_states.to(self.values.dtype))
        self.count.add_(1)
        return self.keys, self.values

    # ---------------------------------------------------------- eager sync
    def _sync_from_count(self, n: int, base: int) -> None:
        """Re-derive the eager ``SinkCacheLayer`` bookkeeping after tensor-only decode steps (``n`` real tokens)."""
        s, w, cap = self.num_sink_tokens, self.window_length, self.capacity
        batch, device = self.keys.shape[0], self.device
        slots = torch.arange(cap, device=device)
        # the newest token r < n that lives in each slot (-1: never written)
        k = slots - s
        newest = s + k + w * torch.div(n - 1 - s - k, w, rounding_mode="floor")
        real = torch.where(slots < s, slots, newest)
        real = torch.where((real >= 0) & (real < n) & ((slots < s) | (n - 1 >= slots)), real, torch.full_like(real, -1))
        positions = torch.where(slots < s, real, real - base).clamp(min=0)
        positions = torch.where(real >= 0, positions, torch.zeros_like(positions))
        self.real_idx = real[None].expand(batch, cap).clone()
        self.positions = positions[None].expand(batch, cap).clone()
        self.real_seen = torch.full((batch,), n, dtype=torch.long, device=device)
        n_sinks = min(s, n)
        if n_sinks:  # slots hold the sinks as first rotated again
            self.keys[:, :, :n_sinks] = self.sink_keys[:, :, :n_sinks]
        self.sink_shift = torch.zeros(batch, dtype=torch.long, device=device)
        self.seen = n
        self.uniform = n
        self.filled = min(n, cap)

    # ---------------------------------------------------------- refusals
    def commit(self, valid: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        if valid is None and self._pending_info is not None:
            valid = self._pending_info[0]
        if valid is not None and not bool(valid.all()):
            self.pending = self._pending_info = None
            raise ValueError(_PADDED)
        super().commit(valid, positions)

    def _map_rows(self, fn) -> None:
        """Beam reorder / batch selection in place, so the buffers keep the addresses compiled graphs hold."""
        if not self.is_initialized:
            return
        self.cache._sync_eager_state()
        for name in ("keys", "values", "sink_keys"):
            old = getattr(self, name)
            new = fn(old)
            if new.shape != old.shape:
                raise ValueError(
                    "StaticSinkCache has a fixed batch size once allocated; build it for the final batch size "
                    "(e.g. num_return_sequences x batch) or call reset() first."
                )
            old.copy_(new)
        for name in ("real_idx", "positions", "real_seen", "sink_shift"):
            setattr(self, name, fn(getattr(self, name)))

    def reset(self) -> None:
        if self.is_initialized:  # keep the addresses compiled graphs hold
            for t in (self.keys, self.values, self.sink_keys, self.count, self.base):
                t.zero_()
            self.real_idx.fill_(-1)
            self.positions.zero_()
            self.real_seen.zero_()
            self.sink_shift.zero_()
            self.filled = self.seen = self.uniform = 0
            self.pending = self._pending_info = None
            self.acknowledged = None
            self._acknowledged_now = False
            return
        super().reset()


_PADDED = (
    "StaticSinkCache streams batches whose rows stay in lockstep and has no left padding (its compiled decode step "
    "keeps one token counter for all rows); use hf_sinks.SinkCache for padded batches."
)


class StaticSinkCache(SinkCache):
    """A :class:`~hf_sinks.cache.SinkCache` for compiled decoding (``torch.compile``, CUDA graphs).

    ``is_compileable`` is True, so ``generate`` on CUDA compiles the decode step through transformers' own path
    (``generation_config.compile_config``). Elsewhere, compile the step yourself::

        cache = hf_sinks.StaticSinkCache(4, 1020, config=model.config)
        out = model(prompt, use_cache=True, **cache_kwargs(cache))           # eager prefill (any length)
        step = torch.compile(model.forward, fullgraph=True)
        out = step(input_ids=next_ids, use_cache=True, **cache_kwargs(cache))  # compiled decode, past capacity

    Works with stock ``"sdpa"``/``"eager"`` and the ``sink_*`` attentions, with or without :func:`hf_sinks.apply`.
    See the module docstring for the layout and the limits (no padding, fixed batch size).

    Args:
        num_sink_tokens: sinks ``S`` (>= 0).
        window_length: recent window ``W`` (>= 1), the query included.
        config: the model's transformers config (required unless ``rotary`` and ``num_layers`` are given): number of
            layers, rotary parameters for the sink shift.
        rotary: explicit :class:`~hf_sinks.rope.RotaryParams` (takes precedence over ``config``).
        num_layers: number of decoder layers (default: from ``config``).
    """

    def __init__(
        self,
        num_sink_tokens: int = 4,
        window_length: int = 1020,
        *,
        config: Any = None,
        rotary: RotaryParams | None = None,
        num_layers: int | None = None,
    ):
        super().__init__(num_sink_tokens, window_length, config=config, rotary=rotary)
        if num_layers is None:
            if config is None:
                raise SinkTypeError(
                    "StaticSinkCache allocates its layers up front: pass config=model.config (or num_layers= and "
                    "rotary=), or build it with StaticSinkCache.from_model(model)."
                )
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_sink_tokens > 0 and self.rotary is None:
            raise SinkTypeError(
                "StaticSinkCache shifts its sinks inside the cache (compiled steps bring no rotary parameters): pass "
                "config=model.config or rotary=RotaryParams.from_model(model)."
            )
        self.layers.extend(StaticSinkLayer(self) for _ in range(int(num_layers)))

    @classmethod
    def from_model(
        cls, model: Any, num_sink_tokens: int | None = None, window_length: int | None = None
    ) -> "StaticSinkCache":
        """Build for ``model``: sizes from ``model.config.attention_sinks`` (or defaults), the model's rotary."""
        from .config import SinkConfig

        sink_config = SinkConfig.for_model(model.config, num_sink_tokens, window_length)
        return cls(
            sink_config.num_sink_tokens,
            sink_config.window_length,
            rotary=RotaryParams.from_model(model),
            num_layers=model.config.get_text_config(decoder=True).num_hidden_layers,
        )

    @classmethod
    def from_sink_cache(cls, cache: SinkCache) -> "StaticSinkCache":
        """A ``StaticSinkCache`` holding a copy of ``cache``'s state: prefill with a ``SinkCache`` (e.g. a prompt
        ``generate`` streamed), then continue it in compiled decode steps. See :meth:`copy_from`."""
        if not isinstance(cache, SinkCache) or isinstance(cache, StaticSinkCache):
            raise SinkTypeError(f"from_sink_cache needs a hf_sinks.SinkCache, not {type(cache).__name__}.")
        static = cls(cache.num_sink_tokens, cache.window_length, rotary=cache.rotary, num_layers=len(cache.layers))
        static.copy_from(cache)
        return static

    def copy_from(self, cache: SinkCache) -> None:
        """Take over the state of an eager ``SinkCache`` of the same sizes, in place (the buffers keep their
        addresses, so a compiled step keeps working). O(S + W) per layer.

        Raises:
            ValueError: other sizes or layer count, rows not in lockstep (left padding), or a chunk not yet stored.
        """
        if (cache.num_sink_tokens, cache.window_length, len(cache.layers)) != (
            self.num_sink_tokens,
            self.window_length,
            len(self.layers),
        ):
            raise ValueError(
                f"copy_from: the SinkCache has S={cache.num_sink_tokens}, W={cache.window_length}, "
                f"{len(cache.layers)} layers; this StaticSinkCache has S={self.num_sink_tokens}, "
                f"W={self.window_length}, {len(self.layers)} layers."
            )
        if self.rotary is None:
            self.rotary = cache.rotary
        self._rotary_bound = self._rotary_bound or cache._rotary_bound
        for layer in cache.layers:
            if layer.is_initialized and layer.pending is not None:
                layer.commit()
        for mine, theirs in zip(self.layers, cache.layers):
            if not theirs.is_initialized:
                if mine.is_initialized:
                    mine.reset()
                continue
            if theirs.uniform is None or bool((theirs.real_idx[:, : theirs.filled] < 0).any()):
                raise ValueError(_PADDED)
            n = theirs.uniform
            if mine.is_initialized and mine.keys.shape != theirs.keys.shape:
                raise ValueError(
                    f"copy_from: this StaticSinkCache holds buffers of shape {tuple(mine.keys.shape)}, the SinkCache "
                    f"{tuple(theirs.keys.shape)}; call reset() or build a new one with from_sink_cache."
                )
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys[:, :, :0], theirs.values[:, :, :0])
            offset = theirs.positions[:, 0] - theirs.real_idx[:, 0].clamp(min=0)
            if theirs.filled and bool((offset != 0).any()):
                raise ValueError("copy_from: the SinkCache's sinks were not rotated at positions 0..S-1.")
            base = 0 if cache._base is None else int(cache._base[0])
            mine.keys.copy_(theirs.keys)
            mine.values.copy_(theirs.values)
            mine.sink_keys.copy_(theirs.sink_keys)
            mine.count.fill_(n)
            mine.base.fill_(base)
            mine._sync_from_count(n, base)
            mine.pending = mine._pending_info = None
            mine.acknowledged, mine._acknowledged_now = theirs.acknowledged, theirs._acknowledged_now
        if cache._real_seen is not None:
            self._real_seen, self._base = cache._real_seen.clone(), cache._base.clone()
        else:
            self._real_seen = self._base = None
        self._incoming = self._announced = None

    def __repr__(self) -> str:
        return (
            f"StaticSinkCache(num_sink_tokens={self.num_sink_tokens}, window_length={self.window_length}, "
            f"layers={len(self.layers)})"
        )

    # --------------------------------------------------------------- update
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise IndexError(f"StaticSinkCache has {len(self.layers)} layers; the model updated layer {layer_idx}.")
        layer = self.layers[layer_idx]
        if key_states.shape[-2] == 1 and layer.is_initialized and layer.pending is None:
            # the compiled path: only shapes are checked (static; a mismatch is a guard failure, then this error)
            if key_states.shape[0] != layer.keys.shape[0] or key_states.shape[1] != layer.keys.shape[1]:
                raise ValueError(
                    f"StaticSinkCache layer {layer_idx} holds batch {layer.keys.shape[0]} x {layer.keys.shape[1]} KV "
                    f"heads; got keys of shape {tuple(key_states.shape)}. Call reset() to start another batch."
                )
            return layer.update(key_states, value_states)
        if layer_idx == 0:
            self._sync_eager_state()
        stock = layer_idx > 0 and key_states.shape[-2] > 1 and self._stock_attention_in_step(layer_idx)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if stock:  # the returned keys are a fresh concatenation: store the chunk now, not at the (compiled) next step
            layer.commit()
        return keys, values

    def _stock_attention_in_step(self, layer_idx: int) -> bool:
        """At layer ``layer_idx`` of a chunk forward: did a stock attention (no ``sink_*`` function) take the previous
        layer's chunk? Then store that chunk now (its attention is done) and say so, so this layer stores its own.

        ``SinkCache`` stores such a chunk at the next update; here the next update is a compiled decode step, which
        must not run eager bookkeeping. (A one-layer model with a stock attention stores it at its first decode
        step, which must then run eagerly.)"""
        previous = self.layers[layer_idx - 1]
        if previous.pending is None or previous._acknowledged_now:
            return False
        previous.commit()
        return True

    # -------------------------------------------------------------- eager sync
    def _sync_eager_state(self) -> None:
        """Before eager work (a chunk): re-derive each layer's eager bookkeeping from its device counter if decode
        steps ran since (one host read per layer and chunk, never per token)."""
        synced = None
        for layer in self.layers:
            if not layer.is_initialized or layer.pending is not None:
                continue  # never used, or inside a chunk forward: its bookkeeping is current
            n = int(layer.count)
            if layer.seen != n:  # tensor-only decode steps since the last eager update
                layer._sync_from_count(n, int(layer.base))
                synced = n
        if synced is not None and self._real_seen is not None:
            self._real_seen = torch.full_like(self._real_seen, synced)

    # --------------------------------------------------------------- positions
    def begin_forward(self, batch_size: int, q: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
        """The position hook's entry: positions ``count - base`` as device tensors for a decode step (no host sync,
        no graph break); a chunk goes through ``SinkCache.begin_forward`` (eager, may re-base)."""
        first = self.layers[0] if self.layers else None
        if q == 1 and first is not None and first.is_initialized:
            if first.keys.shape[0] != batch_size:
                raise ValueError(
                    f"This StaticSinkCache holds batch {first.keys.shape[0]}; the forward brings {batch_size} rows."
                )
            return (first.count - first.base).reshape(1, 1).expand(batch_size, 1).to(device)
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, -q:].all()):
            raise ValueError(_PADDED)
        self._sync_eager_state()
        positions = super().begin_forward(batch_size, q, attention_mask, device)
        if self._base is not None:
            new_base = self._base[0]
            for layer in self.layers:
                if layer.is_initialized:
                    layer.base.copy_(new_base)
        return positions

    def _incoming_for(self, seen: int, q: int):
        if self._incoming is None or int(self._incoming[0]) != seen:
            return None
        _, valid, positions = self._incoming
        return valid, positions[:, -q:] if positions is not None else None
