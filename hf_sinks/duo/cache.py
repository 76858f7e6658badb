"""`DuoCache`: retrieval heads keep the full KV, streaming heads sinks + window, in separate tensors."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ..cache_layers import RowStateLayer, grow_layers, refuse_crop, tag_keys
from ..validation import (
    SinkTypeError,
    check_cache_size,
    check_cache_update,
    check_int,
)
from ..visibility import sink_visible
from .pattern import HeadPattern

#: ``attn_implementation`` name of the inference attention (retrieval heads dense, streaming heads sink + window).
DUO_ATTENTION = "duo_sdpa"
#: Queries per block for streaming heads in a multi-token chunk: scores bounded by ``block x (S + W + block)``.
QUERY_BLOCK = 512


def _streaming_indices(seen: int, s: int, w: int) -> torch.Tensor:
    """Absolute indices a streaming head holds after ``seen`` tokens: the sinks and the last ``W``, ascending."""
    if seen <= s + w:
        return torch.arange(seen)
    return torch.cat([torch.arange(s), torch.arange(seen - w, seen)])


def visibility_mask(
    query_index: torch.Tensor, key_index: torch.Tensor, num_sink_tokens: int, window_length: int
) -> torch.Tensor:
    """``[q, k]`` bool: query ``i`` sees key ``j`` iff ``j <= i`` and (``j < S`` or ``i - j < W``).

    The outer form of :func:`hf_sinks.visibility.sink_visible` over two index vectors."""
    return sink_visible(query_index[:, None], key_index[None, :], num_sink_tokens, window_length)


class DuoCacheLayer(RowStateLayer):
    """One layer of a :class:`DuoCache`: retrieval heads' full KV and streaming heads' sinks + window, apart.

    State: ``retrieval_keys``/``retrieval_values`` ``[B, R, seen, D]`` and ``streaming_keys``/``streaming_values``
    ``[B, KVH - R, min(seen, S + W), D]`` (sinks then the window, in text order; which absolute indices they hold
    follows from ``seen`` alone). Tensors hold exactly their tokens (fresh ``cat``s, no over-allocated views), so
    their storage is the memory the cache costs.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: "DuoCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.seen = 0
        self.pending: tuple[torch.Tensor, torch.Tensor, int] | None = None  # new keys/values, index of the first

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        retrieval = self.cache.pattern.retrieval[self.layer_idx]
        if kv_heads != retrieval.numel():
            raise ValueError(
                f"DuoCache layer {self.layer_idx}: the model has {kv_heads} KV heads but the HeadPattern has "
                f"{retrieval.numel()}; build the pattern for this model (HeadPattern.validate(model.config))."
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        # a tuple, so memory accounting that sums a layer's tensor attributes counts only the KV
        self.heads = (retrieval.nonzero().flatten().to(self.device), (~retrieval).nonzero().flatten().to(self.device))
        dv = value_states.shape[-1]
        retrieval_heads, streaming_heads = self.heads
        self.retrieval_keys = key_states.new_zeros(batch, len(retrieval_heads), 0, head_dim)
        self.retrieval_values = value_states.new_zeros(batch, len(retrieval_heads), 0, dv)
        self.streaming_keys = key_states.new_zeros(batch, len(streaming_heads), 0, head_dim)
        self.streaming_values = value_states.new_zeros(batch, len(streaming_heads), 0, dv)
        self.is_initialized = True

    def get_max_length(self) -> int:
        return -1  # retrieval heads grow without bound

    def stored_lengths(self) -> tuple[int, int]:
        """Tokens held by ``(retrieval heads, streaming heads)``."""
        if not self.is_initialized:
            return 0, 0
        return self.retrieval_keys.shape[-2], self.streaming_keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the lazy mask (sink_sdpa_mask) is only materialised by the stock fallback, which sees no DuoCache
        return self.seen + query_length, 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.refuse_unattended_pending(
            "DuoCache",
            DUO_ATTENTION,
            "duo",
            "consume the cache (a stock attention cannot attend heads over keys of different lengths)",
        )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states, self.seen)
        self.seen += key_states.shape[-2]
        # only the new chunk goes to the attention function, which finds the stored heads through the tag
        keys = key_states.view_as(key_states)
        tag_keys(keys, self)
        return keys, value_states

    # ------------------------------------------------------------------------------- attention
    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the pending chunk's queries ``[B, H, q, D]``; stores the chunk. Returns ``[B, H, q, Dv]``."""
        if self.pending is None:
            raise ValueError("DuoCacheLayer.attend called without a pending update.")
        new_keys, new_values, first = self.pending
        self.pending = None
        batch, heads, q, _ = query.shape
        kv_heads = new_keys.shape[1]
        groups = heads // kv_heads
        out = query.new_empty(batch, heads, q, new_values.shape[-1])
        retrieval_heads, streaming_heads = self.heads
        if len(retrieval_heads):
            qh = _query_heads(retrieval_heads, groups)
            self.retrieval_keys = torch.cat([self.retrieval_keys, new_keys[:, retrieval_heads]], dim=2)
            self.retrieval_values = torch.cat([self.retrieval_values, new_values[:, retrieval_heads]], dim=2)
            out[:, qh] = _causal_attention(query[:, qh], self.retrieval_keys, self.retrieval_values, first, scaling)
        if len(streaming_heads):
            qh = _query_heads(streaming_heads, groups)
            keys = torch.cat([self.streaming_keys, new_keys[:, streaming_heads]], dim=2)
            values = torch.cat([self.streaming_values, new_values[:, streaming_heads]], dim=2)
            out[:, qh] = self._streaming_attention(query[:, qh], keys, values, first, scaling)
            self.streaming_keys, self.streaming_values = self._trim(keys, values, first + q)
        return out

    def _position(self, j: int, first: int) -> int:
        """Where absolute index ``j >= S`` (held or new) sits in ``cat(stored streaming keys, new keys)``."""
        s, w = self.cache.num_sink_tokens, self.cache.window_length
        return j if first <= s + w else s + j - (first - w)

    def _streaming_attention(self, query, keys, values, first, scaling):
        s, w = self.cache.num_sink_tokens, self.cache.window_length
        q = query.shape[2]
        index = torch.cat([_streaming_indices(first, s, w), torch.arange(first, first + q)])
        sinks = min(s, first + q)  # the sinks are a prefix of the held + new keys
        outs = []
        for b0 in range(0, q, QUERY_BLOCK):
            b1 = min(q, b0 + QUERY_BLOCK)
            # the block sees the sinks plus one contiguous run of the others: [max(S, i0 - W + 1), i1]
            lo = self._position(max(s, first + b0 - w + 1), first)
            hi = self._position(first + b1, first)
            lo = max(lo, sinks)
            cols = torch.cat([torch.arange(sinks), torch.arange(lo, max(lo, hi))])
            if b1 - b0 == 1:  # decode: the sinks and the run above are exactly the query's visible keys
                mask = None
            else:
                mask = visibility_mask(torch.arange(first + b0, first + b1), index[cols], s, w).to(query.device)
            cols = cols.to(query.device)
            k, v = keys.index_select(2, cols), values.index_select(2, cols)
            gqa = query.shape[1] != k.shape[1]
            block = query[:, :, b0:b1]
            outs.append(F.scaled_dot_product_attention(block, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _trim(self, keys, values, total):
        s, w = self.cache.num_sink_tokens, self.cache.window_length
        if total <= s + w:
            return keys, values  # fresh cat: exactly these tokens
        start = keys.shape[2] - w  # the last W of the others (held + new are contiguous after the sinks)
        keys = torch.cat([keys[:, :, :s], keys[:, :, start:]], dim=2)
        return keys, torch.cat([values[:, :, :s], values[:, :, start:]], dim=2)

    # ------------------------------------------------------------------------------- batch ops
    _ROW_STATE = ("retrieval_keys", "retrieval_values", "streaming_keys", "streaming_values")

    def crop(self, max_length: int) -> None:
        refuse_crop("DuoCache", "streaming-head tokens")


def _query_heads(kv_heads: torch.Tensor, groups: int) -> torch.Tensor:
    """Query heads of the given KV heads, grouped in order (so GQA's ``h // groups`` pairing survives the gather)."""
    return (kv_heads[:, None] * groups + torch.arange(groups, device=kv_heads.device)).flatten()


def _causal_attention(query, keys, values, first, scaling):
    """Queries at absolute ``first..first+q-1`` over keys ``0..n-1`` (``n = first + q``), causally."""
    q, n = query.shape[2], keys.shape[2]
    gqa = query.shape[1] != keys.shape[1]
    if q == 1:
        mask = None
    else:
        mask = torch.arange(n, device=query.device)[None] <= first + torch.arange(q, device=query.device)[:, None]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)


class DuoCache(Cache):
    """Head-wise cache of DuoAttention: full KV for retrieval heads, sinks + window for streaming heads.

    See the module docstring for the semantics. Needs ``attn_implementation="duo_sdpa"`` (:func:`register`);
    rows must not be padded (every row holds the same tokens count).

    Args:
        pattern: which (layer, KV head) is a retrieval head; ``[num_hidden_layers, num_key_value_heads]``.
        num_sink_tokens: ``S`` first tokens streaming heads keep (>= 0). DuoAttention deploys 64.
        window_length: ``W`` most recent tokens streaming heads keep, the query included (>= 1). DuoAttention: 256.
        config: optional model config to :meth:`HeadPattern.validate` the pattern against now.
    """

    def __init__(
        self, pattern: HeadPattern, num_sink_tokens: int = 64, window_length: int = 256, *, config: Any = None
    ):
        if not isinstance(pattern, HeadPattern):
            raise SinkTypeError(
                f"pattern={type(pattern).__name__}(...) is invalid: must be a HeadPattern (HeadPattern.load(path), "
                f"HeadPattern.from_scores(...)), not {type(pattern).__name__}."
            )
        check_int("num_sink_tokens", num_sink_tokens, 0)
        check_int("window_length", window_length, 1)
        check_cache_size("DuoCache", num_sink_tokens=num_sink_tokens, window_length=window_length)
        if config is not None:
            pattern.validate(config)
        self._validated_config = config is not None  # else duo_sdpa validates against the model's config
        super().__init__(layers=[])
        self.pattern = pattern
        self.num_sink_tokens = num_sink_tokens
        self.window_length = window_length

    @classmethod
    def from_model(
        cls, model: Any, pattern: HeadPattern, num_sink_tokens: int = 64, window_length: int = 256
    ) -> "DuoCache":
        """Build for ``model`` (validates the pattern against its config)."""
        return cls(pattern, num_sink_tokens, window_length, config=model.config)

    def __repr__(self) -> str:
        return (
            f"DuoCache(num_sink_tokens={self.num_sink_tokens}, window_length={self.window_length}, "
            f"streaming_fraction={self.pattern.streaming_fraction:.3f}, layers={len(self.layers)}, "
            f"seen={self.get_seq_length()})"
        )

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= self.pattern.num_layers:
            raise ValueError(
                f"DuoCache got layer {layer_idx} but its HeadPattern has {self.pattern.num_layers} layers: the pattern "
                f"is another model's; build one for this model (HeadPattern.validate(model.config))."
            )
        layer = grow_layers(self.layers, layer_idx, lambda i: DuoCacheLayer(self, i))
        held = None
        if layer.is_initialized:
            keys = layer.retrieval_keys if layer.retrieval_keys.shape[1] else layer.streaming_keys
            held = (keys.shape[0], len(layer.heads[0]) + len(layer.heads[1]), keys.shape[-1])
        check_cache_update("DuoCache", self.layers, layer_idx, key_states, held)
        return layer.update(key_states, value_states, *args, **kwargs)

    def validate_model_config(self, config: Any) -> None:
        """Check the pattern against the model's config once (``duo_sdpa`` calls it with ``module.config``)."""
        if not self._validated_config:
            self.pattern.validate(config)
            self._validated_config = True

    def get_stored_lengths(self, layer_idx: int = 0) -> tuple[int, int]:
        """Tokens held by ``layer_idx``'s ``(retrieval heads, streaming heads)``."""
        return self.layers[layer_idx].stored_lengths() if layer_idx < len(self.layers) else (0, 0)

    def stored_bytes(self) -> int:
        """Bytes of the keys and values held, all layers (what :func:`hf_sinks.eval.memory.cache_bytes` counts)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += sum(
                    getattr(layer, n).numel() * getattr(layer, n).element_size() for n in DuoCacheLayer._ROW_STATE
                )
        return total

    def crop(self, max_length: int) -> None:
        refuse_crop("DuoCache", "streaming-head tokens")
