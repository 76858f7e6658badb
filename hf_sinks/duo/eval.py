"""DuoAttention evaluation (passkey retrieval, the head-pattern plot) and the ``python -m hf_sinks.duo`` command.

Streaming perplexity with a :class:`DuoCache`: ``hf_sinks.eval.streaming_perplexity(model, ids, cache=DuoCache(...))``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import DuoCache
from .identify import attention_mass_scores, identify_heads, passkey_retrieval_scores
from .pattern import HeadPattern, _kv_shape

def duo_passkey_accuracy(
    model: torch.nn.Module,
    tokenizer,
    pattern: HeadPattern,
    num_sink_tokens: int = 64,
    window_length: int = 256,
    context_lengths=(2048,),
    depths=(0.0, 0.5),
    trials: int = 2,
    chunk_size: int = 512,
    max_new_tokens: int = 8,
    digits: int = 5,
    seed: int = 0,
) -> list[dict]:
    """:func:`hf_sinks.eval.passkey.passkey_accuracy` with ``mode="duo"`` (a :class:`DuoCache`): the same prompts
    and keys (they depend only on ``seed``, length, depth and trial), rows in the same format."""
    from ..eval.passkey import passkey_accuracy

    return passkey_accuracy(
        model, tokenizer, context_lengths, depths, trials, mode="duo", num_sink_tokens=num_sink_tokens,
        window_length=window_length, chunk_size=chunk_size, max_new_tokens=max_new_tokens, digits=digits, seed=seed,
        progress=False, pattern=pattern,
    )


def _passkey_command(args) -> None:
    """Passkey retrieval: dense vs DuoCache (a saved pattern) vs SinkCache at the DuoCache's peak KV; CSV."""
    import csv

    from ..eval.passkey import passkey_accuracy

    model, tokenizer = _load(args.model)
    pattern = HeadPattern.load(args.pattern, config=model.config)
    s, w = args.sink_size, args.recent_size
    lengths, depths = args.context_lengths, args.depths
    common = dict(context_lengths=lengths, depths=depths, trials=args.trials, chunk_size=args.chunk_size)
    # a SinkCache holding as many tokens as the DuoCache holds per head on average at the end of the prompt
    same = round((1 - pattern.streaming_fraction) * max(lengths) + pattern.streaming_fraction * (s + w))
    rows = []
    if "dense" in args.methods:
        rows += passkey_accuracy(model, tokenizer, mode="dense", progress=False, **common)
    if "duo" in args.methods:
        rows += duo_passkey_accuracy(model, tokenizer, pattern, s, w, **common)
        for row in rows[-len(lengths) * len(depths):]:
            row["label"] += f" ({pattern.metadata.get('source', args.pattern)})"
    if "sink" in args.methods:
        rows += passkey_accuracy(model, tokenizer, mode="sink", num_sink_tokens=s, window_length=same - s,
                                 progress=False, **common)
    out = Path(args.out)
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


def plot_head_pattern(pattern: HeadPattern, path: str | Path, title: str = "") -> Path:
    """Heatmap of a pattern's scores (layers x KV heads), streaming heads hatched; the retrieval fraction per layer."""
    from ..eval.plots import _pyplot

    plt = _pyplot()
    scores = pattern.scores if pattern.scores is not None else pattern.retrieval.float()
    layers, kv_heads = scores.shape
    fig, (ax, ax_frac) = plt.subplots(1, 2, figsize=(7, max(3.5, 0.22 * layers)), width_ratios=(kv_heads + 1, 3))
    image = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for layer, head in (~pattern.retrieval).nonzero().tolist():
        ax.text(head, layer, "S", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(kv_heads))
    fig.colorbar(image, ax=ax, label="score (higher = retrieval)")
    ax_frac.barh(range(layers), pattern.retrieval.float().mean(1).numpy(), color="tab:blue")
    ax_frac.set_ylim(layers - 0.5, -0.5)
    ax_frac.set_xlim(0, 1)
    ax_frac.set_xlabel("retrieval fraction")
    ax_frac.set_yticks([])
    fig.suptitle(title or f"{pattern} (S = streaming head)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- command
def _load(model: str | None, attn_implementation: str = "sdpa"):
    from ..default_model import load_model_and_tokenizer

    return load_model_and_tokenizer(model, attn_implementation=attn_implementation)


def _identify_command(args) -> None:
    model, tokenizer = _load(args.model)
    result = identify_heads(
        model, tokenizer, num_steps=args.steps, lr=args.lr, reg_weight=args.reg_weight,
        num_sink_tokens=args.sink_size, window_length=args.recent_size, context_length=tuple(args.context_length),
        sparsity=args.sparsity, seed=args.seed,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        path = result.pattern.save(args.output)
        print(f"{result.pattern} -> {path} (final distill {result.history[-1]['distill']:.4g})")


def _bench_command(args) -> None:
    """Streaming perplexity: dense vs DuoCache (a pattern) vs SinkCache at the same peak KV bytes; CSV + PNG."""
    import csv

    from ..eval.data import load_token_ids
    from ..eval.perplexity import streaming_perplexity
    from ..eval.plots import plot_perplexity

    torch.manual_seed(0)
    model, tokenizer = _load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = load_token_ids(tokenizer, args.text, args.num_tokens)[0]
    s, w, chunk = args.sink_size, args.recent_size, args.chunk_size
    if args.pattern:
        pattern = HeadPattern.load(args.pattern, config=model.config)
        scores, source = pattern.scores, f"file {args.pattern}"
        if scores is None:
            raise ValueError(f"{args.pattern} has no scores; the benchmark re-binarises scores at --sparsity.")
    else:  # the heuristic: attention mass outside sinks + window, on the first --score-tokens of the text
        scores = attention_mass_scores(model, ids[: args.score_tokens], s, w)
        source = f"attention-mass heuristic on the first {args.score_tokens} tokens"
    meta = {"source": source, "num_sink_tokens": s, "window_length": w}
    pattern = HeadPattern.from_scores(scores, sparsity=args.sparsity, metadata=meta)
    pattern.save(out / "pattern.json")
    plot_head_pattern(pattern, out / "pattern.png", title=f"SmolLM2-135M head pattern: {source}, {args.sparsity:.0%} streaming")
    inverted = HeadPattern.from_scores(-scores, sparsity=args.sparsity, metadata={**meta, "inverted": True})
    layers, kv_heads = _kv_shape(model.config)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    per_token = layers * kv_heads * head_dim * 2 * next(model.parameters()).element_size()  # K + V, all heads

    runs = [("dense", lambda: streaming_perplexity(model, ids, "dense", chunk_size=chunk, progress=False), "-", None)]
    runs.append((f"duo {args.sparsity:.0%} streaming", lambda: streaming_perplexity(model, ids, chunk_size=chunk, progress=False,
                                                                      cache=DuoCache(pattern, s, w)),
                 "heuristic", pattern.streaming_fraction))
    runs.append((f"duo {args.sparsity:.0%} streaming, inverted pattern",
                 lambda: streaming_perplexity(model, ids, chunk_size=chunk, progress=False, cache=DuoCache(inverted, s, w)), "inverted heuristic",
                 inverted.streaming_fraction))
    rows, curves, duo_peak = [], [], None
    for label, run, pattern_name, fraction in runs:
        result = run()
        if label.startswith("duo") and duo_peak is None:
            duo_peak = int(result.cache_bytes.max())
        rows.append((label, pattern_name, fraction, result))
        curves.append((label, result.nll, result.cache_bytes))
        print(f"{label}: ppl {result.perplexity:.3f}, peak KV {int(result.cache_bytes.max()) / 2**20:.1f} MiB, "
              f"{result.elapsed_seconds:.0f} s", flush=True)
    # SinkCache holding as many tokens (every head) as the DuoCache's peak holds on average per head
    same_w = duo_peak // per_token - s
    for label, window in ((f"sink S={s} W={same_w} (same peak KV as duo)", same_w), (f"sink S={s} W={w}", w)):
        result = streaming_perplexity(model, ids, "sink", s, window, chunk_size=chunk, progress=False)
        rows.append((label, "-", None, result))
        curves.append((label, result.nll, result.cache_bytes))
        print(f"{label}: ppl {result.perplexity:.3f}, peak KV {int(result.cache_bytes.max()) / 2**20:.1f} MiB", flush=True)

    with open(out / "perplexity.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "pattern", "streaming_fraction", "num_sink_tokens", "window_length", "num_tokens",
                         "chunk_size", "perplexity", "peak_kv_bytes", "mean_kv_bytes", "final_kv_bytes",
                         "tokens_per_second"])
        for label, pattern_name, fraction, r in rows:
            writer.writerow([label, pattern_name, "" if fraction is None else f"{fraction:.3f}",
                             r.num_sink_tokens if r.num_sink_tokens is not None else "",
                             r.window_length if r.window_length is not None else "", r.num_tokens, r.chunk_size,
                             f"{r.perplexity:.4f}", int(r.cache_bytes.max()), int(r.cache_bytes.double().mean()),
                             int(r.cache_bytes[-1]), f"{r.tokens_per_second:.1f}"])
    title = (f"SmolLM2-135M, {ids.numel()} tokens: DuoCache ({args.sparsity:.0%} streaming KV heads, S={s}, W={w}; "
             f"pattern: {source}) vs SinkCache vs dense")
    plot_perplexity(curves, out / "perplexity.png", title=title, smooth=min(512, ids.numel() // 4))
    print(f"wrote {out / 'perplexity.csv'}, {out / 'perplexity.png'}, {out / 'pattern.json'}")


def _score_command(args) -> None:
    """A pattern from a no-training heuristic (attention mass outside sinks + window), saved with its scores."""
    from ..eval.data import load_token_ids

    model, tokenizer = _load(args.model)
    s, w = args.sink_size, args.recent_size
    if args.source == "passkey":
        scores = passkey_retrieval_scores(model, tokenizer, s, w, args.context_length, args.examples, seed=args.seed)
        source = f"passkey heuristic ({args.examples} synthetic {args.context_length}-token prompts, answer queries)"
    else:
        ids = load_token_ids(tokenizer, args.text, args.context_length)[0]
        scores = attention_mass_scores(model, ids, s, w)
        source = f"text heuristic (first {args.context_length} tokens of the text, all queries)"
    meta = {"source": source, "num_sink_tokens": s, "window_length": w}
    pattern = HeadPattern.from_scores(scores, sparsity=args.sparsity, metadata=meta)
    path = pattern.save(args.output)
    plot_head_pattern(pattern, Path(args.output).with_suffix(".png"), title=f"{source}, {args.sparsity:.0%} streaming")
    print(f"{pattern} -> {path}")


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_sinks.duo {identify,score,bench,passkey}`` (``accelerate launch -m hf_sinks.duo identify``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hf_sinks.duo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ident = sub.add_parser("identify", help="find retrieval heads by optimisation (DuoAttention §3.2)")
    ident.add_argument("--model", default=None, help="local HF model directory (default: the embedded SmolLM2)")
    ident.add_argument("--output", required=True, help="pattern file to write (.safetensors or .json)")
    ident.add_argument("--steps", type=int, default=2000)
    ident.add_argument("--lr", type=float, default=0.02)
    ident.add_argument("--reg-weight", type=float, default=0.05)
    ident.add_argument("--sink-size", type=int, default=128)
    ident.add_argument("--recent-size", type=int, default=256)
    ident.add_argument("--context-length", type=int, nargs=2, default=[1000, 8000], metavar=("MIN", "MAX"))
    ident.add_argument("--sparsity", type=float, default=0.5)
    ident.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="streaming perplexity: dense vs DuoCache vs SinkCache at the same memory")
    bench.add_argument("--model", default=None)
    bench.add_argument("--text", default=None, help="text file (default: the bundled evaluation text)")
    bench.add_argument("--out", default="docs/benchmarks/duo_attention_smollm2")
    bench.add_argument("--pattern", default=None, help="saved HeadPattern with scores (default: the heuristic)")
    bench.add_argument("--num-tokens", type=int, default=4096)
    bench.add_argument("--score-tokens", type=int, default=2048)
    bench.add_argument("--sink-size", type=int, default=64)
    bench.add_argument("--recent-size", type=int, default=256)
    bench.add_argument("--sparsity", type=float, default=0.5)
    bench.add_argument("--chunk-size", type=int, default=128)
    passkey = sub.add_parser("passkey", help="passkey retrieval: dense vs DuoCache vs SinkCache at the same memory")
    passkey.add_argument("--model", default=None)
    passkey.add_argument("--pattern", required=True, help="saved HeadPattern (e.g. the bench's pattern.json)")
    passkey.add_argument("--out", default="docs/benchmarks/duo_attention_smollm2")
    passkey.add_argument("--context-lengths", type=int, nargs="+", default=[2048])
    passkey.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5])
    passkey.add_argument("--trials", type=int, default=2)
    passkey.add_argument("--sink-size", type=int, default=64)
    passkey.add_argument("--recent-size", type=int, default=256)
    passkey.add_argument("--chunk-size", type=int, default=512)
    passkey.add_argument("--methods", nargs="+", choices=("dense", "duo", "sink"), default=["dense", "duo", "sink"])
    passkey.add_argument("--csv-name", default="passkey.csv")
    passkey.add_argument("--append", action="store_true", help="append rows to an existing CSV")
    score = sub.add_parser("score", help="a pattern from the attention-mass heuristic (no training)")
    score.add_argument("--model", default=None)
    score.add_argument("--output", required=True, help="pattern file to write (.safetensors or .json; a .png beside)")
    score.add_argument("--source", choices=("text", "passkey"), default="passkey")
    score.add_argument("--text", default=None, help="text file for --source text (default: the bundled text)")
    score.add_argument("--context-length", type=int, default=2048)
    score.add_argument("--examples", type=int, default=2, help="passkey prompts to average (--source passkey)")
    score.add_argument("--sink-size", type=int, default=64)
    score.add_argument("--recent-size", type=int, default=256)
    score.add_argument("--sparsity", type=float, default=0.5)
    score.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    commands = {"identify": _identify_command, "bench": _bench_command, "passkey": _passkey_command,
                "score": _score_command}
    commands[args.command](args)
