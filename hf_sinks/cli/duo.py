"""``hf-sinks duo``: DuoAttention's head identification, heuristic head patterns and evaluations.

::

    hf-sinks duo identify --output pattern.safetensors --steps 2000 --context-length 1000 8000
    accelerate launch -m hf_sinks.cli duo identify --model /path/to/model --output pattern.safetensors ...
    hf-sinks duo score --source passkey --context-length 2048 --output pattern_passkey.json
    hf-sinks duo bench --num-tokens 4096 --num-sink-tokens 64 --window-length 256 --output-dir out/
    hf-sinks duo passkey --pattern out/pattern.json --lengths 2048 --depths 0,0.5 --output-dir out/

The size flags are the rest of the CLI's: ``--num-sink-tokens`` (DuoAttention's sink size ``S``) and
``--window-length`` (its recent size ``W``). ``bench`` and ``passkey`` write into ``--output-dir`` (default
``hf_sinks_duo``); ``identify`` and ``score`` write one pattern file, ``--output`` (``.json`` or ``.safetensors``).
The library parts live in :mod:`hf_sinks.duo` (``identify``, ``eval``); this module is command code only.
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
    add_dtype,
    add_model,
    add_num_tokens,
    add_output_options,
    add_sink_options,
    add_text_file,
    add_threads,
    check_common,
    check_min,
    float_list,
    int_list,
    load_model,
    model_name,
    parse_modes,
    setup_torch,
)

DUO_COMMANDS = ("identify", "score", "bench", "passkey")
DUO_OUTPUT_DIR = "hf_sinks_duo"
PASSKEY_METHODS = ("dense", "duo", "sink")

#: ``hf-sinks duo --help``'s description: plain text (the module docstring is reST, for the API docs).
DESCRIPTION = f"""\
DuoAttention: head identification, heuristic head patterns and evaluations.

    hf-sinks duo identify --output pattern.safetensors --steps 2000 --context-length 1000 8000
    accelerate launch -m hf_sinks.cli duo identify --model /path/to/model --output pattern.safetensors ...
    hf-sinks duo score --source passkey --context-length 2048 --output pattern_passkey.json
    hf-sinks duo bench --num-tokens 4096 --num-sink-tokens 64 --window-length 256 --output-dir out/
    hf-sinks duo passkey --pattern out/pattern.json --lengths 2048 --depths 0,0.5 --output-dir out/

The size flags are the rest of the CLI's: --num-sink-tokens (DuoAttention's sink size S) and --window-length (its
recent size W). bench and passkey write into --output-dir (default {DUO_OUTPUT_DIR}); identify and score write one
pattern file, --output (.json or .safetensors)."""


# ------------------------------------------------------------------------------------------------- parser
def _model_flags(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_dtype(p)
    add_threads(p)


def _pattern_output(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--output",
        required=True,
        help=f"the pattern FILE to write (.safetensors or .json; its folder is created){what}",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``duo`` and its subcommands ``identify``, ``score``, ``bench``, ``passkey`` to ``hf-sinks``'s subparsers
    (``func`` is the subcommand's, ``command_name`` e.g. ``"duo bench"``)."""
    p = add_command(
        subparsers,
        "duo",
        help="DuoAttention: identify retrieval heads, score heads, bench, passkey",
        description=DESCRIPTION,
    )
    sub = p.add_subparsers(dest="duo_command", required=True, metavar="{" + ",".join(DUO_COMMANDS) + "}")

    ident = add_command(
        sub,
        "identify",
        help="find retrieval heads by gate optimisation (DuoAttention §3.2); "
        "also under accelerate launch -m hf_sinks.cli duo identify",
    )
    _model_flags(ident)
    _pattern_output(ident, "")
    ident.add_argument("--steps", type=int, default=2000, help="optimisation steps (default 2000)")
    ident.add_argument("--lr", type=float, default=0.02, help="learning rate of the gates (default 0.02)")
    ident.add_argument(
        "--reg-weight", type=float, default=0.05, help="weight of the mean |alpha| penalty (default 0.05)"
    )
    add_sink_options(ident, num_sink_tokens=128, window_length=256)
    ident.add_argument(
        "--context-length",
        type=int,
        nargs=2,
        default=[1000, 8000],
        metavar=("MIN", "MAX"),
        help="length range of the synthetic passkey examples (default 1000 8000)",
    )
    ident.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming KV heads (default 0.5)")
    ident.add_argument("--seed", type=int, default=0, help="seed of the synthetic examples and the gates")
    ident.set_defaults(func=cmd_identify, command_name="duo identify")

    score = add_command(sub, "score", help="a head pattern from a no-training heuristic (--source text or passkey)")
    _model_flags(score)
    _pattern_output(score, "; a .png of the pattern is written beside it unless --no-plot")
    score.add_argument(
        "--source",
        choices=("text", "passkey"),
        default="passkey",
        help="passkey: answer queries of synthetic passkey prompts (default); text: every query of --text-file",
    )
    add_text_file(score, help="UTF-8 text for --source text (default: the bundled evaluation text)")
    score.add_argument(
        "--context-length", type=int, default=2048, help="tokens per passkey prompt, or of the text (default 2048)"
    )
    score.add_argument("--examples", type=int, default=2, help="passkey prompts to average (--source passkey)")
    add_sink_options(score, num_sink_tokens=64, window_length=256)
    score.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming KV heads (default 0.5)")
    score.add_argument("--seed", type=int, default=1, help="seed of the synthetic passkey prompts")
    score.add_argument("--no-plot", action="store_true", help="no .png of the pattern")
    score.set_defaults(func=cmd_score, command_name="duo score")

    bench = add_command(sub, "bench", help="streaming perplexity: dense vs DuoCache vs SinkCache at the same memory")
    _model_flags(bench)
    add_text_file(bench, help="UTF-8 text (default: the bundled evaluation text)")
    add_output_options(
        bench, DUO_OUTPUT_DIR, help=f"folder for perplexity.csv/png and pattern.json/png (default {DUO_OUTPUT_DIR})"
    )
    bench.add_argument(
        "--pattern",
        default=None,
        help="saved HeadPattern with scores (default: the attention-mass "
        "heuristic on the first --score-tokens of the text)",
    )
    add_num_tokens(bench, 4096, "tokens of the text to stream (default 4096)")
    bench.add_argument("--score-tokens", type=int, default=2048, help="tokens the heuristic scores on (default 2048)")
    add_sink_options(bench, num_sink_tokens=64, window_length=256)
    bench.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming KV heads (default 0.5)")
    add_chunk_size(bench, 128, "tokens per forward (default 128)")
    bench.set_defaults(func=cmd_bench, command_name="duo bench")

    passkey = add_command(sub, "passkey", help="passkey retrieval: dense vs DuoCache vs SinkCache at the same memory")
    _model_flags(passkey)
    passkey.add_argument("--pattern", required=True, help="saved HeadPattern (e.g. duo bench's pattern.json)")
    add_output_options(passkey, DUO_OUTPUT_DIR, help=f"folder for the CSV (default {DUO_OUTPUT_DIR})", plot=False)
    passkey.add_argument("--lengths", default="2048", help="comma-separated prompt lengths in tokens (default 2048)")
    passkey.add_argument("--depths", default="0,0.5", help="comma-separated relative depths of the key (default 0,0.5)")
    passkey.add_argument("--trials", type=int, default=2, help="prompts per (length, depth), each with its own key")
    add_sink_options(passkey, num_sink_tokens=64, window_length=256)
    add_chunk_size(passkey, 512, "prompt tokens per forward (default 512)")
    passkey.add_argument(
        "--modes", default=",".join(PASSKEY_METHODS), help="comma-separated: dense,duo,sink (default all three)"
    )
    passkey.add_argument("--csv-name", default="passkey.csv", help="CSV file name inside --output-dir")
    passkey.add_argument("--append", action="store_true", help="append rows to an existing CSV")
    passkey.set_defaults(func=cmd_passkey, command_name="duo passkey")
    return p


# ----------------------------------------------------------------------------------------------- checks
def _check_sizes(args: argparse.Namespace) -> None:
    check_min(args, ("--num-sink-tokens", 0), ("--window-length", 1))
    sparsity = getattr(args, "sparsity", None)
    if sparsity is not None and not 0 <= sparsity <= 1:
        raise CLIError(f"--sparsity={sparsity} must be in [0, 1]")


def _check_pattern_output(path: str) -> None:
    """``--output`` names a ``.json``/``.safetensors`` file whose folder can be written (created now)."""
    from ..validation import check_output_dir

    out = Path(path).expanduser()
    if out.suffix not in (".json", ".safetensors"):
        raise CLIError(f"--output {path!r} must end in .json or .safetensors (it names the pattern file)")
    if out.is_dir():
        raise CLIError(f"--output {path!r} is a directory; it names the pattern file")
    check_output_dir(out.parent, flag="--output's folder")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Check the shared flags, set the threads and load ``--model`` with stock SDPA (the commands pick caches)."""
    check_common(args)
    setup_torch(args.threads)
    return load_model(args, attn_implementation="sdpa")


# ------------------------------------------------------------------------------------------------ commands
def cmd_identify(args: argparse.Namespace) -> int:
    """``hf-sinks duo identify``: :func:`~hf_sinks.duo.identify_heads`; the main process saves the pattern."""
    from ..duo import identify_heads

    _check_sizes(args)
    check_min(args, ("--steps", 1))
    lo, hi = args.context_length
    if lo < 2:
        raise CLIError(f"--context-length {lo} {hi}: MIN must be >= 2")
    if lo > hi:
        raise CLIError(f"--context-length {lo} {hi}: MIN must be <= MAX")
    if not args.lr > 0:
        raise CLIError(f"--lr={args.lr} must be > 0")
    _check_pattern_output(args.output)
    model, tokenizer = _load(args)
    result = identify_heads(
        model,
        tokenizer,
        num_steps=args.steps,
        lr=args.lr,
        reg_weight=args.reg_weight,
        num_sink_tokens=args.num_sink_tokens,
        window_length=args.window_length,
        context_length=(lo, hi),
        sparsity=args.sparsity,
        seed=args.seed,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        path = result.pattern.save(args.output)
        print(f"{result.pattern} -> {path} (final distill {result.history[-1]['distill']:.4g})")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """``hf-sinks duo score``: a pattern from a no-training heuristic (attention mass outside sinks + window), saved
    with its scores (and a .png beside it)."""
    from ..duo import HeadPattern, attention_mass_scores, passkey_retrieval_scores
    from ..duo.eval import plot_head_pattern
    from ..eval.data import load_token_ids

    _check_sizes(args)
    check_min(args, ("--context-length", 2), ("--examples", 1))
    _check_pattern_output(args.output)
    model, tokenizer = _load(args)
    s, w = args.num_sink_tokens, args.window_length
    if args.source == "passkey":
        scores = passkey_retrieval_scores(model, tokenizer, s, w, args.context_length, args.examples, seed=args.seed)
        source = f"passkey heuristic ({args.examples} synthetic {args.context_length}-token prompts, answer queries)"
    else:
        ids = load_token_ids(tokenizer, args.text_file, args.context_length)[0]
        scores = attention_mass_scores(model, ids, s, w)
        source = f"text heuristic (first {args.context_length} tokens of the text, all queries)"
    meta = {"source": source, "num_sink_tokens": s, "window_length": w}
    pattern = HeadPattern.from_scores(scores, sparsity=args.sparsity, metadata=meta)
    path = pattern.save(args.output)
    if not args.no_plot:
        plot_head_pattern(
            pattern, Path(args.output).with_suffix(".png"), title=f"{source}, {args.sparsity:.0%} streaming"
        )
    print(f"{pattern} -> {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``hf-sinks duo bench``: streaming perplexity, dense vs DuoCache (a pattern and its inverse) vs SinkCache at
    the same peak KV bytes and at ``S + W``; CSV + PNG."""
    import torch

    from ..duo import DuoCache, HeadPattern, attention_mass_scores
    from ..duo.eval import plot_head_pattern
    from ..duo.pattern import _kv_shape
    from ..eval.data import load_token_ids
    from ..eval.perplexity import streaming_perplexity
    from ..eval.plots import plot_perplexity

    _check_sizes(args)
    check_min(args, ("--num-tokens", 2), ("--score-tokens", 2), ("--chunk-size", 1))
    if args.pattern is not None and not Path(args.pattern).expanduser().is_file():
        raise CLIError(f"--pattern {args.pattern!r} does not exist")
    torch.manual_seed(0)
    model, tokenizer = _load(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = load_token_ids(tokenizer, args.text_file, args.num_tokens)[0]
    s, w, chunk = args.num_sink_tokens, args.window_length, args.chunk_size
    if args.pattern:
        pattern = HeadPattern.load(args.pattern, config=model.config)
        scores, source = pattern.scores, f"file {args.pattern}"
        if scores is None:
            raise CLIError(f"--pattern {args.pattern!r} has no scores; the benchmark re-binarises scores at --sparsity")
    else:  # the heuristic: attention mass outside sinks + window, on the first --score-tokens of the text
        scores = attention_mass_scores(model, ids[: args.score_tokens], s, w)
        source = f"attention-mass heuristic on the first {args.score_tokens} tokens"
    meta = {"source": source, "num_sink_tokens": s, "window_length": w}
    pattern = HeadPattern.from_scores(scores, sparsity=args.sparsity, metadata=meta)
    pattern.save(out / "pattern.json")
    name = model_name(args.model)
    if not args.no_plot:
        plot_head_pattern(
            pattern, out / "pattern.png", title=f"{name} head pattern: {source}, {args.sparsity:.0%} streaming"
        )
    inverted = HeadPattern.from_scores(-scores, sparsity=args.sparsity, metadata={**meta, "inverted": True})
    layers, kv_heads = _kv_shape(model.config)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    per_token = layers * kv_heads * head_dim * 2 * next(model.parameters()).element_size()  # K + V, all heads

    runs = [
        ("dense", lambda: streaming_perplexity(model, ids, "dense", chunk_size=chunk, progress=False), "-", None),
        (
            f"duo {args.sparsity:.0%} streaming",
            lambda: streaming_perplexity(model, ids, chunk_size=chunk, progress=False, cache=DuoCache(pattern, s, w)),
            "heuristic",
            pattern.streaming_fraction,
        ),
        (
            f"duo {args.sparsity:.0%} streaming, inverted pattern",
            lambda: streaming_perplexity(model, ids, chunk_size=chunk, progress=False, cache=DuoCache(inverted, s, w)),
            "inverted heuristic",
            inverted.streaming_fraction,
        ),
    ]
    rows, curves, duo_peak = [], [], None
    for label, run_one, pattern_name, fraction in runs:
        result = run_one()
        if label.startswith("duo") and duo_peak is None:
            duo_peak = int(result.cache_bytes.max())
        rows.append((label, pattern_name, fraction, result))
        curves.append((label, result.nll, result.cache_bytes))
        print(
            f"{label}: ppl {result.perplexity:.3f}, peak KV {int(result.cache_bytes.max()) / 2**20:.1f} MiB, "
            f"{result.elapsed_seconds:.0f} s",
            flush=True,
        )
    # SinkCache holding as many tokens (every head) as the DuoCache's peak holds on average per head
    same_w = duo_peak // per_token - s
    for label, window in ((f"sink S={s} W={same_w} (same peak KV as duo)", same_w), (f"sink S={s} W={w}", w)):
        result = streaming_perplexity(model, ids, "sink", s, window, chunk_size=chunk, progress=False)
        rows.append((label, "-", None, result))
        curves.append((label, result.nll, result.cache_bytes))
        print(
            f"{label}: ppl {result.perplexity:.3f}, peak KV {int(result.cache_bytes.max()) / 2**20:.1f} MiB", flush=True
        )

    with open(out / "perplexity.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "method",
                "pattern",
                "streaming_fraction",
                "num_sink_tokens",
                "window_length",
                "num_tokens",
                "chunk_size",
                "perplexity",
                "peak_kv_bytes",
                "mean_kv_bytes",
                "final_kv_bytes",
                "tokens_per_second",
            ]
        )
        for label, pattern_name, fraction, r in rows:
            writer.writerow(
                [
                    label,
                    pattern_name,
                    "" if fraction is None else f"{fraction:.3f}",
                    r.num_sink_tokens if r.num_sink_tokens is not None else "",
                    r.window_length if r.window_length is not None else "",
                    r.num_tokens,
                    r.chunk_size,
                    f"{r.perplexity:.4f}",
                    int(r.cache_bytes.max()),
                    int(r.cache_bytes.double().mean()),
                    int(r.cache_bytes[-1]),
                    f"{r.tokens_per_second:.1f}",
                ]
            )
    written = [out / "perplexity.csv", out / "pattern.json"]
    if not args.no_plot:
        title = (
            f"{name}, {ids.numel()} tokens: DuoCache ({args.sparsity:.0%} streaming KV heads, S={s}, W={w}; "
            f"pattern: {source}) vs SinkCache vs dense"
        )
        plot_perplexity(curves, out / "perplexity.png", title=title, smooth=min(512, ids.numel() // 4))
        written += [out / "perplexity.png", out / "pattern.png"]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_passkey(args: argparse.Namespace) -> int:
    """``hf-sinks duo passkey``: dense vs DuoCache (a saved pattern) vs SinkCache at the DuoCache's average KV at the
    end of the longest prompt; CSV (``--append`` adds rows to an existing one)."""
    from ..duo import HeadPattern
    from ..duo.eval import duo_passkey_accuracy
    from ..eval.passkey import passkey_accuracy

    _check_sizes(args)
    methods = parse_modes(args.modes, PASSKEY_METHODS)
    lengths = int_list(args.lengths, "--lengths", minimum=16)
    depths = float_list(args.depths, "--depths")
    check_min(args, ("--trials", 1), ("--chunk-size", 1))
    if not Path(args.pattern).expanduser().is_file():
        raise CLIError(f"--pattern {args.pattern!r} does not exist")
    if Path(args.csv_name).name != args.csv_name:
        raise CLIError(f"--csv-name {args.csv_name!r} must be a file name (it goes into --output-dir)")
    pattern = HeadPattern.load(args.pattern)  # a broken file fails here, named, before the model loads
    model, tokenizer = _load(args)
    try:
        pattern.validate(model.config)
    except ValueError as e:
        raise CLIError(f"--pattern {args.pattern!r}: {e}") from None
    s, w = args.num_sink_tokens, args.window_length
    common = dict(context_lengths=lengths, depths=depths, trials=args.trials, chunk_size=args.chunk_size)
    # a SinkCache holding as many tokens as the DuoCache holds per head on average at the end of the prompt
    same = round((1 - pattern.streaming_fraction) * max(lengths) + pattern.streaming_fraction * (s + w))
    rows = []
    if "dense" in methods:
        rows += passkey_accuracy(model, tokenizer, mode="dense", progress=False, **common)
    if "duo" in methods:
        rows += duo_passkey_accuracy(model, tokenizer, pattern, s, w, **common)
        for row in rows[-len(lengths) * len(depths) :]:
            row["label"] += f" ({pattern.metadata.get('source', args.pattern)})"
    if "sink" in methods:
        rows += passkey_accuracy(
            model, tokenizer, mode="sink", num_sink_tokens=s, window_length=same - s, progress=False, **common
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / args.csv_name
    append = args.append and path.exists()
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if not append:
            writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['label']:>40} len {row['context_length']} depth {row['depth']}: {row['correct']}/{row['trials']}")
    print(f"wrote {path}")
    return 0


__all__ = ["DUO_COMMANDS", "DUO_OUTPUT_DIR", "add_parser", "cmd_bench", "cmd_identify", "cmd_passkey", "cmd_score"]
