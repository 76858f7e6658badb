#!/usr/bin/env python
"""Training throughput per process count on CPU: ``examples/finetune_sinks.py`` on 1 and 2 processes (gloo).

A small random Llama (built from a config, no download; char-level tokenizer over the Shakespeare text) is trained
for ``--steps`` optimizer steps with each recipe, as

* 1 process x 1 thread (the baseline),
* 1 process x N threads (intra-op parallelism on the same cores),
* N processes x 1 thread (data parallelism: ``torchrun --nproc_per_node N``, DDP over gloo),

always ``--per-device-batch`` rows of ``--seq-len`` tokens per process, so the global batch grows with the process
count (weak scaling, as on GPUs). Steps/s is Trainer's own ``train_steps_per_second`` (the training loop only, not
start-up); samples/s and tokens/s follow from the global batch. Writes ``scaling_out.csv`` and ``scaling_out.png``::

    python benchmarks/benchmark_scaling_out.py --out-dir docs/benchmarks/scaling_out

The 1-minute load average before each run goes into the CSV: on a shared machine it says how busy the cores were.
With ``--repeats R`` each configuration runs R times and the fastest run is kept (the one least disturbed by other
work on the machine); ``runs_steps_per_s`` lists all of them.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "finetune_sinks.py"
FIELDS = [
    "recipe",
    "processes",
    "threads_per_process",
    "per_device_batch",
    "global_batch",
    "seq_len",
    "steps",
    "train_runtime_s",
    "steps_per_s",
    "samples_per_s",
    "tokens_per_s",
    "final_loss",
    "loadavg_1min",
    "wall_s",
    "repeats",
    "runs_steps_per_s",
]


def build_model(directory: Path, hidden: int, layers: int) -> None:
    """A random Llama (``hidden`` wide, ``layers`` deep, 4 heads / 2 kv heads) + a char tokenizer, saved."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model_dir: Path, out: Path, recipe: str, processes: int, threads: int, args: argparse.Namespace) -> dict:
    train = [
        str(EXAMPLE),
        "--model",
        str(model_dir),
        "--recipe",
        recipe,
        "--seq-len",
        str(args.seq_len),
        "--max-steps",
        str(args.steps),
        "--per-device-train-batch-size",
        str(args.per_device_batch),
        "--learning-rate",
        "1e-3",
        "--warmup-steps",
        "0",
        "--output-dir",
        str(out),
        "--no-progress",
        "--no-plot",
        "--demo-tokens",
        "0",
        "--threads",
        str(threads),
        "--expect-world-size",
        str(processes),
    ]
    bin_dir = Path(sys.executable).parent
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(free_port()), *train]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    timing = re.search(r"train_runtime ([\d.]+) s; ([\d.]+) steps/s", proc.stdout)
    loss = re.search(r"loss [\d.]+ -> ([\d.]+)", proc.stdout)
    if timing is None or loss is None:
        raise RuntimeError(f"no timing / loss line in the output of {' '.join(cmd)}:\n{proc.stdout[-2000:]}")
    steps_per_s = float(timing.group(2))
    global_batch = processes * args.per_device_batch
    return {
        "recipe": recipe,
        "processes": processes,
        "threads_per_process": threads,
        "per_device_batch": args.per_device_batch,
        "global_batch": global_batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "train_runtime_s": round(float(timing.group(1)), 3),
        "steps_per_s": round(steps_per_s, 4),
        "samples_per_s": round(steps_per_s * global_batch, 3),
        "tokens_per_s": round(steps_per_s * global_batch * args.seq_len, 1),
        "final_loss": float(loss.group(1)),
        "loadavg_1min": round(load, 2),
        "wall_s": round(wall, 1),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = sorted({r["recipe"] for r in rows})
    labels = []
    for r in rows:
        label = f"{r['processes']} proc x {r['threads_per_process']} thr"
        if label not in labels:
            labels.append(label)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(recipes), 1)
    for i, recipe in enumerate(recipes):
        by_label = {f"{r['processes']} proc x {r['threads_per_process']} thr": r for r in rows if r["recipe"] == recipe}
        xs = [j + i * width for j in range(len(labels))]
        axes[0].bar(
            xs, [by_label[label]["steps_per_s"] if label in by_label else 0 for label in labels], width, label=recipe
        )
        axes[1].bar(
            xs, [by_label[label]["samples_per_s"] if label in by_label else 0 for label in labels], width, label=recipe
        )
    for ax, ylabel in zip(axes, ("optimizer steps / s", "samples / s (global batch x steps/s)")):
        ax.set_xticks([j + width * (len(recipes) - 1) / 2 for j in range(len(labels))], labels)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(
        f"finetune_sinks.py on CPU (gloo): {r0['per_device_batch']} x {r0['seq_len']} tokens per process per step"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="docs/benchmarks/scaling_out")
    p.add_argument("--recipes", default="sinklora,sink_token")
    p.add_argument("--processes", type=int, default=2, help="N: the largest process / thread count")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--per-device-batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is kept")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = [(1, 1), (1, args.processes), (args.processes, 1)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_sinks_scaling_") as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args.hidden, args.layers)
        for recipe in args.recipes.split(","):
            for processes, threads in configs:
                runs = [
                    run(model_dir, Path(tmp) / f"{recipe}-{processes}x{threads}-{i}", recipe, processes, threads, args)
                    for i in range(args.repeats)
                ]
                row = max(runs, key=lambda r: r["steps_per_s"])
                row["repeats"] = args.repeats
                row["runs_steps_per_s"] = " ".join(str(r["steps_per_s"]) for r in runs)
                print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                rows.append(row)
    with open(out_dir / "scaling_out.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out_dir / "scaling_out.png")
    print(f"wrote {out_dir / 'scaling_out.csv'} and {out_dir / 'scaling_out.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
