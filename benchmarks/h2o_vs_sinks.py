"""H2O (sinks + window + heavy hitters) vs StreamingLLM sinks at the same KV budget: streaming perplexity.

::

    python benchmarks/h2o_vs_sinks.py --num-tokens 4096 --output-dir docs/benchmarks/h2o_smollm2

Runs, on the first ``--num-tokens`` tokens of the default text (or ``--text-file``), chunked (both caches are exact
for chunks: each query sees what token-by-token decoding would show it):

* ``dense``: full cache (reference);
* ``sink S+W``: ``SinkCache(S, W)`` with ``W = budget - S`` (cache-relative positions);
* ``h2o S+W'+H``: ``H2OCache(S, W', H)``, same budget ``S + W' + H`` (original positions);
* ``h2o S+W'+H cache-pos``: the same with ``positions="cache"`` (run name ``h2o_cache``);
* ``h2o S+W+0``: H2O with no heavy hitters = sinks + window at original positions (separates the position scheme
  from the heavy hitters);
* ``h2o 0+W'+(H+S)``: H2O without pinned sinks (H2O keeps the first tokens only if their scores earn it);
* ``window``: ``budget`` most recent tokens, no sinks.

Writes ``perplexity.csv`` (per token), ``summary.csv``, ``perplexity.png`` and ``nll_vs_dense.png`` (trailing mean
of each run's NLL minus the dense run's, which separates curves that overlap in the first plot) into
``--output-dir``; ``--replot`` redraws ``nll_vs_dense.png`` from an existing ``perplexity.csv``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--text-file", default=None)
    p.add_argument("--num-tokens", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--num-sink-tokens", type=int, default=4)
    p.add_argument("--window-length", type=int, default=128, help="H2O recent window W'")
    p.add_argument("--heavy-budget", type=int, default=124, help="H2O heavy hitters H")
    p.add_argument("--runs", default="dense,sink,h2o,h2o_cache,h2o_no_heavy,h2o_no_sinks,window")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-dir", default="h2o_vs_sinks")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replot", action="store_true", help="only redraw nll_vs_dense.png from --output-dir's CSV")
    args = p.parse_args(argv)
    if args.replot:
        plot_vs_dense(
            _read_curves(Path(args.output_dir) / "perplexity.csv"), Path(args.output_dir) / "nll_vs_dense.png"
        )
        return 0

    from hf_sinks.default_model import load_model_and_tokenizer
    from hf_sinks.eval.data import load_token_ids
    from hf_sinks.eval.perplexity import streaming_perplexity
    from hf_sinks.eval.plots import plot_perplexity
    from hf_sinks.h2o import H2OCache

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sdpa")
    ids = load_token_ids(tokenizer, args.text_file, args.num_tokens)
    s, w, h = args.num_sink_tokens, args.window_length, args.heavy_budget
    budget = s + w + h
    progress = not args.no_progress
    chunk = args.chunk_size

    def h2o(cache):
        return streaming_perplexity(model, ids, chunk_size=chunk, progress=progress, cache=cache)

    plan = {
        "dense": (
            "dense",
            None,
            lambda: streaming_perplexity(model, ids, "dense", chunk_size=chunk, progress=progress),
        ),
        "sink": (
            f"sink {s}+{budget - s}",
            (s, budget - s, 0),
            lambda: streaming_perplexity(model, ids, "sink", s, budget - s, chunk_size=chunk, progress=progress),
        ),
        "h2o": (f"h2o {s}+{w}+{h}", (s, w, h), lambda: h2o(H2OCache(s, w, h))),
        "h2o_cache": (f"h2o {s}+{w}+{h} cache-pos", (s, w, h), lambda: h2o(H2OCache(s, w, h, positions="cache"))),
        "h2o_no_heavy": (f"h2o {s}+{budget - s}+0", (s, budget - s, 0), lambda: h2o(H2OCache(s, budget - s, 0))),
        "h2o_no_sinks": (f"h2o 0+{w}+{h + s}", (0, w, h + s), lambda: h2o(H2OCache(0, w, h + s))),
        "window": (
            f"window 0+{budget}",
            (0, budget, 0),
            lambda: streaming_perplexity(model, ids, "window", 0, budget, chunk_size=chunk, progress=progress),
        ),
    }
    runs = []
    for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
        label, sizes, fn = plan[name]
        result = fn()
        runs.append((label, sizes, result))
        print(
            f"{label}: ppl {result.perplexity:.3f}, {result.tokens_per_second:.1f} tokens/s, "
            f"peak KV {result.peak_cache_bytes / 2**20:.2f} MiB",
            file=sys.stderr,
            flush=True,
        )

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "perplexity.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "token_index", "nll", "cumulative_log_ppl", "kv_cache_bytes"])
        for label, _, r in runs:
            cum = r.cumulative_log_perplexity()
            for k in range(r.nll.numel()):
                writer.writerow([label, k + 1, f"{float(r.nll[k]):.6f}", f"{float(cum[k]):.6f}", int(r.cache_bytes[k])])
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "label",
                "num_sink_tokens",
                "window_length",
                "heavy_budget",
                "keys_per_query",
                "tokens",
                "chunk_size",
                "perplexity",
                "ppl_last_half",
                "tokens_per_second",
                "peak_kv_cache_bytes",
            ]
        )
        half = ids.shape[1] // 2
        for label, sizes, r in runs:
            last_half = float(torch.exp(r.nll[half:].double().mean()))
            sizes = sizes or ("", "", "")
            writer.writerow(
                [
                    label,
                    *sizes,
                    sum(sizes) if sizes[0] != "" else r.num_tokens,
                    r.num_tokens,
                    r.chunk_size,
                    f"{r.perplexity:.4f}",
                    f"{last_half:.4f}",
                    f"{r.tokens_per_second:.2f}",
                    r.peak_cache_bytes,
                ]
            )
    title = (
        f"SmolLM2-135M-Instruct, {args.num_tokens} tokens of the default text, chunk {chunk}, budget {budget} keys "
        f"per query; {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
    )
    plot_perplexity(
        [(label, r.nll, r.cache_bytes) for label, _, r in runs], out / "perplexity.png", title=title, smooth=256
    )
    curves = {label: r.nll for label, _, r in runs}
    if "dense" in curves:
        plot_vs_dense(curves, out / "nll_vs_dense.png", title=title)
    for label, _, r in runs:
        print(
            f"{label:>18}: ppl {r.perplexity:8.3f}  {r.tokens_per_second:7.1f} tok/s  "
            f"KV {r.peak_cache_bytes / 2**20:.2f} MiB"
        )
    print(f"wrote {out / 'perplexity.csv'}, {out / 'summary.csv'}, {out / 'perplexity.png'}")
    return 0


def _read_curves(path: Path) -> dict[str, torch.Tensor]:
    curves: dict[str, list[float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["label"], []).append(float(row["nll"]))
    return {label: torch.tensor(v) for label, v in curves.items()}


def plot_vs_dense(curves: dict[str, torch.Tensor], path: Path, smooth: int = 512, title: str = "") -> Path:
    """Trailing ``smooth``-token mean of (NLL - dense NLL) per run, plus each run's overall ppl ratio to dense."""
    from hf_sinks.eval.plots import moving_average, pyplot, save_figure

    plt = pyplot()
    dense = curves["dense"].double()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, nll in curves.items():
        if label == "dense":
            continue
        diff = nll.double() - dense
        ratio = float(torch.exp(diff.mean()))
        x = torch.arange(1, diff.numel() + 1)
        ax.plot(
            x[smooth:],
            moving_average(diff, smooth)[smooth:],
            label=f"{label} (ppl x{ratio:.3f} of dense)",
            linestyle="--" if label.startswith("window") else "-",
        )
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel(f"NLL - dense NLL (nats, mean of the last {smooth} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
