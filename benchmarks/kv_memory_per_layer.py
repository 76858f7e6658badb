"""KV-cache bytes per layer while streaming: SinkCaches vs a DynamicCache, on a real model (default Gemma 3 270M).

    nice -n 10 python benchmarks/kv_memory_per_layer.py --model gemma3-270m --lengths 256,512,1024,2048,4096 \
        --caches 4+252,4+1020,dynamic --output-dir docs/benchmarks/kv_memory_gemma3_270m

Streams the first ``max(lengths)`` tokens of the default text (Shakespeare) through the model's decoder in
``--chunk-size`` chunks, the last token of each length alone as in decoding (no LM head: the cache does not depend
on it) with each cache, and records
:func:`hf_sinks.eval.memory.cache_layer_bytes` (exact bytes of every tensor a layer holds) after each length. Memory
follows the layers (docs/design.md §2.3): in a SinkCache a sliding layer whose window ``sw`` fits the cache
(``sw <= S + W``) keeps only its window, every other layer ``S + W`` slots; a DynamicCache keeps ``sw`` tokens in a
sliding layer and every token in a global one.

Writes ``kv_memory.csv`` (one row per cache x length x layer) and ``kv_memory.png`` (bytes per layer at the longest
length, and total bytes vs length).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch


def make_cache(spec: str, model):
    from transformers import DynamicCache

    import hf_sinks

    if spec == "dynamic":
        return DynamicCache(config=model.config)
    sinks, window = (int(x) for x in spec.split("+"))
    return hf_sinks.SinkCache.from_model(model, sinks, window)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--caches", default="4+252,4+1020,dynamic", help="S+W of SinkCaches, or 'dynamic'")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default="docs/benchmarks/kv_memory_gemma3_270m")
    p.add_argument("--replot", action="store_true", help="only redraw kv_memory.png from the CSV in --output-dir")
    args = p.parse_args(argv)
    if args.replot:
        from hf_sinks.default_model import model_display_name

        with open(Path(args.output_dir) / "kv_memory.csv") as f:
            rows = [
                {**r, "tokens": int(r["tokens"]), "layer": int(r["layer"]), "bytes": int(r["bytes"])}
                for r in csv.DictReader(f)
            ]
        plot(rows, Path(args.output_dir) / "kv_memory.png", f"{model_display_name(args.model)}: KV cache per layer")
        return

    from hf_sinks.compat import cache_kwargs
    from hf_sinks.default_model import load_model_and_tokenizer, model_display_name
    from hf_sinks.eval.data import load_token_ids
    from hf_sinks.eval.memory import cache_layer_bytes

    torch.set_num_threads(args.threads)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sink_sdpa")
    ids = load_token_ids(tokenizer, None, max(lengths))
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.caches.split(","):
        cache = make_cache(spec, model)
        t0, done = time.perf_counter(), 0
        with torch.no_grad():
            for length in lengths:
                while done < length:  # chunks up to length - 1, then one token as in decoding (a DynamicCache
                    # trims its sliding layers to sw - 1 tokens plus the tokens of the current forward)
                    end = min(done + args.chunk_size, length - 1) if done < length - 1 else length
                    model.model(input_ids=ids[:, done:end], use_cache=True, **cache_kwargs(cache))
                    done = end
                for layer, (kind, nbytes) in enumerate(zip(layer_types, cache_layer_bytes(cache))):
                    rows.append({"cache": spec, "tokens": length, "layer": layer, "layer_type": kind, "bytes": nbytes})
        print(f"{spec}: {max(lengths)} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    with open(out_dir / "kv_memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out_dir / "kv_memory.png", f"{model_display_name(args.model)}: KV cache per layer")


def plot(rows, path: Path, title: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caches = list(dict.fromkeys(r["cache"] for r in rows))
    longest = max(r["tokens"] for r in rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(caches)
    for i, spec in enumerate(caches):
        layer_rows = [r for r in rows if r["cache"] == spec and r["tokens"] == longest]
        label = spec if spec == "dynamic" else f"SinkCache {spec}"
        ax1.bar(
            [r["layer"] + (i - (len(caches) - 1) / 2) * width for r in layer_rows],
            [r["bytes"] / 2**20 for r in layer_rows],
            width=width,
            label=label,
        )
        lengths = sorted({r["tokens"] for r in rows})
        totals = [sum(r["bytes"] for r in rows if r["cache"] == spec and r["tokens"] == n) / 2**20 for n in lengths]
        ax2.plot(lengths, totals, marker="o", label=label)
    kinds = [r["layer_type"] for r in rows if r["cache"] == caches[0] and r["tokens"] == longest]
    for layer, kind in enumerate(kinds):
        if kind == "full_attention":
            ax1.axvspan(layer - 0.45, layer + 0.45, color="grey", alpha=0.15, lw=0)
    ax1.set(xlabel="layer (grey: global layers)", ylabel="KV MiB", title=f"per layer after {longest} tokens")
    ax2.set(
        xlabel="tokens streamed",
        ylabel="KV MiB (all layers)",
        title="total vs stream length",
        xscale="log",
        yscale="log",
    )
    ax2.set_xticks(lengths, [str(n) for n in lengths])
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax1.set_xticks(range(len(kinds)))
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
