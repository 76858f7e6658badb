"""Streaming perplexity with an :class:`~hf_sinks.h2o.H2OCache`."""

from __future__ import annotations

import torch

from ..validation import check_int
from .attention import register
from .cache import H2O_ATTENTION, H2OCache


@torch.no_grad()
def h2o_perplexity(
    model: torch.nn.Module,
    input_ids,
    num_sink_tokens: int = 4,
    window_length: int = 128,
    heavy_budget: int = 124,
    chunk_size: int = 64,
    progress: bool = True,
    positions: str = "original",
):
    """Streaming perplexity with an :class:`H2OCache` (like :func:`hf_sinks.eval.streaming_perplexity`).

    The stream is fed ``chunk_size`` tokens per forward; ``h2o_sdpa`` evicts query by query inside a chunk, so
    every chunk size gives the token-by-token result (up to float summation order).

    Returns:
        a :class:`~hf_sinks.eval.perplexity.StreamingResult` with ``mode="h2o"`` and
        ``extra={"heavy_budget": H, "positions": positions}`` (``window_length`` is ``W``; the budget is
        ``S + W + H``).
    """
    from ..eval.perplexity import cache_perplexity, validate

    validate("sink", num_sink_tokens, window_length, chunk_size)
    check_int("heavy_budget", heavy_budget, 0)
    register()
    cache = H2OCache(num_sink_tokens, window_length, heavy_budget, positions=positions)
    return cache_perplexity(
        model, input_ids, cache, attn_implementation=H2O_ATTENTION, chunk_size=chunk_size, mode="h2o",
        num_sink_tokens=num_sink_tokens, window_length=window_length, progress=progress,
        extra={"heavy_budget": heavy_budget, "positions": positions},
    )
