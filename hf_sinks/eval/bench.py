"""Decode cost vs stream length: per-token time and KV-cache memory of sink vs dense vs sliding-window recompute.

Procedure (:func:`decode_benchmark`), for each stream length ``L`` in increasing order:

* ``"sink"`` (``SinkCache(S, W)``) and ``"dense"`` (``DynamicCache``) each keep one stream going for the whole
  benchmark. The stream is advanced to ``L`` tokens with untimed chunked forwards (``prefill_chunk`` tokens each;
  exact for the sink cache, see :mod:`hf_sinks.eval.perplexity`), then ``warmup`` untimed and ``steps`` timed
  single-token forwards follow (``model(token, **cache_kwargs(cache), logits_to_keep=1)``: one decoding step of
  ``generate`` without the sampling). The timed steps are split into ``rounds`` blocks that alternate between the
  modes (A B, B A, ...), so bursts of machine noise hit them alike.
* with ``compile=True``, ``"sink"`` streams with a :class:`~hf_sinks.StaticSinkCache` instead and its decode steps run
  through ``torch.compile(model.forward, fullgraph=True)`` (prefill stays eager); the compilation happens in the
  untimed warm-up steps.
* ``"recompute"`` (sliding window with re-computation) keeps no state: each of its ``recompute_steps`` timed steps is
  a fresh forward over the ``min(L, S + W)`` tokens the next query sees, at positions ``0..len-1``. It runs only at
  lengths ``<= recompute_max_length`` (its per-token cost stops growing once ``L >= S + W`` anyway, and each
  step costs a full forward over the window).

Each row reports the median/min/max milliseconds per step and the KV-cache bytes after the timed steps (exact; see
:mod:`hf_sinks.eval.memory`). Token ids are a real text's (repeated from its start if it is too short: the cost
does not depend on the content).
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Iterable, Sequence

import torch

from ..compat import cache_kwargs
from ..visibility import visible_keys
from .memory import cache_bytes, rss_bytes
from .perplexity import make_cache, use_sink_attention

BENCH_MODES = ("sink", "dense", "recompute")


def _label(mode: str, sinks: int, window: int, compile: bool = False) -> str:
    if mode == "dense":
        return "dense (DynamicCache)"
    if mode == "sink":
        return f"sink cache {sinks}+{window}" + (" (compiled)" if compile else "")
    return f"recompute {sinks}+{window}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(ids: torch.Tensor, start: int, count: int) -> torch.Tensor:
    idx = torch.arange(start, start + count, device=ids.device) % ids.numel()
    return ids[idx]


@torch.no_grad()
def decode_benchmark(
    model: torch.nn.Module,
    input_ids,
    lengths: Sequence[int] = (1024, 2048, 4096, 8192, 16384),
    modes: Iterable[str] = BENCH_MODES,
    num_sink_tokens: int = 4,
    window_length: int = 1020,
    steps: int = 16,
    warmup: int = 2,
    rounds: int = 4,
    prefill_chunk: int = 512,
    recompute_max_length: int = 2048,
    recompute_steps: int = 3,
    progress: bool = True,
    compile: bool = False,
) -> list[dict]:
    """Time single-token decoding at each stream length (see the module docstring).

    Returns:
        one dict per (mode, length): ``mode, label, stream_length, ms_per_token, ms_min, ms_max, tokens_per_second,
        steps, kv_cache_bytes, resident_tokens, rss_bytes`` (``rss_bytes``: the whole process, indicative).

    Raises:
        ValueError: unknown mode, empty/non-positive lengths, ``steps``/``prefill_chunk``/``window_length`` < 1.
    """
    from tqdm.auto import tqdm

    modes = list(dict.fromkeys(modes))
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad or not modes:
        raise ValueError(f"Unknown bench mode(s) {bad or modes!r}; allowed: {', '.join(BENCH_MODES)}.")
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths={lengths!r} must be positive stream lengths.")
    for name, value in (
        ("steps", steps),
        ("rounds", rounds),
        ("prefill_chunk", prefill_chunk),
        ("window_length", window_length),
        ("recompute_steps", recompute_steps),
    ):
        if value < 1:
            raise ValueError(f"{name}={value!r} must be >= 1.")
    if num_sink_tokens < 0 or warmup < 0:
        raise ValueError(f"num_sink_tokens={num_sink_tokens!r} and warmup={warmup!r} must be >= 0.")
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids).reshape(-1).to(device)
    if ids.numel() < 2:
        raise ValueError(f"The token source has {ids.numel()} token(s); need at least 2.")

    streams = {
        m: {"cache": make_cache(model, m, num_sink_tokens, window_length), "pos": 0, "step": model}
        for m in modes
        if m in ("sink", "dense")
    }
    if compile and "sink" in streams:
        from ..static_cache import StaticSinkCache

        streams["sink"]["cache"] = StaticSinkCache.from_model(model, num_sink_tokens, window_length)
        streams["sink"]["step"] = torch.compile(model.forward, fullgraph=True, dynamic=False)
    rows: list[dict] = []
    work = len(lengths) * len(streams) + sum(1 for n in lengths if n <= recompute_max_length) * ("recompute" in modes)
    bar = tqdm(total=work, desc="bench", disable=not progress, dynamic_ncols=True, leave=False)
    per_round = -(-steps // rounds)  # ceil
    for length in lengths:
        at: dict[str, int] = {}
        for mode, state in streams.items():  # untimed: advance every stream to `length`, then warm up
            with _attention_for(model, mode):
                bar.set_description(f"bench {mode}: prefill to {length}")
                while state["pos"] < length:
                    n = min(prefill_chunk, length - state["pos"])
                    model(
                        input_ids=_tokens(ids, state["pos"], n)[None],
                        **cache_kwargs(state["cache"]),
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    state["pos"] += n
                at[mode] = state["pos"]
                _decode_steps(model, ids, state, warmup, device)
        times: dict[str, list[float]] = {mode: [] for mode in streams}
        order = list(streams)
        for r in range(rounds):  # timed: blocks alternating between the modes (A B B A ...) so noise hits all alike
            for mode in order:
                bar.set_description(f"bench {mode}: decode at {at[mode]} (round {r + 1}/{rounds})")
                with _attention_for(model, mode):
                    times[mode] += _decode_steps(
                        model, ids, streams[mode], min(per_round, steps - len(times[mode])), device
                    )
            order.reverse()
        for mode in modes:
            if mode == "recompute":
                if length > recompute_max_length:
                    continue
                bar.set_description(f"bench recompute at {length}")
                mode_times = _time_recompute(
                    model, ids, length, num_sink_tokens, window_length, recompute_steps, device
                )
                kv, resident, pos = 0, 0, length
            else:
                cache = streams[mode]["cache"]
                mode_times, pos = times[mode], at[mode]
                kv = cache_bytes(cache)
                resident = cache.get_stored_length() if mode == "sink" else cache.get_seq_length()
            median = statistics.median(mode_times)
            rows.append(
                {
                    "mode": mode,
                    "label": _label(mode, num_sink_tokens, window_length, compile),
                    "stream_length": pos,
                    "ms_per_token": median,
                    "ms_min": min(mode_times),
                    "ms_max": max(mode_times),
                    "tokens_per_second": 1e3 / median if median > 0 else float("inf"),
                    "steps": len(mode_times),
                    "kv_cache_bytes": kv,
                    "resident_tokens": resident,
                    "rss_bytes": rss_bytes(),
                }
            )
            bar.update(1)
    bar.close()
    return rows


def _attention_for(model, mode: str):
    return use_sink_attention(model) if mode == "sink" else nullcontext()


def _decode_steps(model, ids, state: dict, count: int, device) -> list[float]:
    """``count`` single-token forwards continuing ``state``'s stream; returns ms per step."""
    times = []
    for _ in range(count):
        token = _tokens(ids, state["pos"], 1)[None]
        _sync(device)
        t0 = time.perf_counter()
        state["step"](input_ids=token, **cache_kwargs(state["cache"]), use_cache=True, logits_to_keep=1)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        state["pos"] += 1
    return times


def _time_recompute(model, ids, length, sinks, window, count, device) -> list[float]:
    times = []
    for k in range(count):
        query = length + k  # the next token after `length` streamed tokens (stream index `length + k`)
        visible = visible_keys(query, sinks, window, device)
        tokens = _tokens(ids, 0, query + 1)[visible][None]
        positions = torch.arange(tokens.shape[1], device=device)[None]
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=tokens, position_ids=positions, use_cache=False, logits_to_keep=1)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(rows: Sequence[dict], num_sink_tokens: int, window_length: int) -> dict:
    """Flatness per mode (ms at the longest / shortest length) and the speedup of sink over recompute.

    The speedup compares, at the lengths where recompute ran with a full window (``L >= S + W``, else its longest
    length), the median recompute ms per token with the sink cache's ms per token at the same lengths.
    """
    out: dict = {"modes": {}}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["stream_length"])
        out["modes"][mode] = {
            "shortest": sel[0]["stream_length"],
            "longest": sel[-1]["stream_length"],
            "ms_shortest": sel[0]["ms_per_token"],
            "ms_longest": sel[-1]["ms_per_token"],
            "ratio": sel[-1]["ms_per_token"] / sel[0]["ms_per_token"],
            "kv_shortest": sel[0]["kv_cache_bytes"],
            "kv_longest": sel[-1]["kv_cache_bytes"],
        }
    rec = [r for r in rows if r["mode"] == "recompute"]
    sink = {r["stream_length"]: r for r in rows if r["mode"] == "sink"}
    if rec and sink:
        capacity = num_sink_tokens + window_length
        full = [r for r in rec if r["stream_length"] >= capacity] or [max(rec, key=lambda r: r["stream_length"])]
        rec_ms = statistics.median(r["ms_per_token"] for r in full)
        lengths = [r["stream_length"] for r in full]

        def nearest(n):
            return sink[min(sink, key=lambda s: abs(s - n))]

        sink_ms = statistics.median(nearest(n)["ms_per_token"] for n in lengths)
        out["speedup_vs_recompute"] = {
            "cache": capacity,
            "lengths": lengths,
            "recompute_ms": rec_ms,
            "sink_ms": sink_ms,
            "speedup": rec_ms / sink_ms,
        }
    return out


__all__ = ["BENCH_MODES", "decode_benchmark", "summarize"]
