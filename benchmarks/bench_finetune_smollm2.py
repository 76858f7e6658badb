#!/usr/bin/env python
"""Real-model run of a recipe (default ``sink_token``) on SmolLM2-135M (CPU): train, then streaming perplexity.

Trains LoRA (r=8, q/k/v/o) + norms + one new ``<|sink|>`` embedding row on the default text (Shakespeare) minus its
last ``--held-out`` tokens, with every training row ``[<|sink|>] + (seq_len - 1) text tokens``; then streams the
held-out tokens through ``hf_sinks`` (``SinkCache``, chunked) with the same cache budget ``S + W`` for:

* the base model, 4 sinks (the first 4 text tokens) and 1 sink (the first text token);
* the base model with the *untrained* sink token prepended (mean-initialised row), 1 sink;
* the fine-tuned model (reloaded from the saved adapter and merged) with its trained sink token, 1 sink;
* the fine-tuned model *without* the sink token, 4 and 1 sinks (how much is plain domain adaptation);
* dense attention (no eviction) for the base model, and window attention (no sinks, same budget) for base and
  fine-tuned, as references.

Every row scores the same targets (held-out tokens 1..N-1; with a sink token prepended, its own prediction of the
first text token is dropped). Writes ``loss.csv``, ``loss.png``, ``perplexity.csv``, ``summary.json`` to
``--output-dir``::

    nice -n 10 python benchmarks/bench_finetune_smollm2.py --max-steps 200 --seq-len 256 \\
        --output-dir docs/benchmarks/finetune_smollm2 --adapter-dir /tmp/hf_sinks_ft_smollm2
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch


def _train(args, model, tokenizer, train_ids, out: Path, t0: float):
    """Fine-tune, copy the loss files to ``out``; returns ``(sink_token_id, seconds incl. load, steps done)``."""
    from hf_sinks.training import finetune

    result = finetune(
        model,
        tokenizer,
        args.recipe,
        train_ids,
        seq_len=args.seq_len,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        output_dir=args.adapter_dir,
        seed=args.seed,
        r=args.r,
        lora_alpha=2 * args.r,
        max_train_seconds=args.max_train_minutes * 60 if args.max_train_minutes else None,
    )
    steps_done = max((row.get("step", 0) for row in result.log_history), default=0)
    for name in ("loss.csv", "loss.png"):
        shutil.copy(Path(args.adapter_dir) / name, out / name)
    return result.recipe.sink_token_id, time.time() - t0, steps_done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--recipe", default="sink_token")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--max-train-minutes", type=float, default=None, help="stop training after this wall time")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--held-out", type=int, default=4096, help="last tokens of the text kept for evaluation")
    p.add_argument("--num-sink-tokens", type=int, default=4)
    p.add_argument("--cache-size", type=int, default=256, help="S + W for every streaming row")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="1 is much faster than 2 on a busy 2-core machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="docs/benchmarks/finetune_smollm2")
    p.add_argument("--adapter-dir", default="/tmp/hf_sinks_ft_smollm2")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="skip training: evaluate the adapter already in --adapter-dir (training fields of an existing "
        "summary.json in --output-dir are kept)",
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from hf_sinks.default_model import load_model_and_tokenizer
    from hf_sinks.eval import streaming_perplexity
    from hf_sinks.training import load_finetuned, load_recipe, prepend_sink_token, resize_for_sink_token
    from hf_sinks.training.data import split_token_ids, tokenize_text

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sdpa")
    pristine = copy.deepcopy(model)  # fresh bases for the reload and the base evaluations (no second GGUF load)
    ids = tokenize_text(tokenizer, None)
    train_ids, held_out = split_token_ids(ids, args.held_out)
    print(
        f"text: {ids.numel()} tokens; training on the first {train_ids.numel()}, held out the last {held_out.numel()}"
    )

    # ------------------------------------------------------------------ train
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    if args.eval_only:
        sink_id = load_recipe(args.adapter_dir).sink_token_id
        train_seconds, steps_done = previous.get("seconds_train_incl_load"), previous.get("steps_done")
        del model
    else:
        sink_id, train_seconds, steps_done = _train(args, model, tokenizer, train_ids, out, t0)

    # ------------------------------------------------------------------ evaluate
    def fresh_base():
        return copy.deepcopy(pristine).eval()

    base = fresh_base()
    tuned = load_finetuned(fresh_base(), args.adapter_dir, merge=True)
    base_with_row = fresh_base()
    if sink_id is not None:
        resize_for_sink_token(base_with_row, sink_id)  # the same mean-initialised row the training started from

    S, C = args.num_sink_tokens, args.cache_size
    rows = []

    def run(label, m, sinks, mode="sink", with_sink_token=False):
        stream = held_out
        if with_sink_token:
            stream = prepend_sink_token(held_out, sink_id)
        r = streaming_perplexity(
            m,
            stream,
            mode=mode,
            num_sink_tokens=sinks,
            window_length=C - sinks,
            chunk_size=args.chunk_size,
            progress=False,
        )
        nll = r.nll[1:] if with_sink_token else r.nll  # same targets in every row
        ppl = math.exp(float(nll.double().mean()))
        row = {
            "model": label,
            "sink_token": with_sink_token,
            "mode": mode,
            "num_sink_tokens": sinks if mode != "dense" else "",
            "window_length": C - sinks if mode != "dense" else "",
            "targets": nll.numel(),
            "perplexity": round(ppl, 4),
            "tokens_per_second": round(r.tokens_per_second, 1),
        }
        rows.append(row)
        print(row, flush=True)
        with open(out / "perplexity.csv", "w", newline="") as f:  # rewritten after every row: partial results survive
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    run("base", base, 0, mode="dense")
    run("base", base, 0, mode="window")
    run("base", base, S)
    run("base", base, 1)
    if sink_id is not None:
        run("base + untrained sink token", base_with_row, 1, with_sink_token=True)
        run("fine-tuned", tuned, 1, with_sink_token=True)
    run("fine-tuned", tuned, 0, mode="window")
    run("fine-tuned", tuned, S)
    run("fine-tuned", tuned, 1)

    summary = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized fp32)",
        "recipe": args.recipe,
        "seq_len": args.seq_len,
        "max_steps": args.max_steps,
        "steps_done": steps_done,
        "learning_rate": args.learning_rate,
        "warmup_steps": args.warmup_steps,
        "r": args.r,
        "lora_alpha": 2 * args.r,
        "batch_size": 1,
        "train_tokens": train_ids.numel(),
        "held_out_tokens": held_out.numel(),
        "cache_size": C,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "seconds_total": round(time.time() - t0, 1),
        "seconds_train_incl_load": None if train_seconds is None else round(train_seconds, 1),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "eval_only": args.eval_only,
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
