"""Passkey retrieval: dense attention vs attention sinks (StreamingLLM) on the embedded SmolLM2-135M (CPU).

    python examples/passkey_retrieval.py --lengths 512,1024,2048 --depths 0,0.5,1 --trials 2 --output-dir passkey_out

(The figure in the docs, docs/benchmarks/passkey_smollm2, comes from ``hf-sinks passkey``; see its README.)

Writes ``passkey.csv`` (one row per mode, length and depth) and ``passkey.png`` (accuracy vs context length).
With ``--modes dense,sink`` both run on the same prompts; ``sink`` streams the prompt through a ``SinkCache`` of
``S + W`` tokens, so it can only answer when the key is among the last ``W`` tokens (or the first ``S``).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model dir or .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--depths", default="0,0.5,1")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--modes", default="dense,sink")
    parser.add_argument("--num-sink-tokens", type=int, default=4)
    parser.add_argument("--window-length", type=int, default=1020)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default="passkey_out")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from hf_sinks.default_model import load_model_and_tokenizer
    from hf_sinks.eval.passkey import passkey_accuracy, plot_passkey

    model, tokenizer = load_model_and_tokenizer(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        start = time.perf_counter()
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
        )
        print(f"{mode}: {time.perf_counter() - start:.0f} s", flush=True)
    with open(out / "passkey.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_passkey(
        rows,
        out / "passkey.png",
        title=f"Passkey retrieval, SmolLM2-135M ({args.trials} trials x {len(depths)} depths)",
    )

    print("| context | depth | " + " | ".join(dict.fromkeys(r["label"] for r in rows)) + " |")
    for n in lengths:
        for d in depths:
            cells = [f"{r['correct']}/{r['trials']}" for r in rows if r["context_length"] == n and r["depth"] == d]
            print(f"| {n} | {d:g} | " + " | ".join(cells) + " |")
    print(f"wrote {out / 'passkey.csv'} and {out / 'passkey.png'}")


if __name__ == "__main__":
    main()
