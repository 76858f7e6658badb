"""``hf-sinks generate`` and ``hf-sinks chat``: streaming generation with one ``SinkCache`` (one-shot or interactive).

::

    hf-sinks generate --prompt "Tell me a long story." --max-new-tokens 5000 --ignore-eos --window-length 252
    hf-sinks chat --window-length 1020          # every turn continues the same cache
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from .options import (
    CLIError,
    add_command,
    add_model_options,
    add_no_progress,
    add_sink_options,
    check_common,
    load_model,
    setup_torch,
)


def add_parser(subparsers: Any) -> list[argparse.ArgumentParser]:
    """Add ``generate`` and its alias ``chat`` to ``hf-sinks``'s subparsers (``func=cmd_generate``)."""
    parsers = []
    for name, help_text in (
        ("generate", "stream generation with a SinkCache (one-shot --prompt, else interactive)"),
        ("chat", "alias of generate: interactive multi-turn chat reusing one SinkCache"),
    ):
        p = add_command(subparsers, name, help=help_text)
        add_model_options(p)
        add_sink_options(p, window_length=1020)
        add_no_progress(p)
        p.add_argument("--prompt", default=None, help="one-shot prompt; without it, read turns from stdin")
        p.add_argument("--system", default=None, help="system message (chat template only)")
        p.add_argument("--max-new-tokens", type=int, default=256, help="per turn (default 256)")
        p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (endless streaming)")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
        p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (with --temperature > 0)")
        p.add_argument("--seed", type=int, default=None, help="sampling seed (default: not set)")
        p.add_argument(
            "--no-chat-template", action="store_true", help="feed raw text even if the tokenizer has a template"
        )
        p.add_argument(
            "--compile",
            action="store_true",
            help="compile the decode step (StaticSinkCache + torch.compile through generate; also on CPU)",
        )
        p.set_defaults(func=cmd_generate)
        parsers.append(p)
    return parsers


def cmd_generate(args: argparse.Namespace) -> int:
    """Run ``hf-sinks generate``/``chat``: one ``SinkCache`` for a ``--prompt`` or every turn read from stdin."""
    import torch
    from transformers import TextStreamer

    import hf_sinks
    from hf_sinks.compat import cache_kwargs

    if args.window_length < 1:
        raise CLIError(f"--window-length={args.window_length} must be >= 1")
    if args.num_sink_tokens < 0:
        raise CLIError(f"--num-sink-tokens={args.num_sink_tokens} must be >= 0")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CLIError(f"--temperature={args.temperature} must be a finite number >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p={args.top_p} must be in (0, 1]")
    check_common(args)
    setup_torch(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_model(args)
    handle = hf_sinks.apply(
        model,
        num_sink_tokens=args.num_sink_tokens,
        window_length=args.window_length,
        attn_implementation=model.config._attn_implementation
        if str(model.config._attn_implementation).startswith("sink_")
        else "sink_sdpa",
    )
    device = next(model.parameters()).device
    compile_kwargs = {}
    if args.compile:  # a fixed-shape cache whose decode step generate compiles (fullgraph; CUDA graphs on CUDA)
        from hf_sinks.compat import generate_compile_config

        try:
            compile_kwargs = {"compile_config": generate_compile_config(device)}
        except RuntimeError as e:
            raise CLIError(str(e)) from None
        cache = hf_sinks.StaticSinkCache.from_model(model)
        print("--compile: the first decode step compiles the model (tens of seconds to minutes)", file=sys.stderr)
    else:
        cache = hf_sinks.SinkCache.from_model(model)
    history = torch.zeros(1, 0, dtype=torch.long, device=device)  # every token the cache has seen (ids only)
    use_template = not args.no_chat_template and bool(getattr(tokenizer, "chat_template", None))
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})

    eos = tokenizer.eos_token_id

    def turn(user_text: str) -> None:
        nonlocal history
        new_ids = _turn_ids(tokenizer, messages, user_text, use_template, history.shape[1] == 0).to(device)
        if use_template and history.shape[1] and eos is not None and int(history[0, -1]) != eos:
            new_ids = torch.cat([new_ids.new_tensor([[eos]]), new_ids], dim=1)  # close a reply cut by --max-new-tokens
        history = torch.cat([history, new_ids], dim=1)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        gen_kwargs = dict(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            streamer=streamer,
            **cache_kwargs(cache),
            attention_mask=torch.ones_like(history),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        if args.temperature > 0:
            gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
        if args.ignore_eos:
            gen_kwargs.update(min_new_tokens=args.max_new_tokens)
        gen_kwargs.update(compile_kwargs)
        t0 = time.perf_counter()
        out = model.generate(history, **gen_kwargs)
        elapsed = time.perf_counter() - t0
        produced = out.shape[1] - history.shape[1]
        reply = tokenizer.decode(out[0, history.shape[1] :], skip_special_tokens=True)
        history = out
        messages.extend([{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}])
        print(
            f"\n[{produced} new tokens in {elapsed:.1f} s, "
            f"{produced / elapsed:.1f} tokens/s (prompt included in time); "
            f"cache: seen {int(cache.get_seq_length())} tokens, resident {cache.get_stored_length()} "
            f"(capacity {cache.capacity} = {cache.num_sink_tokens} sinks + {cache.window_length} window)]",
            file=sys.stderr,
            flush=True,
        )

    try:
        if args.prompt is not None:
            turn(args.prompt)
            return 0
        print("hf-sinks chat: one SinkCache for the whole session; empty line or Ctrl-D to quit.", file=sys.stderr)
        while True:
            if sys.stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or not line.strip():
                break
            turn(line.rstrip("\n"))
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    finally:
        handle.remove()
    return 0


def _turn_ids(tokenizer: Any, messages: list[dict], user_text: str, use_template: bool, first: bool) -> Any:
    """Token ids to append for a new user turn (the template's rendering of just that turn when there is one)."""
    import torch

    if not use_template:
        text = user_text if first else "\n" + user_text
        return tokenizer(text, add_special_tokens=first, return_tensors="pt").input_ids
    before = tokenizer.apply_chat_template(messages, tokenize=False) if messages else ""
    after = tokenizer.apply_chat_template(
        messages + [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    if not first and after.startswith(before):
        delta = after[len(before) :]
    elif first:
        delta = after
    else:  # the template re-renders history differently: fall back to rendering the new turn alone
        delta = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    if not first and not delta.startswith("\n"):
        delta = "\n" + delta  # the reply ended at the end-of-turn token; templates put a newline after it
    ids = tokenizer(delta, add_special_tokens=False, return_tensors="pt").input_ids
    return ids if ids.numel() else torch.tensor([[tokenizer.eos_token_id]])


__all__ = ["add_parser", "cmd_generate"]
