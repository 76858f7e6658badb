#!/usr/bin/env python
"""Compiled streaming decode: StaticSinkCache under torch.compile vs StaticCache, SinkCache and DynamicCache.

Model: SmolLM2-135M-Instruct (the embedded default model), fp32, CPU, ``--threads`` torch threads (1).
Modes, at each resident size R (cache capacity; sink caches: 4 sinks + R - 4 window):

* ``dynamic``: eager ``DynamicCache`` under ``"sdpa"``, holding R tokens before every step (cropped back, untimed);
* ``sink``: eager ``SinkCache(4, R - 4)`` under ``"sink_sdpa"``, streamed to length L (full and evicting);
* ``static``: ``torch.compile(model.forward, fullgraph=True, dynamic=False)`` with transformers'
  ``StaticCache(max_cache_len=R)``
  under ``"sdpa"``, holding R - 1 tokens before every step (cropped back, untimed): SDPA over R slots;
* ``static_sink``: the same compile with ``StaticSinkCache(4, R - 4)`` (model under ``"sink_sdpa"``; its decode step
  is SDPA over the S + W slots), streamed to length L.

The sink streams reach each stream length L by exact chunked prefill (``--chunk`` tokens per forward through the
eager ``SinkCache`` + ``sink_sdpa`` machinery); the ``static_sink`` stream then takes over a copy of that state
(``StaticSinkCache.copy_from``, in place) and both continue from there. Timed steps are single-token forwards
(``logits_to_keep=1``), ``--steps`` per mode per round, in blocks of ``--block`` steps that alternate between the
modes (A B C D, D C B A, ...) so machine noise hits them alike; reported: the median over rounds of each round's
median ms per step; ratios are taken within the same (R, L) run. Compilation happens in untimed warm-up steps.

``--modes`` times a subset (``static_sink`` still prefills through an untimed eager ``sink`` stream); ratios to a
mode left out are left empty. ``--prefill-threads`` runs the (untimed) prefill on more threads than the timed steps.

Writes ``docs/benchmarks/compiled_decode_smollm2/compiled_decode.csv`` and ``.png``::

    python benchmarks/benchmark_compiled_decode.py                  # ~20 min on 2 shared CPU cores
    python benchmarks/benchmark_compiled_decode.py --sizes 256 --lengths 1024 --rounds 2   # quick look
    python benchmarks/benchmark_compiled_decode.py --sizes 1024 --lengths 1024 65536 \
        --out docs/benchmarks/compiled_decode_smollm2/compiled_decode_64k.csv        # 64k stream (long prefill)
    python benchmarks/benchmark_compiled_decode.py --modes dynamic sink --lengths 1024  # eager caches only
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
from transformers import DynamicCache, StaticCache  # noqa: E402

import hf_sinks  # noqa: E402
from hf_sinks.compat import cache_kwargs  # noqa: E402
from hf_sinks.default_model import load_model_and_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "benchmarks" / "compiled_decode_smollm2"
NUM_SINK_TOKENS = 4
MODES = ("dynamic", "sink", "static", "static_sink")
LABELS = {
    "dynamic": "eager DynamicCache",
    "sink": "eager SinkCache",
    "static": "compiled StaticCache",
    "static_sink": "compiled StaticSinkCache",
}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def build_models():
    """The default model under "sink_sdpa" and a twin under "sdpa" sharing its weights (same tensors)."""
    sink, _ = load_model_and_tokenizer("default", attn_implementation="sink_sdpa")
    stock = type(sink)(sink.config.__class__.from_dict(sink.config.to_dict()))
    stock.config._attn_implementation = "sdpa"
    stock.set_attn_implementation("sdpa")
    stock.load_state_dict(sink.state_dict(), assign=True)
    stock.eval()
    assert stock.lm_head.weight.data_ptr() == sink.lm_head.weight.data_ptr() or stock.config.tie_word_embeddings
    return sink, stock


class Stream:
    """One mode's model, cache and step function at a resident size, ready for timed single-token steps."""

    def __init__(self, mode: str, resident: int, sink_model, stock_model, compiled: dict, gen: torch.Generator):
        self.mode, self.resident, self.gen = mode, resident, gen
        self.vocab = sink_model.config.vocab_size
        window = resident - NUM_SINK_TOKENS
        if mode == "dynamic":
            self.model, self.step = stock_model, stock_model
            self.cache = DynamicCache(config=stock_model.config)
            self._prefill(stock_model, resident)
        elif mode == "static":
            self.model, self.step = stock_model, compiled["stock"]
            self.cache = StaticCache(config=stock_model.config, max_cache_len=resident)
            self._prefill(stock_model, resident - 1)
        elif mode == "sink":
            self.model, self.step = sink_model, sink_model
            self.cache = hf_sinks.SinkCache(NUM_SINK_TOKENS, window, config=sink_model.config)
        else:
            self.model, self.step = sink_model, compiled["sink"]
            self.cache = hf_sinks.StaticSinkCache(NUM_SINK_TOKENS, window, config=sink_model.config)
        self.length = 0  # tokens streamed (sink modes)

    def _ids(self, n: int) -> torch.Tensor:
        return torch.randint(1, self.vocab, (1, n), generator=self.gen)

    def _prefill(self, model, n: int, chunk: int = 512) -> None:
        with torch.inference_mode():
            for start in range(0, n, chunk):
                model(
                    input_ids=self._ids(min(chunk, n - start)),
                    **cache_kwargs(self.cache),
                    use_cache=True,
                    logits_to_keep=1,
                )

    def advance(self, length: int, chunk: int) -> None:
        """Stream the (eager) sink cache to ``length`` tokens by exact chunked prefill."""
        if self.length < length:
            self._prefill(self.model, length - self.length, chunk)
            self.length = length

    def run(self, steps: int) -> list[float]:
        """``steps`` timed single-token forwards; returns ms per step."""
        times = []
        with torch.inference_mode():
            for _ in range(steps):
                ids = self._ids(1)
                t0 = time.perf_counter()
                self.step(input_ids=ids, **cache_kwargs(self.cache), use_cache=True, logits_to_keep=1)
                times.append((time.perf_counter() - t0) * 1e3)
                if self.mode in ("dynamic", "static"):
                    self.cache.crop(-1)  # back to the resident size (untimed)
                else:
                    self.length += 1
        return times


def benchmark(
    sizes, lengths, steps, rounds, block, warmup, chunk, progress=print, modes=MODES, prefill_threads=None
) -> list[dict]:
    modes = tuple(m for m in MODES if m in modes)
    built = modes + (("sink",) if "static_sink" in modes and "sink" not in modes else ())
    timed_threads = torch.get_num_threads()
    sink_model, stock_model = build_models()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # dynamic=False: one static graph per cache size (with automatic dynamic shapes, the third size would reuse a
    # shape-generic graph that runs far slower on CPU than the specialised one)
    compiled = {
        "sink": torch.compile(sink_model.forward, fullgraph=True, dynamic=False),
        "stock": torch.compile(stock_model.forward, fullgraph=True, dynamic=False),
    }
    gen = torch.Generator().manual_seed(0)
    rows = []
    for resident in sizes:
        streams = {mode: Stream(mode, resident, sink_model, stock_model, compiled, gen) for mode in built}
        for length in sorted(set(max(n, 1) for n in lengths)):
            t0 = time.perf_counter()
            sink, static_sink = streams.get("sink"), streams.get("static_sink")
            if sink is not None:
                torch.set_num_threads(prefill_threads or timed_threads)
                sink.advance(length, chunk)
                torch.set_num_threads(timed_threads)
            if static_sink is not None:
                static_sink.cache.copy_from(sink.cache)  # the same state, taken over in place
                static_sink.length = sink.length
            warm = time.perf_counter()
            for stream in streams.values():  # first call of a compiled step compiles it (untimed)
                stream.run(warmup)
            if static_sink is not None:
                static_sink.cache.copy_from(sink.cache)  # back in lockstep after the warm-up steps
                static_sink.length = sink.length
            progress(
                f"R={resident} L={length}: prefill {warm - t0:.0f} s, warm-up {time.perf_counter() - warm:.0f} s, "
                f"load {load_average()}"
            )
            rounds_ms: dict[str, list[float]] = {mode: [] for mode in modes}
            order = list(modes)
            gc.collect()
            gc.disable()
            try:
                for _ in range(rounds):
                    times: dict[str, list[float]] = {mode: [] for mode in modes}
                    for start in range(0, steps, block):
                        for mode in order:
                            times[mode] += streams[mode].run(min(block, steps - start))
                        order.reverse()
                    for mode in modes:
                        rounds_ms[mode].append(statistics.median(times[mode]))
            finally:
                gc.enable()
            ms = {mode: statistics.median(v) for mode, v in rounds_ms.items()}

            def paired(mode: str, base: str) -> float | str:
                if base not in rounds_ms:
                    return ""
                return round(statistics.median(a / b for a, b in zip(rounds_ms[mode], rounds_ms[base])), 4)

            def ratio(mode: str, base: str) -> float | str:
                return round(ms[mode] / ms[base], 4) if base in ms else ""

            for mode in modes:
                rows.append(
                    dict(
                        resident_tokens=resident,
                        stream_length=streams[mode].length if mode in ("sink", "static_sink") else resident,
                        target_length=length,
                        mode=mode,
                        label=LABELS[mode],
                        ms_per_token=round(ms[mode], 3),
                        ms_min=round(min(rounds_ms[mode]), 3),
                        ms_max=round(max(rounds_ms[mode]), 3),
                        vs_dynamic=ratio(mode, "dynamic"),
                        vs_static=ratio(mode, "static"),
                        # the same ratios taken round by round (each round's modes ran interleaved), then the median
                        vs_dynamic_paired=paired(mode, "dynamic"),
                        vs_static_paired=paired(mode, "static"),
                        steps=steps,
                        rounds=rounds,
                        threads=torch.get_num_threads(),
                        load_average=load_average(),
                        dtype="float32",
                        torch=torch.__version__,
                        transformers=transformers.__version__,
                        machine=common.machine(),
                    )
                )
            summary = [f"{m} {ms[m]:.2f} ms" for m in modes]
            for mode, base in (
                ("static_sink", "static"),
                ("static_sink", "dynamic"),
                ("sink", "dynamic"),
                ("sink", "static"),
            ):
                if mode in ms and base in ms:
                    summary.append(f"{mode}/{base} {ratio(mode, base):.3f} (paired {paired(mode, base):.3f})")
            progress(" | ".join(summary))
        del streams
        gc.collect()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = sorted({r["resident_tokens"] for r in rows})
    colors = {"dynamic": "#999999", "sink": "#7fb2dc", "static": "#ff7f0e", "static_sink": "#1f77b4"}
    fig, axes = plt.subplots(1, len(sizes), figsize=(max(4.2 * len(sizes), 7.5), 4), squeeze=False, sharey=True)
    for ax, resident in zip(axes[0], sizes):
        for mode in [m for m in MODES if any(r["mode"] == m for r in rows)]:
            sel = sorted(
                (r for r in rows if r["resident_tokens"] == resident and r["mode"] == mode),
                key=lambda r: r["target_length"],
            )
            xs = [r["target_length"] for r in sel]
            ax.errorbar(
                xs,
                [r["ms_per_token"] for r in sel],
                yerr=[[r["ms_per_token"] - r["ms_min"] for r in sel], [r["ms_max"] - r["ms_per_token"] for r in sel]],
                marker="o",
                capsize=3,
                label=LABELS[mode],
                color=colors[mode],
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["target_length"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{int(v) // 1024}k"))
        ax.set_title(f"resident {resident} tokens", fontsize=10)
        ax.set_xlabel("stream length (tokens; dense/static: hold R)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms per decoded token (median)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    first = rows[0]
    fig.suptitle(
        f"SmolLM2-135M decode, fp32 CPU, {first['threads']} thread(s); torch {first['torch']}, "
        f"transformers {first['transformers']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'R':>5} {'L':>6}  {'mode':<12} {'ms/token':>9} {'min':>8} {'max':>8} {'vs dyn':>7} {'vs static':>9}"
        f" {'paired dyn':>10} {'paired static':>13}"
    )
    for r in rows:
        print(
            f"{r['resident_tokens']:>5} {r['target_length']:>6}  {r['mode']:<12} {r['ms_per_token']:>9.2f} "
            f"{r['ms_min']:>8.2f} {r['ms_max']:>8.2f} {_num(r['vs_dynamic']):>7} {_num(r['vs_static']):>9}"
            f" {_num(r['vs_dynamic_paired']):>10} {_num(r['vs_static_paired']):>13}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="resident tokens R")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="stream lengths L")
    p.add_argument("--steps", type=int, default=12, help="timed steps per mode per round")
    p.add_argument("--rounds", type=int, default=9, help="rounds; reported: the median of the round medians")
    p.add_argument("--block", type=int, default=2, help="consecutive steps of one mode before switching")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (compiles on first use)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens per forward)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the timed steps")
    p.add_argument("--prefill-threads", type=int, default=None, help="torch threads for the untimed prefill")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to time")
    p.add_argument("--out", type=Path, default=OUT_DIR / "compiled_decode.csv", help="CSV path; the PNG goes beside it")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"machine: {common.machine()}; load average at start: {load_average()}", file=sys.stderr)
    rows = benchmark(
        args.sizes,
        args.lengths,
        args.steps,
        args.rounds,
        args.block,
        args.warmup,
        args.chunk,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
        modes=args.modes,
        prefill_threads=args.prefill_threads,
    )
    common.write_csv(rows, args.out)
    plot(rows, args.out.with_suffix(".png"))
    print_table(rows)
    print(
        f"wrote {args.out} and {args.out.with_suffix('.png')} in {time.perf_counter() - start:.0f} s; "
        f"load average at end: {load_average()}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
