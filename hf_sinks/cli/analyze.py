"""``hf-sinks analyze``: the sink diagnostics of :mod:`hf_sinks.analysis` from the command line (CSV + PNG).

::

    hf-sinks analyze --num-tokens 1024 --output-dir out/

Command code only: the library (:mod:`hf_sinks.analysis`) never imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .options import (
    CLIError,
    add_command,
    add_model_options,
    add_no_progress,
    add_num_tokens,
    add_output_options,
    add_text_file,
    machine,
    model_and_tokens,
    model_name,
    text_name,
)


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``analyze`` subcommand to ``hf-sinks``'s subparsers; returns the parser (``func=cmd_analyze``)."""
    p = add_command(
        subparsers, "analyze", help="attention-sink diagnostics: sink score per layer/head, secondary sinks (CSV + PNG)"
    )
    add_model_options(
        p,
        model_help="'default' (embedded SmolLM2-135M-Instruct GGUF), a local HF model directory or a .gguf file",
        attn_implementation=None,
    )
    add_text_file(p)
    add_num_tokens(p, 1024, "tokens of the text to analyse (default 1024)")
    p.add_argument("--epsilon", type=float, default=0.3, help="sink-head threshold on the sink score (default 0.3)")
    p.add_argument("--sink-tokens", type=int, default=1, help="initial tokens that make up the sink (default 1)")
    p.add_argument(
        "--secondary-factor",
        type=float,
        default=20.0,
        help="secondary sink: attention received > this multiple of uniform attention (default 20)",
    )
    p.add_argument("--secondary-min-heads", type=int, default=2, help="... in at least this many heads (default 2)")
    p.add_argument(
        "--min-distance",
        type=int,
        default=16,
        help="only queries at least this far after a key count for secondary sinks (default 16)",
    )
    add_output_options(p, "hf_sinks_analysis")
    add_no_progress(p)
    p.set_defaults(func=cmd_analyze, attn_implementation="sdpa")  # the analysis swaps in its own attention anyway
    return p


add_parser = add_analyze_parser


def cmd_analyze(args: argparse.Namespace) -> int:
    """``hf-sinks analyze``: run :func:`analyze`, write the CSVs/PNGs, print the summary."""
    from ..analysis import analyze, plot_sink_heatmap, plot_sink_layers  # torch: not for ``--help``

    if args.num_tokens < 2:
        raise CLIError(f"--num-tokens={args.num_tokens} must be >= 2")
    if not 0 < args.epsilon < 1:
        raise CLIError(f"--epsilon={args.epsilon} must be strictly between 0 and 1")
    if args.sink_tokens < 1:
        raise CLIError(f"--sink-tokens={args.sink_tokens} must be >= 1")
    for flag, value, minimum in (
        ("--secondary-factor", args.secondary_factor, "> 1"),
        ("--secondary-min-heads", args.secondary_min_heads, ">= 1"),
        ("--min-distance", args.min_distance, ">= 1"),
    ):
        if not (value > 1 if minimum == "> 1" else value >= 1):
            raise CLIError(f"{flag}={value} must be {minimum}")
    model, tokenizer, ids = model_and_tokens(args, args.num_tokens)
    analysis = analyze(
        model,
        ids,
        None,
        None,
        epsilon=args.epsilon,
        sink_tokens=args.sink_tokens,
        progress=not args.no_progress,
        secondary_factor=args.secondary_factor,
        secondary_min_heads=args.secondary_min_heads,
        min_distance=args.min_distance,
    )
    analysis.token_texts = [tokenizer.decode([int(t)]) for t in analysis.token_ids]
    for s in analysis.secondary_sinks:
        s.token_text = analysis.token_texts[s.token_index]
    title = f"{model_name(args.model)}, {args.num_tokens} tokens of {text_name(args.text_file)}"
    paths = analysis.save(args.output_dir, plots=False)
    if not args.no_plot:
        try:
            paths["heatmap"] = plot_sink_heatmap(
                analysis,
                Path(args.output_dir) / "sink_heatmap.png",
                title=f"{title}: sink score per head, {int(analysis.is_sink.sum())}/"
                f"{analysis.is_sink.numel()} heads > eps={args.epsilon:g}",
            )
            paths["layers"] = plot_sink_layers(analysis, Path(args.output_dir) / "sink_layers.png", title=title)
        except ImportError as e:
            print(f"warning: no plot ({e})", file=sys.stderr)
    print(analysis.summary())
    print(f"({machine()})", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


__all__ = ["add_analyze_parser", "add_parser", "cmd_analyze"]
