"""``hf-sinks perplexity``: streaming perplexity over a long text, dense vs window vs sink (CSV + PNG + a table).

::

    hf-sinks perplexity --num-tokens 8192 --modes dense,window,sink --window-length 252,1020 --output-dir out/
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .options import (
    CLIError,
    add_chunk_size,
    add_command,
    add_model_options,
    add_no_progress,
    add_num_tokens,
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
    text_name,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``perplexity`` to ``hf-sinks``'s subparsers (``func=cmd_perplexity``)."""
    p = add_command(
        subparsers, "perplexity", help="streaming perplexity over a long text: dense vs window vs sink (CSV + PNG)"
    )
    add_model_options(p)
    add_sink_options(
        p,
        window_length="1020",
        window_help="window W, or a comma-separated list (each runs window and sink; dense runs once)",
    )
    add_no_progress(p)
    add_text_file(p)
    add_num_tokens(p, 4096, "tokens of the text to stream (default 4096)")
    p.add_argument("--modes", default="dense,window,sink", help="comma-separated: dense,window,sink,recompute")
    add_chunk_size(p, 64, "tokens per forward (1: token by token; same result)")
    add_output_options(p, "hf_sinks_perplexity")
    p.add_argument("--csv-every", type=int, default=1, help="write every k-th token to the CSV (default 1: all)")
    p.add_argument("--smooth", type=int, default=512, help="plot the mean NLL of the last N tokens (default 512)")
    p.set_defaults(func=cmd_perplexity)
    return p


def no_eviction_note(runs: Sequence[tuple[str, Any]], num_tokens: int) -> str | None:
    """A one-line note naming the bounded runs whose cache (``S + W`` tokens) ``num_tokens`` never exceeds.

    Such a run evicts nothing, so its perplexity is dense attention's: without the note a table of equal figures
    reads like a finding. ``None`` when every bounded run evicts (or there is none).
    """
    full = [
        (label, r.num_sink_tokens + r.window_length)
        for label, r in runs
        if r.mode != "dense" and r.num_sink_tokens is not None and r.window_length is not None
    ]
    full = [(label, capacity) for label, capacity in full if num_tokens <= capacity]
    if not full:
        return None
    largest = max(capacity for _, capacity in full)
    return (
        f"note: {num_tokens} tokens never exceed the cache of {', '.join(label for label, _ in full)} "
        f"(S + W >= {num_tokens}): nothing is evicted, so these equal dense attention; "
        f"use --num-tokens > {largest} (or a smaller --window-length) to compare them"
    )


def cmd_perplexity(args: argparse.Namespace) -> int:
    """Run ``hf-sinks perplexity``: each mode (and window length) over the same tokens; CSVs, PNG, summary table."""
    from ..eval.perplexity import MODES, streaming_perplexity

    modes = parse_modes(args.modes, MODES)
    windows = int_list(args.window_length, "--window-length")
    if args.num_sink_tokens < 0:
        raise CLIError(f"--num-sink-tokens={args.num_sink_tokens} must be >= 0")
    if args.chunk_size < 1:
        raise CLIError(f"--chunk-size={args.chunk_size} must be >= 1")
    if args.num_tokens < 2:
        raise CLIError(f"--num-tokens={args.num_tokens} must be >= 2")
    check_min(args, ("--csv-every", 1), ("--smooth", 1))
    model, tokenizer, ids = model_and_tokens(args, args.num_tokens)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_len = getattr(model.config, "max_position_embeddings", None)

    runs = []
    plan = [("dense", windows[0])] if "dense" in modes else []  # dense once, then every mode per window length
    plan += [(mode, w) for w in windows for mode in modes if mode != "dense"]
    for mode, w in plan:
        result = streaming_perplexity(
            model,
            ids,
            mode=mode,
            num_sink_tokens=args.num_sink_tokens,
            window_length=w,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
        )
        label = mode if mode == "dense" else f"{mode} {result.num_sink_tokens}+{result.window_length}"
        runs.append((label, result))
        print(
            f"{label}: ppl {result.perplexity:.3f}, {result.tokens_per_second:.1f} tokens/s",
            file=sys.stderr,
            flush=True,
        )

    csv_path = out_dir / "perplexity.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "mode",
                "label",
                "num_sink_tokens",
                "window_length",
                "token_index",
                "nll",
                "cumulative_log_ppl",
                "kv_cache_bytes",
                "memory_delta_bytes",
                "memory_kind",
            ]
        )
        for label, r in runs:
            cum = r.cumulative_log_perplexity()
            every = max(1, args.csv_every)
            for k in range(0, r.nll.numel(), every):
                writer.writerow(
                    [
                        r.mode,
                        label,
                        "" if r.num_sink_tokens is None else r.num_sink_tokens,
                        "" if r.window_length is None else r.window_length,
                        k + 1,
                        f"{float(r.nll[k]):.6f}",
                        f"{float(cum[k]):.6f}",
                        int(r.cache_bytes[k]),
                        int(r.rss_bytes[k]),
                        r.memory_kind,
                    ]
                )

    split = train_len if train_len and args.num_tokens > train_len + 1 else None
    kind = runs[0][1].memory_kind
    mem_header = "peak alloc MiB" if kind.startswith("cuda") else "RSS growth MiB"
    header = (
        ["mode", "ppl"] + ([f"ppl<{split}", f"ppl>={split}"] if split else []) + ["tokens/s", "peak KV MiB", mem_header]
    )
    table = []
    for label, r in runs:
        row = [label, f"{r.perplexity:.3f}"]
        if split:
            # token_index k predicts token k+1: predictions of tokens at positions < split vs >= split
            row += [
                f"{math.exp(float(r.nll[: split - 1].double().mean())):.3f}",
                f"{math.exp(float(r.nll[split - 1 :].double().mean())):.3f}",
            ]
        row += [f"{r.tokens_per_second:.1f}", mib(r.peak_cache_bytes), mib(r.peak_memory_bytes)]
        table.append(row)
    summary = format_table(table, header)
    with (out_dir / "perplexity_summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["label"] + list(runs[0][1].summary()) + (["ppl_below_train_len", "ppl_from_train_len"] if split else [])
        )
        for (label, r), row in zip(runs, table):
            writer.writerow([label] + list(r.summary().values()) + (row[2:4] if split else []))

    png = None
    if not args.no_plot:
        try:
            from ..eval.plots import plot_perplexity

            title = (
                f"{model_name(args.model)}: {args.num_tokens} tokens of {text_name(args.text_file)}, "
                f"chunk {args.chunk_size}; {machine()}"
            )
            png = plot_perplexity(
                [(label, r.nll, r.cache_bytes) for label, r in runs],
                out_dir / "perplexity.png",
                title=title,
                smooth=args.smooth,
                training_length=train_len if split else None,
            )
        except ImportError as e:
            print(f"warning: no plot ({e})", file=sys.stderr)
    print(summary)
    note = no_eviction_note(runs, int(ids.numel()))
    if note is not None:
        sys.stdout.flush()  # the note goes right under the table, also when both streams are one terminal
        print(note, file=sys.stderr, flush=True)
    print(
        "(peak KV: exact bytes of the cache tensors; "
        + (
            "peak alloc: CUDA max allocated minus allocated at the start)"
            if kind.startswith("cuda")
            else "RSS growth: peak process RSS over its value at the start of the run, sampled after each forward; "
            "indicative only, the allocator reuses memory freed by earlier runs)"
        )
    )
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0


__all__ = ["add_parser", "cmd_perplexity", "no_eviction_note"]
