"""``hf-sinks passkey``: passkey retrieval accuracy vs context length, dense vs sink (also H2O, DuoAttention).

::

    hf-sinks passkey --lengths 512,1024,2048,4096 --modes dense,sink --output-dir out/
    hf-sinks passkey --modes dense,h2o,duo --heavy-budget 256 --pattern pattern.json
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from .options import (
    CLIError,
    add_chunk_size,
    add_command,
    add_model_options,
    add_no_progress,
    add_output_options,
    add_sink_options,
    check_common,
    float_list,
    format_table,
    int_list,
    load_model,
    machine,
    model_name,
    parse_modes,
    setup_torch,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``passkey`` to ``hf-sinks``'s subparsers (``func=cmd_passkey``)."""
    p = add_command(
        subparsers, "passkey", help="passkey retrieval accuracy vs context length: dense vs sink cache (CSV + PNG)"
    )
    add_model_options(p)
    add_sink_options(p, window_length=1020)
    add_no_progress(p)
    p.add_argument("--lengths", default="512,1024,2048,4096", help="prompt lengths in tokens")
    p.add_argument("--depths", default="0,0.5,1", help="relative depths of the key in the filler (0 = start)")
    p.add_argument("--trials", type=int, default=2, help="prompts per (length, depth), each with its own key")
    p.add_argument("--modes", default="dense,sink", help="comma-separated: dense,sink,h2o,duo")
    p.add_argument("--heavy-budget", type=int, default=None, help="h2o: heavy-hitter tokens kept per KV head")
    p.add_argument("--pattern", default=None, help="duo: HeadPattern file (.json or .safetensors)")
    add_chunk_size(p, 512, "prompt tokens per forward (cached modes)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens decoded for the answer")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (the same prompts for every mode)")
    add_output_options(p, "hf_sinks_passkey")
    p.set_defaults(func=cmd_passkey)
    return p


def cmd_passkey(args: argparse.Namespace) -> int:
    """Run ``hf-sinks passkey``: accuracy per mode, length and depth over the same prompts; CSV, PNG, table."""
    from ..eval.passkey import PASSKEY_MODES, passkey_accuracy, plot_passkey

    modes = parse_modes(args.modes, PASSKEY_MODES)
    lengths = int_list(args.lengths, "--lengths", minimum=16)
    depths = float_list(args.depths, "--depths")
    for name, value, minimum in (
        ("--trials", args.trials, 1),
        ("--window-length", args.window_length, 1),
        ("--num-sink-tokens", args.num_sink_tokens, 0),
        ("--chunk-size", args.chunk_size, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
    ):
        if value < minimum:
            raise CLIError(f"{name}={value} must be >= {minimum}")
    if "h2o" in modes and (args.heavy_budget is None or args.heavy_budget < 0):
        raise CLIError(f"--modes h2o needs --heavy-budget >= 0 (got {args.heavy_budget})")
    if "duo" in modes and args.pattern is None:
        raise CLIError("--modes duo needs --pattern (a HeadPattern .json/.safetensors, see hf-sinks duo score)")
    if args.pattern is not None and not Path(args.pattern).expanduser().is_file():
        raise CLIError(f"--pattern {args.pattern!r} does not exist")
    pattern = None
    if args.pattern is not None:
        from ..duo import HeadPattern

        pattern = HeadPattern.load(args.pattern)  # a broken file fails here, named, before the model loads
    check_common(args)
    setup_torch(args.threads)
    model, tokenizer = load_model(args)
    if pattern is not None:
        try:
            pattern.validate(model.config)
        except ValueError as e:
            raise CLIError(f"--pattern {args.pattern!r}: {e}") from None
    if "duo" not in modes:
        pattern = None
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in modes:
        extra = {"heavy_budget": args.heavy_budget} if mode == "h2o" else {"pattern": pattern} if mode == "duo" else {}
        rows += passkey_accuracy(
            model,
            tokenizer,
            context_lengths=lengths,
            depths=depths,
            trials=args.trials,
            mode=mode,
            num_sink_tokens=args.num_sink_tokens,
            window_length=args.window_length,
            chunk_size=args.chunk_size,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            progress=not args.no_progress,
            **extra,
        )
    csv_path = out_dir / "passkey.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = None
    if not args.no_plot:
        png = plot_passkey(
            rows,
            out_dir / "passkey.png",
            title=f"Passkey retrieval, {model_name(args.model)} "
            f"({args.trials} trials x {len(depths)} depths); {machine()}",
        )
    labels = list(dict.fromkeys(r["label"] for r in rows))
    table = []
    for n in lengths:
        cells = []
        for label in labels:
            sel = [r for r in rows if r["label"] == label and r["context_length"] == n]
            cells.append(f"{sum(r['correct'] for r in sel)}/{sum(r['trials'] for r in sel)}")
        table.append([n] + cells)
    print(format_table(table, ["context"] + labels))
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0


__all__ = ["add_parser", "cmd_passkey"]
