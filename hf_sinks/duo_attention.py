"""DuoAttention (Xiao et al., ICLR 2025): retrieval heads keep the full KV cache, streaming heads only sinks + window.

Every (layer, KV head) is either a **retrieval head** (full KV, grows with the text) or a **streaming head**
(``num_sink_tokens`` first tokens + the ``window_length`` most recent, bounded). Which is which is a
:class:`HeadPattern`, identified by optimisation (:func:`identify_heads`, DuoAttention §3.2) or by a heuristic
(:func:`attention_mass_scores`). GQA groups stay together: the pattern is per *KV* head.

Semantics (what the tests check against a per-head full-sequence reference):

* **Visibility.** A retrieval head's query ``i`` sees every key ``j <= i``; a streaming head's query ``i`` sees key
  ``j`` iff ``j <= i`` and (``j < S`` or ``i - j < W``) (DESIGN §2's rule, per head). This holds for decoding and for
  every query of a multi-token chunk (chunked prefill of a prompt longer than ``S + W``).
* **Positions: the model's absolute positions, for every head (DuoAttention's setting: long-context models used
  within their trained context).** The cache reports every token seen through ``get_seq_length``, so the model
  rotates token ``t`` at position ``t`` as it would with a ``DynamicCache``; streaming heads keep their keys rotated
  at their *original* positions and are never re-rotated (unlike :class:`~hf_sinks.SinkCache`'s cache-relative
  positions). Query-key distances are the true ones; past the model's trained context RoPE extrapolates, so use
  a SinkCache for unbounded streams.
* **Memory.** Retrieval and streaming heads live in separate tensors per layer: ``[B, R, n, D]`` for the ``R``
  retrieval heads and ``[B, KVH - R, min(n, S + W), D]`` for the streaming ones, so after ``n`` tokens the cache
  holds ``(1 - f) * n + f * (S + W)`` token slots per KV head on average (``f`` = streaming fraction).

The cache needs ``attn_implementation="duo_sdpa"`` (call :func:`register`, which ``import hf_sinks`` may do): a
stock attention cannot attend heads over keys of different lengths. Without a ``DuoCache`` ``duo_sdpa`` is stock
SDPA. ::

    hf_sinks.duo_attention.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="duo_sdpa")
    pattern = HeadPattern.load("pattern.safetensors")          # or identify_heads(model, tokenizer=tok)
    cache = DuoCache(pattern, num_sink_tokens=64, window_length=256)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=200)
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

#: ``attn_implementation`` name of the inference attention (retrieval heads dense, streaming heads sink + window).
DUO_ATTENTION = "duo_sdpa"
#: ``attn_implementation`` name of the gated training attention (``alpha * full + (1 - alpha) * streaming``).
DUO_GATE_ATTENTION = "duo_gate"
#: Attribute set on the key tensor returned by ``update`` so the attention function can find the layer.
LAYER_ATTRIBUTE = "_hf_sinks_duo_layer"
#: Queries per block for streaming heads in a multi-token chunk: scores bounded by ``block x (S + W + block)``.
QUERY_BLOCK = 512
#: Format tag written into saved patterns.
PATTERN_FORMAT = "hf_sinks.HeadPattern"


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


def _kv_shape(config: Any) -> tuple[int, int]:
    """``(num_hidden_layers, num_key_value_heads)`` of a transformers config (MHA models: KV heads = heads)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(layers), int(kv_heads)


# ------------------------------------------------------------------------------------------------- pattern
@dataclass
class HeadPattern:
    """Which (layer, KV head) is a retrieval head (full KV) and which a streaming head (sinks + window).

    Attributes:
        retrieval: ``[num_layers, num_key_value_heads]`` bool, ``True`` = retrieval head.
        scores: optional ``[num_layers, num_key_value_heads]`` float, higher = more retrieval-like (DuoAttention's
            gate ``alpha``, or a heuristic score); what :meth:`from_scores` binarised.
        metadata: JSON-serialisable extras (how the pattern was made: sizes, steps, source...).
    """

    retrieval: torch.Tensor
    scores: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        retrieval = torch.as_tensor(self.retrieval)
        if retrieval.dim() != 2 or retrieval.numel() == 0:
            raise ValueError(
                f"HeadPattern.retrieval must be a non-empty [num_layers, num_key_value_heads] tensor, got shape "
                f"{tuple(retrieval.shape)}."
            )
        if retrieval.dtype != torch.bool:
            if retrieval.is_floating_point() or not bool(((retrieval == 0) | (retrieval == 1)).all()):
                raise ValueError(
                    f"HeadPattern.retrieval must be boolean (or 0/1 integers), got dtype {retrieval.dtype}; "
                    "use HeadPattern.from_scores to binarise scores."
                )
            retrieval = retrieval.bool()
        self.retrieval = retrieval.cpu()
        if self.scores is not None:
            scores = torch.as_tensor(self.scores, dtype=torch.float32).cpu()
            if scores.shape != self.retrieval.shape:
                raise ValueError(
                    f"HeadPattern.scores has shape {tuple(scores.shape)}, retrieval {tuple(self.retrieval.shape)}: "
                    "they must match."
                )
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("HeadPattern.scores must be finite (no NaN or inf).")
            self.scores = scores
        if not isinstance(self.metadata, dict):
            raise ValueError(f"HeadPattern.metadata must be a dict, got {type(self.metadata).__name__}.")

    # ---------------------------------------------------------------------------- constructors
    @classmethod
    def from_scores(
        cls,
        scores: torch.Tensor,
        sparsity: float | None = None,
        threshold: float | None = None,
        metadata: dict | None = None,
    ) -> "HeadPattern":
        """Binarise per-(layer, KV head) scores (higher = retrieval), as DuoAttention's deployment does.

        Exactly one of:
            sparsity: fraction of heads made **streaming**, in ``[0, 1]``: the ``round(sparsity * n)`` lowest scores
                (ties: the earlier head in layer-major order).
            threshold: heads with ``score >= threshold`` are retrieval heads.
        """
        if (sparsity is None) == (threshold is None):
            raise ValueError(f"Give exactly one of sparsity= or threshold= (got sparsity={sparsity!r}, threshold={threshold!r}).")
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
        if scores.dim() != 2 or scores.numel() == 0:
            raise ValueError(f"scores must be a non-empty [num_layers, num_key_value_heads] tensor, got {tuple(scores.shape)}.")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores must be finite (no NaN or inf).")
        if sparsity is not None:
            if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
                raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1] (the fraction of streaming heads).")
            flat = scores.flatten()
            k = round(sparsity * flat.numel())
            order = torch.argsort(flat, stable=True)
            retrieval = torch.ones_like(flat, dtype=torch.bool)
            retrieval[order[:k]] = False
            retrieval = retrieval.view_as(scores)
        else:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
                raise ValueError(f"threshold={threshold!r} must be a finite number.")
            retrieval = scores >= threshold
        meta = dict(metadata or {})
        meta.update({"sparsity": sparsity} if sparsity is not None else {"threshold": threshold})
        return cls(retrieval, scores, meta)

    @classmethod
    def full(cls, config: Any) -> "HeadPattern":
        """Every head a retrieval head (a ``DuoCache`` with it behaves as a ``DynamicCache``)."""
        return cls(torch.ones(_kv_shape(config), dtype=torch.bool))

    @classmethod
    def streaming(cls, config: Any) -> "HeadPattern":
        """Every head a streaming head (sinks + window everywhere, at absolute positions)."""
        return cls(torch.zeros(_kv_shape(config), dtype=torch.bool))

    # ------------------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return self.retrieval.shape[0]

    @property
    def num_key_value_heads(self) -> int:
        return self.retrieval.shape[1]

    @property
    def streaming_fraction(self) -> float:
        """Fraction of (layer, KV head) pairs that are streaming heads."""
        return 1.0 - float(self.retrieval.float().mean())

    def validate(self, config: Any) -> "HeadPattern":
        """Raise ``ValueError`` unless the pattern is ``[num_hidden_layers, num_key_value_heads]`` of ``config``."""
        expected = _kv_shape(config)
        if tuple(self.retrieval.shape) != expected:
            raise ValueError(
                f"HeadPattern has shape {tuple(self.retrieval.shape)} but the model has {expected[0]} layers x "
                f"{expected[1]} KV heads; the pattern must be [num_hidden_layers, num_key_value_heads]."
            )
        return self

    def __repr__(self) -> str:
        return (f"HeadPattern(layers={self.num_layers}, kv_heads={self.num_key_value_heads}, "
                f"streaming_fraction={self.streaming_fraction:.3f}, scores={self.scores is not None})")

    # ---------------------------------------------------------------------------------- storage
    def to_dict(self) -> dict:
        return {
            "format": PATTERN_FORMAT,
            "version": 1,
            "retrieval": self.retrieval.int().tolist(),
            "scores": None if self.scores is None else self.scores.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "HeadPattern":
        if not isinstance(data, dict) or data.get("format") != PATTERN_FORMAT:
            raise ValueError(f"Not a saved HeadPattern (expected format={PATTERN_FORMAT!r}).")
        scores = data.get("scores")
        return cls(torch.tensor(data["retrieval"]), None if scores is None else torch.tensor(scores), data.get("metadata") or {})

    def save(self, path: str | Path) -> Path:
        """Write to ``*.safetensors`` (tensors + JSON metadata in the header) or ``*.json``, by extension."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        elif path.suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {"retrieval": self.retrieval.to(torch.uint8).contiguous()}
            if self.scores is not None:
                tensors["scores"] = self.scores.contiguous()
            save_file(tensors, str(path), metadata={"format": PATTERN_FORMAT, "metadata": json.dumps(self.metadata)})
        else:
            raise ValueError(f"Unknown pattern file extension {path.suffix!r} in {str(path)!r}; use .safetensors or .json.")
        return path

    @classmethod
    def load(cls, path: str | Path, config: Any = None) -> "HeadPattern":
        """Read a pattern written by :meth:`save`; with ``config``, also :meth:`validate` it."""
        path = Path(path)
        if path.suffix == ".json":
            pattern = cls.from_dict(json.loads(path.read_text()))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != PATTERN_FORMAT:
                    raise ValueError(f"{str(path)!r} is not a saved HeadPattern (expected format={PATTERN_FORMAT!r}).")
                names = set(f.keys())
                retrieval = f.get_tensor("retrieval")
                scores = f.get_tensor("scores") if "scores" in names else None
            pattern = cls(retrieval, scores, json.loads(header.get("metadata") or "{}"))
        else:
            raise ValueError(f"Unknown pattern file extension {path.suffix!r} in {str(path)!r}; use .safetensors or .json.")
        return pattern.validate(config) if config is not None else pattern


# --------------------------------------------------------------------------------------------------- cache
def _streaming_indices(seen: int, s: int, w: int) -> torch.Tensor:
    """Absolute indices a streaming head holds after ``seen`` tokens: the sinks and the last ``W``, ascending."""
    if seen <= s + w:
        return torch.arange(seen)
    return torch.cat([torch.arange(s), torch.arange(seen - w, seen)])


def visibility_mask(query_index: torch.Tensor, key_index: torch.Tensor, num_sink_tokens: int, window_length: int) -> torch.Tensor:
    """``[q, k]`` bool: query ``i`` sees key ``j`` iff ``j <= i`` and (``j < S`` or ``i - j < W``)."""
    i, j = query_index[:, None], key_index[None, :]
    return (j <= i) & ((j < num_sink_tokens) | (i - j < window_length))


class DuoCacheLayer(CacheLayerMixin):
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

    def get_seq_length(self) -> int:
        return self.seen

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
        if self.pending is not None:
            raise ValueError(
                f"DuoCache needs attn_implementation={DUO_ATTENTION!r}: the previous forward's attention did not "
                f"consume the cache (a stock attention cannot attend heads over keys of different lengths). Call "
                f"hf_sinks.duo_attention.register() and load the model with attn_implementation={DUO_ATTENTION!r} "
                f"(or model.set_attn_implementation({DUO_ATTENTION!r}))."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states, self.seen)
        self.seen += key_states.shape[-2]
        # only the new chunk goes to the attention function, which finds the stored heads through the tag
        keys = key_states.view_as(key_states)
        setattr(keys, LAYER_ATTRIBUTE, self)
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
            mask = visibility_mask(torch.arange(first + b0, first + b1), index[cols], s, w).to(query.device)
            cols = cols.to(query.device)
            k, v = keys.index_select(2, cols), values.index_select(2, cols)
            gqa = query.shape[1] != k.shape[1]
            outs.append(F.scaled_dot_product_attention(query[:, :, b0:b1], k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _trim(self, keys, values, total):
        s, w = self.cache.num_sink_tokens, self.cache.window_length
        if total <= s + w:
            return keys, values  # fresh cat: exactly these tokens
        start = keys.shape[2] - w  # the last W of the others (held + new are contiguous after the sinks)
        return torch.cat([keys[:, :, :s], keys[:, :, start:]], dim=2), torch.cat([values[:, :, :s], values[:, :, start:]], dim=2)

    # ------------------------------------------------------------------------------- batch ops
    _ROW_STATE = ("retrieval_keys", "retrieval_values", "streaming_keys", "streaming_values")

    def _map_rows(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in self._ROW_STATE:
            setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])

    def reset(self) -> None:
        for name in self._ROW_STATE:
            setattr(self, name, None)
        self.is_initialized = False
        self.seen = 0
        self.pending = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("DuoCache evicts streaming-head tokens; it cannot be cropped (assisted decoding is unsupported).")


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

    def __init__(self, pattern: HeadPattern, num_sink_tokens: int = 64, window_length: int = 256, *, config: Any = None):
        if not isinstance(pattern, HeadPattern):
            raise ValueError(f"pattern must be a HeadPattern, got {type(pattern).__name__}.")
        _check_int("num_sink_tokens", num_sink_tokens, 0)
        _check_int("window_length", window_length, 1)
        if config is not None:
            pattern.validate(config)
        super().__init__(layers=[])
        self.pattern = pattern
        self.num_sink_tokens = num_sink_tokens
        self.window_length = window_length

    @classmethod
    def from_model(cls, model: Any, pattern: HeadPattern, num_sink_tokens: int = 64, window_length: int = 256) -> "DuoCache":
        """Build for ``model`` (validates the pattern against its config)."""
        return cls(pattern, num_sink_tokens, window_length, config=model.config)

    def __repr__(self) -> str:
        return (f"DuoCache(num_sink_tokens={self.num_sink_tokens}, window_length={self.window_length}, "
                f"streaming_fraction={self.pattern.streaming_fraction:.3f}, layers={len(self.layers)}, "
                f"seen={self.get_seq_length()})")

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= self.pattern.num_layers:
            raise ValueError(f"DuoCache got layer {layer_idx} but its HeadPattern has {self.pattern.num_layers} layers.")
        while len(self.layers) <= layer_idx:
            self.layers.append(DuoCacheLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def get_stored_lengths(self, layer_idx: int = 0) -> tuple[int, int]:
        """Tokens held by ``layer_idx``'s ``(retrieval heads, streaming heads)``."""
        return self.layers[layer_idx].stored_lengths() if layer_idx < len(self.layers) else (0, 0)

    def stored_bytes(self) -> int:
        """Bytes of the keys and values held, all layers (what :func:`hf_sinks.eval.memory.cache_bytes` counts)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in DuoCacheLayer._ROW_STATE)
        return total

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("DuoCache evicts streaming-head tokens; it cannot be cropped (assisted decoding is unsupported).")


# --------------------------------------------------------------------------------------- attention functions
def duo_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="duo_sdpa"``: DuoAttention with a :class:`DuoCache`, stock SDPA without one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .attention.masks import SinkMask

    layer = getattr(key, LAYER_ATTRIBUTE, None)
    if layer is None:
        dense = attention_mask.dense() if isinstance(attention_mask, SinkMask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    if isinstance(attention_mask, SinkMask) and attention_mask.new_token_validity(query.shape[2]) is not None:
        layer.pending = None
        raise ValueError("DuoCache does not support padded batches (the attention mask has padding).")
    if dropout > 0:
        raise ValueError(f"dropout={dropout} is not supported with a DuoCache (inference only).")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(query, scaling)
    return out.transpose(1, 2).contiguous(), None


#: (alpha [L, KVH], S, W) of the running gated forward (set by :func:`gated_attention`).
_GATES: list[tuple[torch.Tensor, int, int]] = []


@contextmanager
def gated_attention(model: torch.nn.Module, alpha: torch.Tensor, num_sink_tokens: int, window_length: int):
    """Run ``model`` with the ``duo_gate`` attention mixing ``alpha * full + (1 - alpha) * streaming`` per KV head."""
    from .oracle import using_attention

    register()
    _GATES.append((alpha, num_sink_tokens, window_length))
    try:
        with using_attention(model, DUO_GATE_ATTENTION):
            yield
    finally:
        _GATES.pop()


def duo_gate_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="duo_gate"`` (training, no cache): ``alpha * full + (1 - alpha) * streaming`` per head.

    ``alpha[layer, kv_head]`` comes from :func:`gated_attention`; outside it this is stock SDPA. Full attention is
    causal; streaming attention applies the sink + window rule; both at the model's absolute positions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .attention.masks import SinkMask

    dense = attention_mask.dense() if isinstance(attention_mask, SinkMask) else attention_mask
    if not _GATES:
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    if isinstance(attention_mask, SinkMask) and attention_mask.new_token_validity(query.shape[2]) is not None:
        raise ValueError("duo_gate does not support padded batches.")
    alpha, s, w = _GATES[-1]
    q, n = query.shape[2], key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    qi = torch.arange(n - q, n, device=query.device)
    kj = torch.arange(n, device=query.device)
    gqa = query.shape[1] != key.shape[1]
    full = F.scaled_dot_product_attention(query, key, value, attn_mask=kj[None] <= qi[:, None], scale=scaling, enable_gqa=gqa)
    stream = F.scaled_dot_product_attention(query, key, value, attn_mask=visibility_mask(qi, kj, s, w), scale=scaling, enable_gqa=gqa)
    gate = alpha[module.layer_idx].to(query.dtype).repeat_interleave(query.shape[1] // key.shape[1])[None, :, None, None]
    out = gate * full + (1 - gate) * stream
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``duo_sdpa`` and ``duo_gate`` with transformers (both registries). Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from .attention.masks import sink_sdpa_mask

    AttentionInterface.register(DUO_ATTENTION, duo_sdpa_attention_forward)
    AttentionInterface.register(DUO_GATE_ATTENTION, duo_gate_attention_forward)
    # the lazy mask: the functions read only the padding; the dense mask is built only for the stock fallback
    AttentionMaskInterface.register(DUO_ATTENTION, sink_sdpa_mask)
    AttentionMaskInterface.register(DUO_GATE_ATTENTION, sink_sdpa_mask)


# ------------------------------------------------------------------------------------- head identification
#: Filler sentences of the synthetic passkey haystack (text mode).
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class PasskeyExample:
    """One synthetic example: ``input_ids`` ``[T]`` and ``answer_mask`` ``[T]`` (True on the answer span)."""

    input_ids: torch.Tensor
    answer_mask: torch.Tensor


def make_passkey_example(
    context_length: int,
    rng: random.Random,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    key_length: int = 8,
) -> PasskeyExample:
    """A haystack of ``~context_length`` tokens with a key at a random depth in [5 %, 95 %], asked for at the end.

    With a ``tokenizer``: English filler, a 5-digit-group key (``key_length`` digits), the question
    "What is the pass key? The pass key is" and the key as the answer. Without one (tiny random models): random
    filler tokens, ``key_length`` random key tokens fenced by a marker token (id 1), and the marker + key again at the
    end as the answer. Only the answer span is marked (DuoAttention distils on answer tokens).
    """
    _check_int("context_length", context_length, 4)
    _check_int("key_length", key_length, 1)
    if tokenizer is not None:
        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        key = "".join(rng.choice("0123456789") for _ in range(key_length))
        needle = ids(f" The pass key is {key}. Remember it. {key} is the pass key.")
        question = ids(" What is the pass key? The pass key is")
        answer = ids(f" {key}.")
        unit = ids(FILLER)
        fill = max(0, context_length - len(needle) - len(question) - len(answer))
        filler = (unit * (fill // len(unit) + 1))[:fill]
    else:
        if vocab_size is None or vocab_size < 4:
            raise ValueError(f"vocab_size={vocab_size!r}: give a tokenizer or vocab_size >= 4 (token-level examples).")
        key = [rng.randrange(2, vocab_size) for _ in range(key_length)]
        needle, question, answer = [1] + key + [1], [1], key
        fill = max(0, context_length - len(needle) - len(question) - len(answer))
        filler = [rng.randrange(2, vocab_size) for _ in range(fill)]
    before = round(rng.uniform(0.05, 0.95) * len(filler))
    tokens = filler[:before] + needle + filler[before:] + question + answer
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    mask[len(tokens) - len(answer):] = True
    return PasskeyExample(torch.tensor(tokens, dtype=torch.long), mask)


def _lr_multiplier(step: int, total: int) -> float:
    """DuoAttention's schedule: linear warm-up over the first 20 %, flat, linear decay over the last 20 %, floor 0.1."""
    edge = max(1, int(0.2 * total))
    if step < edge:
        return max(0.1, (step + 1) / edge)
    if step >= total - edge:
        return max(0.1, (total - step) / edge)
    return 1.0


def _final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Post-norm final hidden states of the decoder (``model.base_model``'s ``last_hidden_state``)."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


@dataclass
class IdentificationResult:
    """What :func:`identify_heads` returns: the pattern (scores = the trained gates) and the loss history."""

    pattern: HeadPattern
    alpha: torch.Tensor
    history: list[dict]


def identify_heads(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    num_steps: int = 2000,
    lr: float = 0.02,
    reg_weight: float = 0.05,
    num_sink_tokens: int = 128,
    window_length: int = 256,
    context_length: int | tuple[int, int] = 2048,
    sparsity: float = 0.5,
    initial_value: float = 1.0,
    key_length: int = 8,
    seed: int = 0,
    examples: Iterator[PasskeyExample] | None = None,
    accelerator: Any = None,
    progress: bool = True,
) -> IdentificationResult:
    """Find retrieval heads by optimisation (DuoAttention §3.2), with plain torch + ``accelerate``.

    One gate ``alpha[layer, kv_head]`` in [0, 1] mixes full and streaming (``S`` sinks + ``W`` window) attention
    outputs in the ``duo_gate`` attention; the model's weights are frozen. Each step runs the full-attention model
    (teacher, no grad) and the gated one on a synthetic passkey example and minimises
    ``mean((h_gated - h_full)^2 over the answer span) + reg_weight * mean(|alpha|)`` (``h``: post-norm final hidden
    states). AdamW, no weight decay, DuoAttention's warm-up/decay schedule; ``alpha`` is clamped to [0, 1] after
    every step. Under ``accelerate launch`` every process draws its own examples and the gate gradients are averaged.

    Args:
        model: a causal LM routed through ``AttentionInterface`` (its ``_attn_implementation`` is restored after).
        tokenizer: builds English passkey prompts; without it, token-level examples from ``model.config.vocab_size``.
        num_steps, lr, reg_weight: optimisation (DuoAttention: 2000, 0.02, 0.05).
        num_sink_tokens, window_length: the streaming attention trained against (DuoAttention: 128, 256).
        context_length: tokens per example, or ``(min, max)`` to draw uniformly.
        sparsity: fraction of streaming heads in the returned pattern (see :meth:`HeadPattern.from_scores`).
        initial_value: initial ``alpha`` (DuoAttention: 1.0).
        examples: optional iterator of :class:`PasskeyExample` replacing the built-in generator.
        accelerator: an ``accelerate.Accelerator`` (one is created if ``None``).

    Returns:
        an :class:`IdentificationResult`; ``.pattern.scores`` is ``alpha``.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .oracle import _routed_through_interface, using_attention

    _check_int("num_steps", num_steps, 1)
    _check_int("num_sink_tokens", num_sink_tokens, 0)
    _check_int("window_length", window_length, 1)
    if not 0 <= initial_value <= 1:
        raise ValueError(f"initial_value={initial_value!r} must be in [0, 1].")
    if reg_weight < 0 or lr <= 0:
        raise ValueError(f"reg_weight={reg_weight!r} must be >= 0 and lr={lr!r} > 0.")
    lengths = (context_length, context_length) if isinstance(context_length, int) else tuple(context_length)
    register()
    accelerator = accelerator or Accelerator()
    device = accelerator.device
    model.requires_grad_(False)
    model.to(device)
    was_training = model.training
    model.eval()
    layers, kv_heads = _kv_shape(model.config)
    alpha = torch.nn.Parameter(torch.full((layers, kv_heads), float(initial_value), device=device))
    optimizer = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_multiplier(step, num_steps))
    rng = random.Random(seed + accelerator.process_index)  # every process its own examples
    vocab = model.config.get_text_config(decoder=True).vocab_size

    def draw() -> PasskeyExample:
        if examples is not None:
            return next(examples)
        return make_passkey_example(rng.randint(*lengths), rng, tokenizer, vocab, key_length)

    history = []
    bar = tqdm(range(num_steps), desc="duo heads", disable=not (progress and accelerator.is_local_main_process), leave=False)
    start = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(_routed_through_interface(model))
        for step in bar:
            example = draw()
            ids = example.input_ids.to(device)[None]
            mask = example.answer_mask.to(device)
            with torch.no_grad(), using_attention(model, "sdpa"):
                teacher = _final_hidden(model, ids)[0, mask]
            with gated_attention(model, alpha, num_sink_tokens, window_length):
                student = _final_hidden(model, ids)[0, mask]
            distill = (student.float() - teacher.float()).pow(2).mean(-1).mean()
            reg = alpha.abs().mean()
            loss = distill + reg_weight * reg
            distill, reg = distill.detach(), reg.detach()
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if accelerator.num_processes > 1:  # alpha is not wrapped in DDP: average its gradient by hand
                alpha.grad = accelerator.reduce(alpha.grad, reduction="mean")
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            record = {"step": step, "loss": loss.item(), "distill": distill.item(), "reg": reg.item(), "tokens": ids.shape[1]}
            history.append(record)
            bar.set_postfix(distill=f"{record['distill']:.3g}", alpha=f"{record['reg']:.3f}", refresh=False)
    bar.close()
    model.train(was_training)
    scores = alpha.detach().float().cpu()
    metadata = {
        "method": "duo_attention_optimisation", "num_steps": num_steps, "lr": lr, "reg_weight": reg_weight,
        "num_sink_tokens": num_sink_tokens, "window_length": window_length, "context_length": list(lengths),
        "seed": seed, "seconds": round(time.perf_counter() - start, 2),
        "data": "passkey_text" if tokenizer is not None else "passkey_tokens",
    }
    return IdentificationResult(HeadPattern.from_scores(scores, sparsity=sparsity, metadata=metadata), scores, history)


@torch.no_grad()
def attention_mass_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, num_sink_tokens: int, window_length: int
) -> torch.Tensor:
    """Heuristic retrieval scores: attention mass each KV head puts *outside* its sinks + window (no training).

    One full-attention forward over ``input_ids`` ``[T]``; for every query head, the mean over queries ``i >= S + W``
    of the softmax mass on keys a streaming head would drop (``S <= j <= i - W``), then the max over the query heads
    of each KV group (a group is streaming only if all its heads are). Higher = more retrieval-like; binarise with
    :meth:`HeadPattern.from_scores`. ``[num_layers, num_key_value_heads]``.
    """
    from transformers import AttentionInterface

    from .oracle import _routed_through_interface, using_attention

    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    t = ids.shape[1]
    if t <= num_sink_tokens + window_length:
        raise ValueError(f"input_ids has {t} tokens: need more than num_sink_tokens + window_length = "
                         f"{num_sink_tokens + window_length} to measure mass outside the window.")
    layers, kv_heads = _kv_shape(model.config)
    scores = torch.zeros(layers, kv_heads)
    name = "hf_sinks_duo_mass"

    def mass(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, 1)
        idx = torch.arange(t, device=query.device)
        causal = idx[None] <= idx[:, None]
        dropped = causal & ~visibility_mask(idx, idx, num_sink_tokens, window_length)
        rows = slice(num_sink_tokens + window_length, t)
        total = query.new_zeros(query.shape[1])
        for h in range(query.shape[1]):  # one head at a time: T x T scores, not H x T x T
            logits = (query[0, h] @ k[0, h].T * scaling).masked_fill(~causal, float("-inf"))
            p = torch.softmax(logits.float(), -1)
            total[h] = (p * dropped)[rows].sum(-1).mean()
        scores[module.layer_idx] = total.view(key.shape[1], groups).amax(-1).cpu()
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True)

    AttentionInterface.register(name, mass)
    from transformers import AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionMaskInterface.register(name, sdpa_mask)
    with _routed_through_interface(model), using_attention(model, name):
        model(input_ids=ids, use_cache=False)
    return scores
