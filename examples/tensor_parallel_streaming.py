#!/usr/bin/env python
"""Tensor-parallel streaming: transformers' ``tp_plan="auto"`` + ``hf_sinks.apply``, one SinkCache shard per rank.

Under ``torchrun`` every rank loads the model with ``tp_plan="auto"`` (attention heads split over the ranks,
column-parallel q/k/v, row-parallel o), switches it to streaming with ``hf_sinks.apply`` and generates greedily past
the cache capacity. Each rank's SinkCache holds only the key/value heads of its shard; the logits (gathered by the
model's output layer) are the same on every rank. Without ``torchrun`` the script runs the same stream in one
process, the reference::

    torchrun --nproc_per_node 2 examples/tensor_parallel_streaming.py --model path/to/llama --output tp.pt
    python examples/tensor_parallel_streaming.py --model path/to/llama --output single.pt

On CPU the ranks talk over gloo (``torch.distributed`` picks it when there is no GPU); on GPUs over NCCL, one GPU
per rank. ``--output`` (written by rank 0) holds the generated ids, the per-step logits, and per rank the shape of
every cache layer's keys, so two runs can be compared (tests/training/test_distributed.py does).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF model directory (a model with a tp_plan, e.g. Llama)")
    p.add_argument("--num-sink-tokens", type=int, default=4)
    p.add_argument("--window-length", type=int, default=60)
    p.add_argument("--prompt-ids", default=None, help="comma-separated prompt token ids (default: 1..prompt-length)")
    p.add_argument("--prompt-length", type=int, default=16, help="length of the default prompt")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens to stream (past capacity by default)")
    p.add_argument(
        "--expect-world-size",
        type=int,
        default=None,
        help="ranks the launch must give (default: $WORLD_SIZE, else 1); an error otherwise",
    )
    p.add_argument("--output", default=None, help="torch.save the stream (ids, logits, cache shapes) here (rank 0)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    return p


def tensor_parallel_kwargs() -> dict:
    """``from_pretrained`` keywords for ``tp_plan="auto"``: ``distributed_config=DistributedConfig(tp_plan="auto")``
    where this transformers has it (newer 5.x; the bare ``tp_plan=`` keyword is deprecated there), else ``tp_plan``."""
    import inspect

    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    if "tp_plan" in inspect.signature(DistributedConfig).parameters:
        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    return {"tp_plan": "auto"}


def load(model: str, tensor_parallel: bool):
    """The model in float32 eval mode: sharded with ``tp_plan="auto"`` or whole."""
    from transformers import AutoModelForCausalLM

    kwargs = tensor_parallel_kwargs() if tensor_parallel else {}
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, local_files_only=True, **kwargs).eval()


def cache_key_shapes(cache) -> list[tuple[int, ...]]:
    """``[batch, kv_heads, slots, head_dim]`` of every layer of a (Sink)Cache."""
    return [tuple(layer.keys.shape) for layer in cache.layers]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch.distributed as dist

    import hf_sinks
    from hf_sinks.compat import output_cache

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    expected = args.expect_world_size or launched
    if launched != expected:
        print(
            f"tensor_parallel_streaming.py: error: expected {expected} ranks, the launcher started {launched} "
            "(use torchrun --nproc_per_node N)",
            file=sys.stderr,
        )
        return 2
    model = load(args.model, tensor_parallel=launched > 1)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if world != expected:
        print(f"tensor_parallel_streaming.py: error: expected a world of {expected}, got {world}", file=sys.stderr)
        return 2
    hf_sinks.apply(model, num_sink_tokens=args.num_sink_tokens, window_length=args.window_length)

    if args.prompt_ids:
        prompt = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])
    else:
        prompt = torch.arange(1, args.prompt_length + 1)[None] % model.config.vocab_size
    prompt = prompt.to(model.device)
    # no cache passed: hf_sinks.apply's generate makes the SinkCache (one per rank, holding that rank's heads)
    out = model.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=model.config.pad_token_id or 0,
    )
    cache = output_cache(out)
    shapes = cache_key_shapes(cache)
    all_shapes: list = [None] * world
    if world > 1:
        dist.all_gather_object(all_shapes, shapes)
    else:
        all_shapes = [shapes]
    capacity = args.num_sink_tokens + args.window_length
    seen = out.sequences.shape[1] - 1  # the last token is generated, never fed
    print(
        f"rank {rank} of {world}: {type(cache).__name__} keys per layer {shapes} "
        f"(kv heads here {shapes[0][1]} of {model.config.num_key_value_heads}); streamed {seen} tokens "
        f"through {capacity} slots",
        flush=True,
    )
    if rank == 0 and args.output:
        torch.save(
            {
                "world_size": world,
                "sequences": out.sequences.cpu(),
                "logits": torch.stack([step.float().cpu() for step in out.logits], 1),
                "cache_key_shapes": all_shapes,
                "cache_type": type(cache).__name__,
                "capacity": capacity,
                "num_key_value_heads": model.config.num_key_value_heads,
            },
            args.output,
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from hf_sinks.launch import exit_process

    exit_process(main())
