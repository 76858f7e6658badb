"""Streaming perplexity: next-token NLL of a causal LM over a long token stream, under four attention regimes.

Modes (StreamingLLM paper, Fig. 1):

* ``"dense"``: a plain ``DynamicCache``, every token sees every earlier token and positions grow past the model's
  training length (the cache, and per-token cost, grow without bound);
* ``"window"``: window attention, a ``SinkCache`` with no sinks and the same budget ``S + W``, all of it window
  (the paper's failing baseline once the first tokens are evicted);
* ``"sink"``: attention sinks, ``SinkCache(S, W)``: the first ``S`` tokens plus the last ``W`` (StreamingLLM);
* ``"recompute"``: sliding window with re-computation: for every token a fresh forward over only its visible
  tokens (the ``S`` sinks and the last ``W``; pass ``num_sink_tokens=0`` for the paper's plain sliding window)
  at positions ``0..len-1`` and no cache. Exact (it is :func:`hf_sinks.oracle.recompute_logits`), O(W) work per
  token; ``chunk_size`` does not apply.

Token-by-token vs chunked. With ``chunk_size > 1`` the stream is fed ``chunk_size`` tokens per forward. For
``"dense"`` that is ordinary causal attention; for ``"sink"``/``"window"`` the ``sink_*`` attention functions apply
the visibility rule (docs/design.md §2.1) to each query of a chunk, at cache-relative positions; each token's states at
every layer are computed from its own visible set in both cases. So the two are the *same computation* up to
floating-point summation order: chunking only batches queries (tests/eval check chunk 1 == chunk 16 to 1e-4 in
NLL). Chunking is much faster on CPU; token-by-token is what a decoding server does.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..attention.switch import use_attention
from ..compat import cache_kwargs
from ..validation import check_choice, check_int, check_token_ids
from ..visibility import visible_keys
from .memory import MemoryMeter, cache_bytes

MODES = ("dense", "window", "sink", "recompute")


@dataclass
class StreamingResult:
    """What :func:`streaming_perplexity` measured.

    Attributes:
        mode: ``"dense"``, ``"window"``, ``"sink"`` or ``"recompute"``.
        perplexity: ``exp(mean NLL)`` over every predicted token.
        nll: ``[num_tokens - 1]`` float32, ``nll[k] = -log p(token k+1 | what token k sees)`` in nats.
        tokens_per_second: predicted tokens / wall time of the streaming loop (forward passes + loss).
        peak_memory_bytes: peak memory growth over the run (see ``memory_kind`` and :mod:`hf_sinks.eval.memory`).
        memory_kind: ``"cuda_max_allocated"`` (CUDA: max allocated minus allocated at the start) or ``"cpu_rss"``
            (CPU: peak growth of the process RSS, sampled after every forward; indicative only).
        cache_bytes: ``[num_tokens - 1]`` int64, KV-cache bytes after the forward that processed token ``k``
            (exact; 0 for ``"recompute"``, which keeps no cache).
        rss_bytes: ``[num_tokens - 1]`` int64, the memory growth sampled after that forward (same source as
            ``peak_memory_bytes``).
        num_tokens: length of the input stream (``num_tokens - 1`` predictions).
        num_sink_tokens, window_length: the cache actually used (``None`` for ``"dense"``; ``"window"`` reports
            ``0`` and ``S + W``).
        chunk_size: tokens per forward actually used (``1`` for ``"recompute"``).
        elapsed_seconds: wall time of the streaming loop.
    """

    mode: str
    perplexity: float
    nll: torch.Tensor
    tokens_per_second: float
    peak_memory_bytes: int
    memory_kind: str
    cache_bytes: torch.Tensor
    rss_bytes: torch.Tensor
    num_tokens: int
    num_sink_tokens: int | None
    window_length: int | None
    chunk_size: int
    elapsed_seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def log_perplexity(self) -> float:
        """Mean NLL (nats)."""
        return float(self.nll.double().mean())

    @property
    def peak_cache_bytes(self) -> int:
        return int(self.cache_bytes.max()) if self.cache_bytes.numel() else 0

    def cumulative_log_perplexity(self) -> torch.Tensor:
        """``[num_tokens - 1]`` float64: mean NLL of the first ``k + 1`` predictions (the usual streaming curve)."""
        nll = self.nll.double()
        return nll.cumsum(0) / torch.arange(1, nll.numel() + 1, dtype=torch.float64)

    def summary(self) -> dict:
        """One flat row for tables."""
        return {
            "mode": self.mode,
            "num_sink_tokens": self.num_sink_tokens,
            "window_length": self.window_length,
            "tokens": self.num_tokens,
            "chunk_size": self.chunk_size,
            "perplexity": self.perplexity,
            "tokens_per_second": self.tokens_per_second,
            "peak_cache_bytes": self.peak_cache_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_kind": self.memory_kind,
        }


def validate(mode: str, num_sink_tokens: int, window_length: int, chunk_size: int, length: int | None = None) -> None:
    """The argument checks of :func:`streaming_perplexity` (shared with the CLI): ``ValueError`` naming the value."""
    check_choice("mode", mode, MODES)
    check_int("window_length", window_length, 1)
    check_int("num_sink_tokens", num_sink_tokens, 0)
    check_int("chunk_size", chunk_size, 1)
    if length is not None and length < 2:
        raise ValueError(f"The input has {length} token(s); streaming perplexity needs at least 2.")


def _as_stream(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(
                f"input_ids has batch size {ids.shape[0]}; streaming perplexity takes one sequence ([T] or [1, T])."
            )
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [T] or [1, T], got shape {tuple(ids.shape)}.")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}.")
    return ids.long()


@contextmanager
def use_sink_attention(model: torch.nn.Module, name: str = "sink_sdpa"):
    """Run ``model`` with a ``sink_*`` attention for the duration (it already has one: nothing changes).

    A stock attention would process a chunk that runs past the cache capacity with dense attention; the ``sink_*``
    functions apply the visibility rule to every query of a chunk.
    """
    if str(model.config._attn_implementation).startswith("sink_"):
        yield
        return
    with use_attention(model, name, route=True):
        yield


@torch.no_grad()
def streaming_perplexity(
    model: torch.nn.Module,
    input_ids,
    mode: str | None = None,
    num_sink_tokens: int = 4,
    window_length: int = 1020,
    chunk_size: int = 1,
    progress: bool = True,
    *,
    cache=None,
    attn_implementation: str | None = None,
) -> StreamingResult:
    """Next-token NLL of ``model`` over one long stream, under ``mode`` or with a ``cache`` you built.

    Either ``mode`` (see the module docstring; ``"sink"`` when neither is given) builds the cache from
    ``num_sink_tokens``/``window_length``, or ``cache=`` streams through the cache given (a fresh one: it sees the
    whole stream):

    * :class:`~hf_sinks.SinkCache`: mode ``"sink"`` (``"window"`` with no sinks), run with a ``sink_*`` attention as
      ``mode="sink"`` is;
    * :class:`~hf_sinks.H2OCache`: mode ``"h2o"``, run with ``h2o_sdpa``;
      ``extra={"heavy_budget": H, "positions": ...}``
      (``h2o_sdpa`` evicts query by query inside a chunk, so every chunk size gives the token-by-token result);
    * :class:`~hf_sinks.DuoCache`: mode ``"duo"``, run with ``duo_sdpa``; ``extra={"streaming_fraction": f}``;
    * ``DynamicCache``: mode ``"dense"``; any other ``transformers.Cache``: mode ``"custom"``, the model's attention.

    Args:
        model: a causal LM (any attention; ``"sink"``/``"window"`` temporarily switch a stock attention to
            ``sink_sdpa``, which is exact for chunks; load with ``attn_implementation="sink_sdpa"`` to avoid that).
        input_ids: ``[T]`` or ``[1, T]`` token ids, ``T >= 2``.
        mode: ``"dense"``, ``"window"``, ``"sink"`` or ``"recompute"`` (not with ``cache``).
        num_sink_tokens, window_length: ``S`` and ``W`` of ``mode`` (``"window"`` uses a window of ``S + W``, no
            sinks, so it has the same cache budget as ``"sink"``; ``"dense"`` ignores them; a ``cache`` has its own).
        chunk_size: tokens per forward (``"recompute"`` always runs one fresh forward per token).
        progress: show a tqdm progress bar.
        cache: a fresh ``transformers.Cache`` to stream through instead of ``mode``'s.
        attn_implementation: with ``cache``, the attention to run with for the duration instead of the cache's own
            (the model's previous one is restored afterwards).

    Returns:
        a :class:`StreamingResult`.

    Raises:
        ValueError: unknown mode, ``mode`` together with ``cache``, ``window_length <= 0``, ``num_sink_tokens < 0``,
            ``chunk_size <= 0``, fewer than 2 tokens, a batch of several sequences, or a token id outside the
            model's vocabulary.
    """
    if cache is not None:
        if mode is not None:
            raise ValueError(f"mode={mode!r} and cache= are exclusive: the cache decides how the stream is kept.")
        return _cache_perplexity(model, input_ids, cache, attn_implementation, chunk_size, progress)
    if attn_implementation is not None:
        raise ValueError("attn_implementation= applies only with cache= (a mode chooses its attention).")
    mode = "sink" if mode is None else mode
    ids = _as_stream(input_ids)
    validate(mode, num_sink_tokens, window_length, chunk_size, ids.numel())
    check_token_ids(ids, model)

    sinks: int | None
    window: int | None
    if mode == "dense":
        sinks = window = None
    elif mode == "window":
        sinks, window = 0, num_sink_tokens + window_length
    else:
        sinks, window = num_sink_tokens, window_length
    if mode == "recompute":
        chunk_size = 1

    def steps(stream):
        if mode == "recompute":
            return _recompute_steps(model, stream, sinks, window)
        return _cached_steps(model, stream, make_cache(model, mode, sinks, window), chunk_size)

    context = use_sink_attention(model) if mode in ("sink", "window") else nullcontext()
    return _measure(model, ids, mode, steps, context, sinks, window, chunk_size, progress)


def _cache_route(model: torch.nn.Module, cache) -> tuple[str, Any, int | None, int | None, dict]:
    """``(mode, attention context, S, W, extra)`` recorded and used for a given ``cache``."""
    from transformers import DynamicCache

    from ..cache import SinkCache
    from ..duo import DUO_ATTENTION, DuoCache
    from ..duo import register as register_duo
    from ..h2o import H2O_ATTENTION, H2OCache
    from ..h2o import register as register_h2o

    if isinstance(cache, SinkCache):
        mode = "window" if cache.num_sink_tokens == 0 else "sink"
        return mode, use_sink_attention(model), cache.num_sink_tokens, cache.window_length, {}
    if isinstance(cache, H2OCache):
        register_h2o()
        return (
            "h2o",
            use_attention(model, H2O_ATTENTION, route=True),
            cache.num_sink_tokens,
            cache.window_length,
            {"heavy_budget": cache.heavy_budget, "positions": cache.positions},
        )
    if isinstance(cache, DuoCache):
        cache.pattern.validate(model.config)
        register_duo()
        return (
            "duo",
            use_attention(model, DUO_ATTENTION, route=True),
            cache.num_sink_tokens,
            cache.window_length,
            {"streaming_fraction": cache.pattern.streaming_fraction},
        )
    return ("dense" if isinstance(cache, DynamicCache) else "custom"), nullcontext(), None, None, {}


def _cache_perplexity(model, input_ids, cache, attn_implementation, chunk_size, progress) -> StreamingResult:
    """:func:`streaming_perplexity` with ``cache=``: ``chunk_size`` tokens per forward into ``cache``."""
    from transformers.cache_utils import Cache

    if not isinstance(cache, Cache):
        raise TypeError(
            f"cache={cache!r} is invalid: must be a transformers Cache (SinkCache, H2OCache, DuoCache, "
            f"DynamicCache, ...), not {type(cache).__name__}."
        )
    ids = _as_stream(input_ids)
    validate("sink", 0, 1, chunk_size, ids.numel())
    check_token_ids(ids, model)
    mode, context, sinks, window, extra = _cache_route(model, cache)
    if attn_implementation is not None:
        context = use_attention(model, attn_implementation, route=True)
    return _measure(
        model,
        ids,
        mode,
        lambda stream: _cached_steps(model, stream, cache, chunk_size),
        context,
        sinks,
        window,
        chunk_size,
        progress,
        extra,
    )


def _measure(model, ids, mode, steps, context, sinks, window, chunk_size, progress, extra=None) -> StreamingResult:
    """Run ``steps(stream)`` (yielding ``(begin, logits, cache)``) inside ``context`` and measure it."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    stream, targets = ids[:-1], ids[1:]
    n = stream.numel()
    nll = torch.empty(n, dtype=torch.float32)
    kv = torch.zeros(n, dtype=torch.int64)
    rss = torch.zeros(n, dtype=torch.int64)
    meter = MemoryMeter(device)
    bar = _progress(n, f"{mode} ppl", progress)
    total_nll = 0.0
    start = time.perf_counter()
    with context:
        for begin, logits, cache in steps(stream):
            end = begin + logits.shape[0]
            losses = F.cross_entropy(logits.float(), targets[begin:end], reduction="none")
            nll[begin:end] = losses.cpu()
            kv[begin:end] = cache_bytes(cache)
            rss[begin:end] = meter.sample()
            total_nll += float(losses.double().sum())
            bar.set_postfix(ppl=f"{math.exp(total_nll / end):.2f}", refresh=False)
            bar.update(end - begin)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    bar.close()
    return StreamingResult(
        mode=mode,
        perplexity=math.exp(float(nll.double().mean())),
        nll=nll,
        tokens_per_second=n / elapsed if elapsed > 0 else float("inf"),
        peak_memory_bytes=meter.peak_bytes(),
        memory_kind=meter.kind,
        cache_bytes=kv,
        rss_bytes=rss,
        num_tokens=n + 1,
        num_sink_tokens=sinks,
        window_length=window,
        chunk_size=chunk_size,
        elapsed_seconds=elapsed,
        extra=dict(extra or {}),
    )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", disable=not enabled, dynamic_ncols=True, leave=False)


def make_cache(model: torch.nn.Module, mode: str, num_sink_tokens: int | None, window_length: int | None):
    """The cache ``mode`` streams with: a ``DynamicCache`` for ``"dense"``, else a ``SinkCache`` for ``model``.

    The ``DynamicCache`` is built from the model's config, as ``generate`` builds it: a sliding layer keeps only its
    own window, so the dense KV bytes of a model with sliding layers (Gemma 3) are what native decoding holds.
    """
    from transformers import DynamicCache

    from ..cache import SinkCache

    if mode == "dense":
        return DynamicCache(config=getattr(model, "config", None))
    return SinkCache.from_model(model, num_sink_tokens=num_sink_tokens, window_length=window_length)


def _cached_steps(model, stream, cache, chunk_size):
    for begin in range(0, stream.numel(), chunk_size):
        chunk = stream[begin : begin + chunk_size][None]
        out = model(input_ids=chunk, **cache_kwargs(cache), use_cache=True)
        yield begin, out.logits[0], cache


def _recompute_steps(model, stream, sinks, window):
    for i in range(stream.numel()):
        visible = stream[visible_keys(i, sinks, window, stream.device)][None]
        positions = torch.arange(visible.shape[1], device=stream.device)[None]
        out = model(input_ids=visible, position_ids=positions, use_cache=False, logits_to_keep=1)
        yield i, out.logits[0, -1:], None


__all__ = ["MODES", "StreamingResult", "make_cache", "streaming_perplexity", "use_sink_attention", "validate"]
