#!/usr/bin/env python
"""Decode cost of a full SinkCache vs a plain DynamicCache holding the same number of tokens (docs/design.md §4.1).

Target: ``ms_per_token(SinkCache, full and evicting) / ms_per_token(DynamicCache, same resident tokens) <= 1.05``.

Model: a random mid-size Llama (hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1376, vocab 1000), fp32, CPU.
Rows, for each resident size R (512, 1024, 2048 = 4 sinks + R - 4 window):

* ``sink_cache+sink_sdpa``: ``SinkCache(4, R - 4)``, model loaded with ``attn_implementation="sink_sdpa"``;
* ``sink_cache+sdpa``: the same cache under the stock ``"sdpa"`` attention (the cache shifts the sinks itself);
* ``dynamic_cache+sdpa``: ``DynamicCache`` under ``"sdpa"``, the baseline (``ratio`` = ms / this row's ms).

Procedure: all models share one set of weights. Each sink cache is prefilled past its capacity (so it is full and
evicting on every step); the DynamicCache is prefilled with exactly R tokens and cropped back to R after every step
(untimed), so it holds R tokens before each step, as the sink cache does. Then single-token decode steps (model
forward with ``past_key_values``, q = 1) are timed one by one; in each of ``--repeats`` rounds every implementation
runs ``--steps`` steps, interleaved in chunks of ``--chunk`` steps (A B C C B A ...) to cancel machine noise.
Reported: the median over rounds of each round's median ms per step (min/max: over rounds); ``ratio`` divides
those medians, ``ratio_paired`` is the median over rounds of the ratio within each round (the implementations of a
round ran interleaved, so it cancels the drift of a shared machine between rounds).

Writes ``docs/benchmarks/sink_cache_decode.csv`` and ``.png``::

    python benchmarks/benchmark_sink_cache_decode.py            # ~2-4 minutes on 2 CPU cores
    python benchmarks/benchmark_sink_cache_decode.py --sizes 2048 --repeats 3 --steps 16   # quick look
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_sinks  # noqa: E402
from hf_sinks.compat import cache_kwargs  # noqa: E402

OUT_DIR = common.DOCS_RESULTS
NUM_SINK_TOKENS = 4
BASELINE = "dynamic_cache+sdpa"
IMPLS = ("sink_cache+sink_sdpa", "sink_cache+sdpa", BASELINE)


def model_config(attn_implementation: str) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1376,
        max_position_embeddings=8192,
        pad_token_id=0,
    )
    config._attn_implementation = attn_implementation
    return config


def build_models() -> dict[str, LlamaForCausalLM]:
    """One model per attention implementation, sharing one set of random weights (same tensors, same memory)."""
    torch.manual_seed(0)
    sink = LlamaForCausalLM(model_config("sink_sdpa")).eval()
    stock = LlamaForCausalLM(model_config("sdpa"))
    stock.load_state_dict(sink.state_dict(), assign=True)
    stock.eval()
    assert stock.model.layers[0].mlp.up_proj.weight.data_ptr() == sink.model.layers[0].mlp.up_proj.weight.data_ptr()
    return {"sink_sdpa": sink, "sdpa": stock}


class Runner:
    """A model plus a prefilled cache in steady state, ready for timed single-token steps."""

    def __init__(self, impl: str, model: LlamaForCausalLM, resident: int, gen: torch.Generator):
        self.impl, self.model, self.resident, self.gen = impl, model, resident, gen
        vocab = model.config.vocab_size
        extra = 16  # tokens past capacity: the sink cache is full and has been evicting
        with torch.inference_mode():
            if impl.startswith("sink_cache"):
                self.cache = hf_sinks.SinkCache(NUM_SINK_TOKENS, resident - NUM_SINK_TOKENS, config=model.config)
                if impl.endswith("+sink_sdpa"):  # the sink attention prefills past capacity exactly, in one chunk
                    model(input_ids=self._ids(resident + extra, vocab), **cache_kwargs(self.cache), use_cache=True)
                else:  # a stock attention cannot mask a chunk past capacity: fill it, then evict token by token
                    model(input_ids=self._ids(resident, vocab), **cache_kwargs(self.cache), use_cache=True)
                    for _ in range(extra):
                        model(input_ids=self._ids(1, vocab), **cache_kwargs(self.cache), use_cache=True)
                assert self.cache.get_stored_length() == resident, (self.cache.get_stored_length(), resident)
                assert self.cache.get_seq_length() == resident + extra
            else:
                self.cache = DynamicCache(config=model.config)
                model(input_ids=self._ids(resident, vocab), **cache_kwargs(self.cache), use_cache=True)
                assert self.cache.get_seq_length() == resident

    def _ids(self, n: int, vocab: int) -> torch.Tensor:
        return torch.randint(1, vocab, (1, n), generator=self.gen)

    def run(self, steps: int) -> list[float]:
        """Time ``steps`` single-token decode steps; returns ms per step."""
        times = []
        vocab = self.model.config.vocab_size
        dynamic = isinstance(self.cache, DynamicCache) and not isinstance(self.cache, hf_sinks.SinkCache)
        with torch.inference_mode():
            for _ in range(steps):
                ids = self._ids(1, vocab)
                t0 = time.perf_counter()
                self.model(input_ids=ids, **cache_kwargs(self.cache), use_cache=True, logits_to_keep=1)
                times.append((time.perf_counter() - t0) * 1e3)
                if dynamic:
                    self.cache.crop(-1)  # back to `resident` tokens (untimed)
        if dynamic:
            assert self.cache.get_seq_length() == self.resident
        else:
            assert self.cache.get_stored_length() == self.resident
        return times


def benchmark(sizes: list[int], steps: int, repeats: int, warmup: int, chunk: int) -> list[dict]:
    models = build_models()
    gen = torch.Generator().manual_seed(1)
    rows = []
    for resident in sizes:
        runners = {impl: Runner(impl, models[impl.split("+")[1]], resident, gen) for impl in IMPLS}
        for runner in runners.values():
            runner.run(warmup)
        blocks: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        order = list(IMPLS)
        gc.collect()
        gc.disable()
        try:
            for _ in range(repeats):
                times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
                for start in range(0, steps, chunk):  # chunks of a few steps each, in turn
                    for impl in order:
                        times[impl] += runners[impl].run(min(chunk, steps - start))
                    order.reverse()  # A B C, C B A, ...: drift hits every implementation alike
                for impl in IMPLS:
                    blocks[impl].append(statistics.median(times[impl]))
        finally:
            gc.enable()
        base = statistics.median(blocks[BASELINE])
        for impl in IMPLS:
            ms = statistics.median(blocks[impl])
            paired = statistics.median(a / b for a, b in zip(blocks[impl], blocks[BASELINE]))
            rows.append(
                dict(
                    resident_tokens=resident,
                    num_sink_tokens=NUM_SINK_TOKENS if impl.startswith("sink") else "",
                    window_length=resident - NUM_SINK_TOKENS if impl.startswith("sink") else "",
                    tokens_seen=runners[impl].cache.get_seq_length(),
                    impl=impl,
                    ms_per_token=round(ms, 4),
                    ms_min=round(min(blocks[impl]), 4),
                    ms_max=round(max(blocks[impl]), 4),
                    ratio=round(ms / base, 4),
                    ratio_paired=round(paired, 4),
                    steps=steps,
                    repeats=repeats,
                    chunk=chunk,
                    threads=torch.get_num_threads(),
                    dtype="float32",
                    torch=torch.__version__,
                    transformers=transformers.__version__,
                    machine=common.machine(),
                )
            )
        del runners
        gc.collect()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["resident_tokens"] for r in rows})
    width = 0.8 / len(IMPLS)
    colors = {"sink_cache+sink_sdpa": "#1f77b4", "sink_cache+sdpa": "#7fb2dc", BASELINE: "#999999"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, impl in enumerate(IMPLS):
        by_size = {r["resident_tokens"]: r for r in rows if r["impl"] == impl}
        xs = [i + (k - (len(IMPLS) - 1) / 2) * width for i in range(len(sizes))]
        ys = [by_size[s]["ms_per_token"] for s in sizes]
        errs = [
            [y - by_size[s]["ms_min"] for s, y in zip(sizes, ys)],
            [by_size[s]["ms_max"] - y for s, y in zip(sizes, ys)],
        ]
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=impl, color=colors[impl])
        if impl != BASELINE:
            for bar, s in zip(bars, sizes):
                top = max(bar.get_height(), by_size[s]["ms_max"])  # above the error bar
                ax.annotate(
                    f"{by_size[s]['ratio']:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, top),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    first = rows[0]
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_xlabel("resident tokens in the cache (sink cache: 4 sinks + window, full and evicting)")
    ax.set_ylabel("ms per decoded token (median)")
    ax.set_title(
        "Decode step: SinkCache vs DynamicCache at equal resident size\n"
        f"random Llama 512h x 8L, fp32 CPU, {first['threads']} thread(s); "
        f"torch {first['torch']}, transformers {first['transformers']}",
        fontsize=10,
    )
    ax.set_ylim(0, 1.3 * max(r["ms_max"] for r in rows))
    ax.legend(fontsize=8, loc="upper left", ncol=len(IMPLS), title="ratio = ms / dynamic_cache+sdpa", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'resident':>8}  {'impl':<22} {'ms/token':>9} {'min':>8} {'max':>8} {'ratio':>7} {'paired':>7}")
    for r in rows:
        print(
            f"{r['resident_tokens']:>8}  {r['impl']:<22} {r['ms_per_token']:>9.3f} {r['ms_min']:>8.3f} "
            f"{r['ms_max']:>8.3f} {r['ratio']:>7.3f} {r['ratio_paired']:>7.3f}"
        )
    print(f"\n(ratio = ms / {BASELINE} at the same resident size; target for the sink cache <= 1.05)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="resident tokens (cache capacity)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per implementation per round")
    p.add_argument("--repeats", type=int, default=7, help="rounds; the reported figure is the median over rounds")
    p.add_argument("--chunk", type=int, default=8, help="consecutive steps of one implementation before switching")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps per implementation before timing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 was fastest on the 2-core reference box)")
    p.add_argument(
        "--out", type=Path, default=OUT_DIR / "sink_cache_decode.csv", help="CSV path; the PNG goes beside it"
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = benchmark(args.sizes, args.steps, args.repeats, args.warmup, args.chunk)
    common.write_csv(rows, args.out)
    plot(rows, args.out.with_suffix(".png"))
    print_table(rows)
    print(
        f"wrote {args.out} and {args.out.with_suffix('.png')} in {time.perf_counter() - start:.0f} s", file=sys.stderr
    )


if __name__ == "__main__":
    main()
