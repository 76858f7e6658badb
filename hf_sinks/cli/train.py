"""``hf-sinks train``: sink-aware LoRA fine-tuning from the command line.

::

    hf-sinks train --recipe sink_token --seq-len 256 --max-steps 200 --output-dir smollm2-sink
    accelerate launch -m hf_sinks.cli train --recipe sinklora --seq-len 4096 --bf16 --output-dir out/

``--model default`` is the embedded SmolLM2-135M-Instruct; a local HF model directory or a ``.gguf`` file also
works. The text defaults to hf_sinks' Shakespeare text (minus ``--held-out-tokens`` at its end).
``examples/finetune_sinks.py`` reuses :func:`add_train_arguments` and :func:`rope_scaling_from_args`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .options import (
    add_command,
    add_dtype,
    add_model,
    add_no_progress,
    add_output_options,
    add_sink_options,
    add_text_file,
    add_threads,
    check_common,
    torch_dtype,
)

#: ``hf-sinks train --help``'s description: plain text (the module docstring is reST, for the API docs).
DESCRIPTION = """\
Sink-aware LoRA fine-tuning (SinkLoRA, LongLoRA or a dedicated sink token) on transformers' Trainer.

    hf-sinks train --recipe sink_token --seq-len 256 --max-steps 200 --output-dir smollm2-sink
    accelerate launch -m hf_sinks.cli train --recipe sinklora --seq-len 4096 --bf16 --output-dir out/

--model default is the embedded SmolLM2-135M-Instruct; a local HF model directory or a .gguf file also works.
The text defaults to hf_sinks' Shakespeare text (minus --held-out-tokens at its end). The adapter, recipe,
tokenizer and loss.csv go to --output-dir (default hf_sinks_finetune)."""


#: ``hf_sinks.training.RECIPES`` and ``KNOWN_ROPE_TYPES``, written out so that ``--help`` imports no torch (the
#: training package does); tests/cli/test_cli_help.py keeps them equal.
RECIPE_CHOICES = ("sinklora", "longlora", "sink_token")
ROPE_SCALING_CHOICES = ("linear", "yarn", "dynamic")


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` flags (HF-style names) to ``p``; shared by the CLI and ``examples/finetune_sinks.py``."""
    add_model(p, help="'default' (SmolLM2-135M GGUF), an HF model dir or a .gguf")
    p.add_argument("--recipe", default="sinklora", choices=RECIPE_CHOICES, help="PEFT recipe (default sinklora)")
    add_text_file(p, help="training text, UTF-8 (default: the Shakespeare text)")
    p.add_argument(
        "--held-out-tokens",
        type=int,
        default=0,
        help="leave the last N tokens of the text out of training (for a later evaluation)",
    )
    add_output_options(p, "hf_sinks_finetune", help="adapter, recipe, tokenizer, loss.csv/png", plot=False)
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--target-modules", default=None, help="comma-separated LoRA targets (default: per architecture)")
    p.add_argument("--no-train-embeddings", action="store_true", help="freeze embeddings (sink_token: the sink row)")
    p.add_argument("--no-train-norms", action="store_true", help="freeze the normalisation layers")
    p.add_argument("--learned-sink-logits", action="store_true", help="add and train per-head learned sink logits")
    p.add_argument(
        "--attn-implementation",
        default="auto",
        help="attention to train with (default auto: sink_sfattn / sink_s2attn when registered; "
        "none: keep the model's)",
    )
    add_sink_options(
        p,
        num_sink_tokens=None,
        window_length=1020,
        sink_help="sinks to stream with afterwards (recipe default)",
        window_help="window to stream with afterwards (default 1020)",
    )
    p.add_argument("--rope-scaling-type", default=None, choices=ROPE_SCALING_CHOICES, help="RoPE interpolation type")
    p.add_argument("--rope-scaling-factor", type=float, default=None, help="RoPE interpolation factor")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (default 512)")
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=20, help="learning-rate warm-up steps")
    p.add_argument("--lr-scheduler-type", default="constant_with_warmup", help="transformers' lr_scheduler_type")
    p.add_argument(
        "--per-device-train-batch-size",
        "--batch-size",
        dest="per_device_train_batch_size",
        type=int,
        default=1,
        help="sequences per batch and process",
    )
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--logging-steps", type=int, default=1, help="log the loss (loss.csv) every N steps")
    p.add_argument("--max-rows", type=int, default=None, help="use at most this many packed sequences")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation and the data order")
    add_dtype(p, help="weights dtype")
    add_threads(p, help="torch.set_num_threads (CPU)")
    add_no_progress(p, help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no loss.png")
    return p


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``train`` subcommand on ``subparsers`` (from ``parser.add_subparsers``); sets ``func=cmd_train``."""
    p = add_command(
        subparsers,
        "train",
        help="sink-aware LoRA fine-tuning (SinkLoRA / LongLoRA / a dedicated sink token)",
        description=DESCRIPTION,
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    return p


def rope_scaling_from_args(args: argparse.Namespace) -> dict | None:
    """``--rope-scaling-type/--rope-scaling-factor`` as a rope_scaling dict (``ValueError`` if only one is given)."""
    kind, factor = args.rope_scaling_type, args.rope_scaling_factor
    if kind is None and factor is None:
        return None
    if factor is None:
        raise ValueError(f"--rope-scaling-type {kind} needs --rope-scaling-factor.")
    return {"rope_type": kind or "linear", "factor": factor}


def check_train_args(args: argparse.Namespace) -> None:
    """Every ``hf-sinks train`` flag checked before the model loads (``ValueError``/``OSError`` naming the value)."""
    import math

    minimums = (
        ("--r", 1),
        ("--lora-alpha", 1),
        ("--seq-len", 3 if args.recipe == "sink_token" else 2),
        ("--max-steps", 1),
        ("--warmup-steps", 0),
        ("--per-device-train-batch-size", 1),
        ("--gradient-accumulation-steps", 1),
        ("--logging-steps", 1),
        ("--max-rows", 1),
        ("--held-out-tokens", 0),
        ("--num-sink-tokens", 0),
        ("--window-length", 1),
    )
    for flag, minimum in minimums:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:
            raise ValueError(f"{flag}={value} must be >= {minimum}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise ValueError(f"--learning-rate={args.learning_rate} must be a finite number > 0")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora-dropout={args.lora_dropout} must be in [0, 1)")
    rope_scaling = rope_scaling_from_args(args)
    if rope_scaling is not None:
        from ..training.rope_scaling import normalize_rope_scaling

        normalize_rope_scaling(rope_scaling)
    check_common(args)


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``hf-sinks train``: load, build the recipe, :func:`~hf_sinks.training.finetune`, print where it went."""
    import torch

    from ..default_model import load_model_and_tokenizer
    from ..training.data import split_token_ids, tokenize_text
    from ..training.finetune import finetune

    if (
        args.text_file is not None
        and str(args.text_file).lower() != "default"
        and not Path(args.text_file).expanduser().is_file()
    ):
        raise FileNotFoundError(f"text file {args.text_file!r} does not exist (omit --text-file for the default text)")
    check_train_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rope_scaling = rope_scaling_from_args(args)
    dtype = torch_dtype(args.dtype)
    print(f"loading model {args.model!r} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sdpa", dtype=dtype)
    ids = tokenize_text(tokenizer, Path(args.text_file) if args.text_file and args.text_file != "default" else None)
    if args.held_out_tokens:
        ids, _ = split_token_ids(ids, args.held_out_tokens)
    training_args = {}
    if args.bf16:
        training_args["bf16"] = True
    if args.gradient_checkpointing:
        training_args["gradient_checkpointing"] = True
    attn = args.attn_implementation
    t0 = time.perf_counter()
    result = finetune(
        model,
        tokenizer,
        args.recipe,
        ids,
        seq_len=args.seq_len,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        logging_steps=args.logging_steps,
        seed=args.seed,
        max_rows=args.max_rows,
        progress=not args.no_progress,
        plot=not args.no_plot,
        training_args=training_args,
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[t.strip() for t in args.target_modules.split(",") if t.strip()]
        if args.target_modules
        else None,
        train_embeddings=not args.no_train_embeddings,
        train_norms=not args.no_train_norms,
        learned_sink_logits=args.learned_sink_logits,
        rope_scaling=rope_scaling,
        attn_implementation=None if attn.lower() == "none" else attn,
        num_sink_tokens=args.num_sink_tokens,
        window_length=args.window_length,
    )
    losses = result.losses
    recipe = result.recipe
    print(
        f"trained {args.recipe} for {args.max_steps} steps in {time.perf_counter() - t0:.1f} s "
        f"(attention {recipe.attn_implementation or model.config._attn_implementation}); "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        if losses
        else "no loss logged"
    )
    print(f"saved to {result.output_dir}/ (adapter_model.safetensors, hf_sinks_recipe.json, tokenizer, loss.csv)")
    sinks = recipe.sink_config
    hint = f"; prepend {recipe.sink_token!r} (id {recipe.sink_token_id}) to every stream" if recipe.sink_token else ""
    print(
        f"stream it with {sinks.num_sink_tokens} sink token(s) + window {sinks.window_length}{hint}: "
        f"hf_sinks.training.load_finetuned(base_model, {str(result.output_dir)!r}) then hf_sinks.apply(model)"
    )
    return 0


add_parser = add_train_parser

__all__ = [
    "add_parser",
    "add_train_arguments",
    "add_train_parser",
    "check_train_args",
    "cmd_train",
    "rope_scaling_from_args",
]
