#!/usr/bin/env python
"""Passkey retrieval on SmolLM2-135M (CPU): the base model vs the ``sink_token`` fine-tune, at one cache budget.

Loads the base model and the fine-tuned one (the adapter saved by ``benchmarks/bench_finetune_smollm2.py``, reloaded
onto a copy of the base and merged) and runs :func:`hf_sinks.eval.passkey.passkey_accuracy` on the same prompts
(same keys) for four runs:

* ``base dense``: no eviction;
* ``base sink 4+252``: ``SinkCache``, the first 4 prompt tokens as sinks;
* ``fine-tuned dense``: the trained ``<|sink|>`` token prepended (as in training), no eviction;
* ``fine-tuned sink 1+255``: the trained token prepended and kept as the single sink.

The cached runs hold ``--cache-size`` tokens (256, as in the perplexity figures of docs/finetuning.md).
The prepended token does not count toward the context length (``prefix_ids`` of ``passkey_accuracy``). Lengths run
in increasing order, each for all four runs; a length is skipped if the time so far, scaled by the tokens it adds,
predicts a total above ``--max-minutes``. Writes ``passkey.csv`` and ``passkey.png`` to ``--output-dir`` and prints a
markdown table (correct / trials, summed over depths)::

    nice -n 10 python benchmarks/passkey_finetuned_smollm2.py --lengths 256,512,1024,2048 \\
        --output-dir docs/benchmarks/finetune_smollm2/passkey --adapter-dir /tmp/hf_sinks_ft_smollm2
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--adapter-dir", default="/tmp/hf_sinks_ft_smollm2")
    p.add_argument("--lengths", default="256,512,1024", help="comma-separated context lengths (tokens)")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--num-sink-tokens", type=int, default=4, help="sinks of the base model's cached run")
    p.add_argument("--cache-size", type=int, default=256, help="S + W for the cached runs")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--max-minutes", type=float, default=18.0, help="skip a length predicted to end past this")
    p.add_argument("--threads", type=int, default=1, help="1 is much faster than 2 on a busy 2-core machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="docs/benchmarks/finetune_smollm2/passkey")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from hf_sinks.default_model import load_model_and_tokenizer
    from hf_sinks.eval.passkey import passkey_accuracy, plot_passkey
    from hf_sinks.training import load_finetuned, load_recipe

    lengths = sorted(int(n) for n in args.lengths.split(",") if n.strip())
    depths = [float(d) for d in args.depths.split(",") if d.strip()]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sdpa")
    base.eval()
    sink_id = load_recipe(args.adapter_dir).sink_token_id
    if sink_id is None:
        raise SystemExit(f"{args.adapter_dir} holds no sink_token recipe (no sink token id).")
    tuned = load_finetuned(copy.deepcopy(base), args.adapter_dir, merge=True)
    print(f"loaded base + fine-tuned (sink token id {sink_id}) in {time.time() - t0:.0f} s", flush=True)

    S, C = args.num_sink_tokens, args.cache_size
    runs = [  # (column, model, mode, sinks, prefix)
        ("base dense", base, "dense", S, None),
        (f"base sink {S}+{C - S}", base, "sink", S, None),
        ("fine-tuned dense (+ sink token)", tuned, "dense", 1, [sink_id]),
        (f"fine-tuned sink 1+{C - 1} (sink token)", tuned, "sink", 1, [sink_id]),
    ]
    rows, done, skipped = [], [], []
    t_eval = time.time()
    for length in lengths:
        elapsed = time.time() - t_eval
        if done and (time.time() - t0 + elapsed * length / sum(done)) / 60 > args.max_minutes:
            skipped.append(length)
            print(f"skipping length {length}: predicted to end past {args.max_minutes} min", flush=True)
            continue
        for column, model, mode, sinks, prefix in runs:
            t = time.time()
            for row in passkey_accuracy(
                model,
                tokenizer,
                [length],
                depths,
                args.trials,
                mode=mode,
                num_sink_tokens=sinks,
                window_length=C - sinks,
                chunk_size=args.chunk_size,
                seed=args.seed,
                progress=False,
                prefix_ids=prefix,
            ):
                rows.append(
                    {
                        "run": column,
                        "model": column.split(" ")[0],
                        **row,
                        "label": column,
                        "seconds": round(time.time() - t, 1),
                    }
                )
                print(
                    f"{column:40s} length {length:5d} depth {row['depth']:.1f}: {row['correct']}/{row['trials']}  "
                    f"{row['answers']}",
                    flush=True,
                )
            with open(out / "passkey.csv", "w", newline="") as f:  # rewritten as it goes: partial results survive
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        done.append(length)

    plot_passkey(
        rows,
        out / "passkey.png",
        title=f"Passkey, SmolLM2-135M base vs sink_token fine-tune, cache {C} "
        f"({args.trials} trials x {len(depths)} depths)",
    )
    total = time.time() - t0
    summary = {
        "lengths": done,
        "skipped_lengths": skipped,
        "depths": depths,
        "trials": args.trials,
        "cache_size": C,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "seed": args.seed,
        "sink_token_id": sink_id,
        "seconds_total": round(total, 1),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    columns = [r[0] for r in runs]
    print(f"\n| length | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
    for length in done:
        cells = []
        for column in columns:
            at = [r for r in rows if r["run"] == column and r["context_length"] == length]
            cells.append(f"{sum(r['correct'] for r in at)}/{sum(r['trials'] for r in at)}")
        print(f"| {length} | {' | '.join(cells)} |")
    print(f"\n{total / 60:.1f} min in all" + (f"; skipped lengths {skipped} (time)" if skipped else ""))


if __name__ == "__main__":
    main()
