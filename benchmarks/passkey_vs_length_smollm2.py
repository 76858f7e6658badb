"""Passkey retrieval vs context length on SmolLM2-135M (CPU): dense, SinkCache, H2OCache and DuoCache.

    nice -n 10 python benchmarks/passkey_vs_length_smollm2.py --lengths 1024,2048,4096 --depths 0.25,0.5,0.75 \
        --trials 2 --output-dir docs/benchmarks/passkey_vs_length_smollm2

Every method reads the same prompts (:func:`hf_sinks.eval.passkey.passkey_accuracy`; the keys depend only on the
seed, length, depth and trial) in ``--chunk-size`` chunks and greedily writes 8 tokens. At the default budget every
bounded cache holds ~1024 keys per KV head: ``sink 4+1020``, ``h2o 4+512+508`` (sinks + recent window + heavy
hitters). The DuoCache (``--pattern``, S=64, W=256) is bounded only for its streaming heads: its retrieval heads keep
the whole prompt, so its memory grows with the length; the CSV's ``kv_bytes`` (cache bytes at the end of the prompt)
says what each run cost.

Writes ``passkey.csv`` (rewritten after every length x method, so a cut-short run keeps what it finished) and
``passkey.png`` (:func:`hf_sinks.eval.passkey.plot_passkey`).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

METHODS = ("dense", "sink", "h2o", "duo")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local HF model dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0.25,0.5,0.75")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--num-sink-tokens", type=int, default=4, help="S of the sink and h2o caches")
    p.add_argument("--window-length", type=int, default=1020, help="W of the sink cache")
    p.add_argument("--h2o-window-length", type=int, default=512, help="W of the h2o cache")
    p.add_argument("--heavy-budget", type=int, default=508, help="H of the h2o cache")
    p.add_argument("--pattern", default="docs/benchmarks/duo_attention_smollm2/pattern_passkey.json")
    p.add_argument("--duo-sink-tokens", type=int, default=64)
    p.add_argument("--duo-window-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-dir", default="docs/benchmarks/passkey_vs_length_smollm2")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from hf_sinks.default_model import load_model_and_tokenizer
    from hf_sinks.duo import HeadPattern
    from hf_sinks.eval.passkey import passkey_accuracy, plot_passkey

    model, tokenizer = load_model_and_tokenizer(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    s = args.num_sink_tokens
    settings = {
        "dense": dict(mode="dense"),
        "sink": dict(mode="sink", num_sink_tokens=s, window_length=args.window_length),
        "h2o": dict(
            mode="h2o", num_sink_tokens=s, window_length=args.h2o_window_length, heavy_budget=args.heavy_budget
        ),
        "duo": dict(
            mode="duo",
            num_sink_tokens=args.duo_sink_tokens,
            window_length=args.duo_window_length,
            pattern=HeadPattern.load(args.pattern, config=model.config),
        ),
    }
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(settings))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in lengths:  # length-major: a run cut short still has every method at the shorter lengths
        for method in methods:
            start = time.perf_counter()
            new = passkey_accuracy(
                model,
                tokenizer,
                context_lengths=[length],
                depths=depths,
                trials=args.trials,
                chunk_size=args.chunk_size,
                progress=False,
                **settings[method],
            )
            seconds = time.perf_counter() - start
            for row in new:
                row["seconds"] = round(seconds / len(new), 1)
            rows += new
            correct = sum(r["correct"] for r in new)
            print(
                f"{length:>6} {new[0]['label']:>32}: {correct}/{len(depths) * args.trials}, "
                f"KV {new[0]['kv_bytes'] / 2**20:.1f} MiB, {seconds:.0f} s",
                flush=True,
            )
            with open(out / "passkey.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    plot_passkey(rows, out / "passkey.png", title=_title(args.trials, len(depths)))
    print(f"wrote {out / 'passkey.csv'}, {out / 'passkey.png'}")


def _title(trials: int, num_depths: int) -> str:
    return (
        f"Passkey retrieval, SmolLM2-135M ({trials} trials x {num_depths} depths per length)\n"
        "sink, h2o: ~1024 keys per KV head; duo (under dense): half the heads keep all"
    )


if __name__ == "__main__":
    main()
