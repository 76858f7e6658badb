#!/usr/bin/env python
"""Sink-aware LoRA fine-tuning with transformers' Trainer, then streaming with the result (hf_sinks).

Recipes (``--recipe``): ``sinklora`` (LoRA + embeddings + norms, trained with SF-Attn when ``sink_sfattn`` is
registered; streams with 4 sinks), ``longlora`` (same with S²-Attn), ``sink_token`` (LoRA + one new ``<|sink|>``
embedding row, every training sequence starts with it; streams with that single sink).

Single process (CPU or one GPU)::

    python examples/finetune_sinks.py --recipe sink_token --seq-len 256 --max-steps 200 --output-dir smollm2-sink
    python examples/finetune_sinks.py --model path/to/hf_model --text-file book.txt --recipe sinklora --seq-len 8192 \\
        --bf16 --gradient-checkpointing --learning-rate 2e-5 --max-steps 1000

The same script runs unchanged on several GPUs; everything distributed is configured by accelerate (the configs in
``examples/accelerate_configs/``) and handled by ``Trainer``::

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/finetune_sinks.py \\
        --model path/to/hf_model --recipe sinklora --seq-len 8192 --bf16 --gradient-checkpointing
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/finetune_sinks.py ...
    accelerate launch --config_file examples/accelerate_configs/fsdp.yaml examples/finetune_sinks.py ...

On CPU (gloo) the same script runs data-parallel with ``torchrun`` or with the multi-CPU accelerate config (not
``accelerate launch --cpu --num_processes 2``, which starts ONE process)::

    torchrun --nproc_per_node 2 examples/finetune_sinks.py --recipe sink_token --expect-world-size 2 ...
    accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml examples/finetune_sinks.py \
        --expect-world-size 2 ...

``--expect-world-size N`` (default: the launcher's ``WORLD_SIZE``, else 1) stops with an error before training
when the processes that train together are not ``N``. See docs/scaling_out.md.

Each process reads the whole text and ``Trainer`` shards the packed rows; the adapter (LoRA + embeddings/norms +
sink row/logits) is saved once, by the main process, after gathering sharded weights. With ``--demo-tokens N`` the
main process then reloads the adapter onto a fresh base model, merges it and streams ``N`` tokens with a SinkCache.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    from hf_sinks.cli.train import add_train_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.add_argument(
        "--demo-tokens", type=int, default=64, help="after training, stream this many tokens (0: no demo)"
    )
    parser.add_argument("--demo-prompt", default="ACT I. SCENE I.", help="prompt of the streaming demo")
    parser.add_argument(
        "--expect-world-size",
        type=int,
        default=None,
        help="number of training processes the launch must give (default: $WORLD_SIZE, else 1); "
        "an error before training otherwise",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import set_seed

    from hf_sinks.cli.train import rope_scaling_from_args
    from hf_sinks.default_model import load_model_and_tokenizer
    from hf_sinks.training import DistributedSetupError, finetune, lora_recipe, tokenize_text
    from hf_sinks.training.data import split_token_ids

    expected_world_size = args.expect_world_size or int(os.environ.get("WORLD_SIZE", "1"))
    set_seed(args.seed)  # the LoRA initialisation too: the same on every process and in a 1-process run
    # 1. a model and its tokenizer (loaded with a stock attention; the recipe picks the training attention)
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sdpa")

    # 2. the recipe: LoRA config, modules_to_save / trainable_token_indices, attention, streaming setup
    recipe = lora_recipe(
        model,
        args.recipe,
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules.split(",") if args.target_modules else None,
        train_embeddings=not args.no_train_embeddings,
        train_norms=not args.no_train_norms,
        learned_sink_logits=args.learned_sink_logits,
        rope_scaling=rope_scaling_from_args(args),
        attn_implementation=None if args.attn_implementation.lower() == "none" else args.attn_implementation,
        num_sink_tokens=args.num_sink_tokens,
        window_length=args.window_length,
        tokenizer=tokenizer,
    )

    # 3. packed text -> Trainer (DDP / FSDP / DeepSpeed come from `accelerate launch`)
    ids = tokenize_text(tokenizer, args.text_file)
    if args.held_out_tokens:
        ids, _ = split_token_ids(ids, args.held_out_tokens)
    training_args = {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}
    try:
        result = finetune(
            model,
            tokenizer,
            recipe,
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
            expected_world_size=expected_world_size,
        )
    except DistributedSetupError as e:
        print(f"finetune_sinks.py: error: {e}", file=sys.stderr)
        from accelerate import PartialState

        PartialState().destroy_process_group()
        return 2
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    state = PartialState()
    engine = AcceleratorState().distributed_type.value  # set up by Trainer: FSDP / DEEPSPEED show here, not in `state`
    sharded = sum(type(p).__name__ == "DTensor" for p in result.model.parameters())
    print(
        f"rank {state.process_index} of {state.num_processes} ({engine}, backend {state.backend}): "
        f"{len(result.losses)} logged steps; {sharded} sharded (DTensor) parameter tensors",
        flush=True,
    )
    if state.is_main_process:
        losses = result.losses
        if losses:
            print(
                f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} logged steps; "
                f"saved to {result.output_dir}/"
            )
        summary = next((row for row in reversed(result.log_history) if "train_runtime" in row), None)
        if summary is not None:  # Trainer's own timing of the training loop (all processes, one global step each)
            print(
                f"train_runtime {summary['train_runtime']:.3f} s; {summary['train_steps_per_second']:.4f} steps/s; "
                f"{summary['train_samples_per_second']:.4f} samples/s",
                flush=True,
            )
        if args.demo_tokens > 0:
            stream_demo(args, tokenizer, recipe.sink_token_id)
    # every rank leaves together and closes its process group (no rank tears gloo down under another one)
    state.wait_for_everyone()
    state.destroy_process_group()
    return 0


def stream_demo(args: argparse.Namespace, tokenizer, sink_token_id: int | None) -> None:
    """4. Reload the adapter onto a fresh base, merge, stream ``--demo-tokens`` tokens with hf_sinks (sinks from
    ``config.attention_sinks``, written by the recipe)."""
    import hf_sinks
    from hf_sinks.default_model import load_model_and_tokenizer
    from hf_sinks.training import load_finetuned, prepend_sink_token

    base, _ = load_model_and_tokenizer(args.model, attn_implementation="sdpa")
    tuned = load_finetuned(base, args.output_dir, merge=True)
    handle = hf_sinks.apply(tuned)
    prompt = tokenizer(args.demo_prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if sink_token_id is not None:
        prompt = prepend_sink_token(prompt, sink_token_id)
    out = tuned.generate(
        prompt,
        max_new_tokens=args.demo_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0,
    )
    sinks = handle.sink_config
    print(f"--- streaming with {sinks.num_sink_tokens} sink(s) + window {sinks.window_length} ---")
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    from hf_sinks.launch import exit_process

    exit_process(main())
