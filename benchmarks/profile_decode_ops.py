#!/usr/bin/env python
"""Count the aten ops of one single-token decode step: SinkCache + sink_sdpa vs DynamicCache + sdpa.

A tiny random Llama (4 layers, hidden 64, 4 heads, 2 KV heads), fp32 CPU, both caches full at the same resident size
(the sink cache past capacity, evicting). ``top-level`` counts the aten ops called from Python (an op called inside
another aten op is not counted again); the difference divided by the layer count is the per-layer bookkeeping of
the sink cache (docs/design.md §4.1)::

    python benchmarks/profile_decode_ops.py                 # prints the counts and the most frequent ops
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_sinks  # noqa: E402
from hf_sinks.compat import cache_kwargs  # noqa: E402


def tiny_llama(attn: str, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def count_ops(model, cache, ids) -> tuple[int, collections.Counter]:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    top = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top[event.name] += 1
    return sum(top.values()), top


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--resident", type=int, default=64)
    p.add_argument("--top", type=int, default=25, help="most frequent ops to list")
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(1, 128, (1, n), generator=gen)  # noqa: E731

    sink_model, dense_model = tiny_llama("sink_sdpa", args.layers), tiny_llama("sdpa", args.layers)
    sink = hf_sinks.SinkCache(4, args.resident - 4, config=sink_model.config)
    dense = DynamicCache(config=dense_model.config)
    with torch.inference_mode():
        sink_model(input_ids=ids(args.resident + 10), **cache_kwargs(sink), use_cache=True)
        dense_model(input_ids=ids(args.resident), **cache_kwargs(dense), use_cache=True)
        for _ in range(3):  # warm: steady state of both
            sink_model(input_ids=ids(1), **cache_kwargs(sink), use_cache=True)
            dense_model(input_ids=ids(1), **cache_kwargs(dense), use_cache=True)
            dense.crop(-1)
    n_sink, top_sink = count_ops(sink_model, sink, ids(1))
    n_dense, top_dense = count_ops(dense_model, dense, ids(1))
    print(f"top-level aten ops, one decode step, {args.layers} layers, resident {args.resident}:")
    print(f"  SinkCache + sink_sdpa: {n_sink}")
    print(f"  DynamicCache + sdpa:   {n_dense}")
    print(f"  extra per layer:       {(n_sink - n_dense) / args.layers:.1f}")
    extra = top_sink - top_dense
    print(f"\nops the sink step calls more often (count difference, {args.top} most frequent):")
    for name, n in extra.most_common(args.top):
        print(f"  {n:4d}  {name}")


if __name__ == "__main__":
    main()
