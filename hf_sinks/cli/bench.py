"""``hf-sinks bench``: decode cost (ms/token) and KV memory vs stream length, sink cache vs dense vs recompute.

::

    hf-sinks bench --lengths 1024,2048,4096,8192,16384 --output-dir out/
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from .options import (
    CLIError,
    add_command,
    add_model_options,
    add_no_progress,
    add_output_options,
    add_sink_options,
    add_text_file,
    check_min,
    format_table,
    int_list,
    machine,
    mib,
    model_and_tokens,
    model_name,
    parse_modes,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to ``hf-sinks``'s subparsers (``func=cmd_bench``)."""
    p = add_command(
        subparsers, "bench", help="decode ms/token and KV memory vs stream length: sink vs dense vs recompute"
    )
    add_model_options(p)
    add_sink_options(p, window_length=1020)
    add_no_progress(p)
    add_text_file(p, help="token source (default text; repeated if too short)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="stream lengths to time decoding at")
    p.add_argument("--modes", default="sink,dense,recompute", help="comma-separated: sink,dense,recompute")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per length (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before timing (default 2)")
    p.add_argument("--rounds", type=int, default=4, help="timed steps come in this many blocks alternating the modes")
    p.add_argument("--prefill-chunk", type=int, default=512, help="chunk size used to advance the streams (untimed)")
    p.add_argument("--recompute-max-length", type=int, default=2048, help="recompute only at lengths <= this")
    p.add_argument("--recompute-steps", type=int, default=3, help="timed recompute steps per length (default 3)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="sink mode: StaticSinkCache with a torch.compile'd (fullgraph) decode step; compiles untimed",
    )
    add_output_options(p, "hf_sinks_bench")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``hf-sinks bench``: decode ms/token and KV bytes per mode and stream length; CSV, PNG, table, ratios."""
    from ..eval.bench import BENCH_MODES, decode_benchmark, summarize

    modes = parse_modes(args.modes, BENCH_MODES)
    lengths = int_list(args.lengths, "--lengths")
    if args.window_length < 1:
        raise CLIError(f"--window-length={args.window_length} must be >= 1")
    if args.num_sink_tokens < 0:
        raise CLIError(f"--num-sink-tokens={args.num_sink_tokens} must be >= 0")
    if args.steps < 1 or args.rounds < 1:
        raise CLIError(f"--steps={args.steps} and --rounds={args.rounds} must be >= 1")
    check_min(args, ("--warmup", 0), ("--prefill-chunk", 1), ("--recompute-max-length", 0), ("--recompute-steps", 1))
    model, tokenizer, ids = model_and_tokens(args)
    needed = max(lengths) + args.steps + args.warmup
    if ids.shape[1] < needed:
        print(
            f"note: the text has {ids.shape[1]} tokens, fewer than the {needed} needed; it is repeated "
            f"(decode cost does not depend on the content)",
            file=sys.stderr,
        )
    rows = decode_benchmark(
        model,
        ids,
        lengths=lengths,
        modes=modes,
        num_sink_tokens=args.num_sink_tokens,
        window_length=args.window_length,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        prefill_chunk=args.prefill_chunk,
        recompute_max_length=args.recompute_max_length,
        recompute_steps=args.recompute_steps,
        progress=not args.no_progress,
        compile=args.compile,
    )
    summary = summarize(rows, args.num_sink_tokens, args.window_length)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "bench.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    png = None
    if not args.no_plot:
        try:
            from ..eval.plots import plot_bench

            png = plot_bench(
                rows,
                out_dir / "bench.png",
                title=f"{model_name(args.model)}: decode cost vs stream length; {machine()}",
            )
        except ImportError as e:
            print(f"warning: no plot ({e})", file=sys.stderr)
    table = [
        [
            r["label"],
            r["stream_length"],
            f"{r['ms_per_token']:.1f}",
            f"{r['ms_min']:.1f}",
            f"{r['ms_max']:.1f}",
            f"{r['tokens_per_second']:.2f}",
            mib(r["kv_cache_bytes"]),
            r["resident_tokens"],
        ]
        for r in rows
    ]
    print(format_table(table, ["mode", "streamed", "ms/token", "min", "max", "tokens/s", "KV MiB", "resident"]))
    print()
    for mode, s in summary["modes"].items():
        print(
            f"{mode}: {s['ms_shortest']:.1f} ms/token at {s['shortest']} tokens -> {s['ms_longest']:.1f} ms/token at "
            f"{s['longest']} tokens (ratio {s['ratio']:.2f}); KV {mib(s['kv_shortest'])} -> {mib(s['kv_longest'])} MiB"
        )
    sp = summary.get("speedup_vs_recompute")
    if sp:
        print(
            f"speedup of the sink cache over sliding-window recompute at cache {sp['cache']}: {sp['speedup']:.1f}x "
            f"({sp['recompute_ms']:.1f} vs {sp['sink_ms']:.1f} ms/token at stream lengths {sp['lengths']})"
        )
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0


__all__ = ["add_parser", "cmd_bench"]
