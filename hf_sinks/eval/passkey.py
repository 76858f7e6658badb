"""Passkey retrieval (LongLoRA / Landmark-attention style): can the model find a number hidden in filler text?

A prompt is an instruction, filler text ("The grass is green. The sky is blue. ...") repeated to the target length,
the sentence "The pass key is 12345. Remember it. 12345 is the pass key." inserted at a relative ``depth`` of the
filler (0 = right after the instruction, 1 = right before the question), and the question "What is the pass key?
The pass key is". The model reads it (chunked prefill) and greedily writes ``max_new_tokens`` tokens; a trial is
correct iff the first number in the answer equals the key.

Modes:

* ``"dense"``: a plain ``DynamicCache``; every token sees the whole prompt.
* ``"sink"``: a ``SinkCache(S, W)`` and the ``sink_*`` attention (StreamingLLM): the prompt is streamed in chunks
  by the visibility rule (docs/design.md §2.1): once the prompt is longer than ``S + W`` the key is *evicted* unless it
  lies in the last ``W`` tokens. StreamingLLM does not extend memory; this eval shows exactly that.
* ``"h2o"``: an :class:`~hf_sinks.h2o.H2OCache` ``(S, W, heavy_budget)`` and the ``h2o_sdpa`` attention: sinks,
  the last ``W`` tokens and the ``heavy_budget`` tokens with the most accumulated attention, per layer and KV head.
* ``"duo"``: a :class:`~hf_sinks.duo.DuoCache` ``(pattern, S, W)`` and the ``duo_sdpa`` attention (DuoAttention):
  the ``pattern``'s retrieval heads keep every token, its streaming heads sinks + window.

``"h2o"`` and ``"duo"`` switch the model to their attention for the duration (like ``"sink"``) and restore it.

Prompts are built from token ids (each piece tokenized once, pieces start with a space so that concatenation keeps
the tokenizer's usual word boundaries), so a prompt has exactly ``context_length`` tokens (or the fixed parts alone
if they are longer) and the key starts at a known token index.
"""

from __future__ import annotations

import random
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..compat import cache_kwargs
from ..validation import check_int, check_number
from .perplexity import make_cache, use_sink_attention

PASSKEY_MODES = ("dense", "sink", "h2o", "duo")
INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    """One prompt: ``input_ids`` ``[T]``, the ``key`` (digits), where the needle starts, and the actual depth."""

    input_ids: torch.Tensor
    key: str
    needle_start: int
    needle_length: int
    depth: float  # needle_start / len(input_ids)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_passkey_prompt(tokenizer: Any, context_length: int, depth: float, key: str | int) -> PasskeyPrompt:
    """A prompt of ``context_length`` tokens with the needle at relative ``depth`` of the filler.

    The tokenizer's own special prefix (e.g. a BOS) is kept. If the fixed parts (prefix, instruction, needle,
    question) alone are longer than ``context_length``, the prompt has no filler and is that long.
    """
    check_number("depth", depth, 0, 1)
    check_int("context_length", context_length, 1)
    key = str(key)
    if not key.isdigit():
        raise ValueError(f"key={key!r} must be a string of digits.")
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])  # BOS or nothing, as the tokenizer does
    head = prefix + _ids(tokenizer, INSTRUCTION)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    question = _ids(tokenizer, QUESTION)
    fill = max(0, context_length - len(head) - len(needle) - len(question))
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (fill // len(unit) + 1))[:fill]
    before = round(depth * fill)
    ids = head + filler[:before] + needle + filler[before:] + question
    start = len(head) + before
    return PasskeyPrompt(torch.tensor(ids, dtype=torch.long), key, start, len(needle), start / len(ids))


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (``None`` if there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def is_correct(answer: str, key: str) -> bool:
    """A trial is correct iff the first number the model wrote is exactly the key."""
    return first_number(answer) == str(key)


def random_key(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _passkey_cache(model, stack: ExitStack, mode, num_sink_tokens, window_length, heavy_budget, pattern):
    """The cache ``mode`` reads the prompt with; switches ``model`` to the mode's attention inside ``stack``."""
    if mode in ("dense", "sink"):
        if mode == "sink":
            stack.enter_context(use_sink_attention(model))
        return make_cache(model, mode, num_sink_tokens, window_length)
    from ..attention.switch import use_attention

    if mode == "h2o":
        from ..h2o import H2O_ATTENTION, H2OCache, register

        cache, attention = H2OCache(num_sink_tokens, window_length, heavy_budget), H2O_ATTENTION
    elif mode == "duo":
        from ..duo.attention import register
        from ..duo.cache import DUO_ATTENTION, DuoCache

        cache, attention = DuoCache(pattern, num_sink_tokens, window_length), DUO_ATTENTION
    else:
        raise ValueError(f"Unknown mode {mode!r}; allowed modes: {', '.join(PASSKEY_MODES)}.")
    register()
    stack.enter_context(use_attention(model, attention, route=True))
    return cache


@torch.no_grad()
def answer_passkey(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mode: str = "dense",
    num_sink_tokens: int = 4,
    window_length: int = 1020,
    chunk_size: int = 512,
    max_new_tokens: int = 8,
    *,
    heavy_budget: int | None = None,
    pattern: Any = None,
) -> list[int]:
    """Prefill ``input_ids`` ``[T]`` in chunks under ``mode`` and greedily decode ``max_new_tokens`` token ids.

    ``heavy_budget`` is the ``"h2o"`` mode's ``H``, ``pattern`` the ``"duo"`` mode's :class:`~hf_sinks.duo.HeadPattern`.
    """
    return _answer_passkey(
        model, input_ids, mode, num_sink_tokens, window_length, chunk_size, max_new_tokens, heavy_budget, pattern
    )[0]


@torch.no_grad()
def _answer_passkey(
    model, input_ids, mode, num_sink_tokens, window_length, chunk_size, max_new_tokens, heavy_budget=None, pattern=None
) -> tuple[list[int], int]:
    """:func:`answer_passkey` and the cache's bytes at the end of the prompt."""
    from .memory import cache_bytes

    device = next(model.parameters()).device
    ids = input_ids.to(device)[None]
    with ExitStack() as stack:
        cache = _passkey_cache(model, stack, mode, num_sink_tokens, window_length, heavy_budget, pattern)
        logits = None
        for begin in range(0, ids.shape[1], chunk_size):
            out = model(
                input_ids=ids[:, begin : begin + chunk_size], **cache_kwargs(cache), use_cache=True, logits_to_keep=1
            )
            logits = out.logits[:, -1]
        kv_bytes = cache_bytes(cache)
        answer: list[int] = []
        for _ in range(max_new_tokens):
            token = logits.argmax(-1)
            answer.append(int(token))
            if len(answer) == max_new_tokens:
                break
            logits = model(input_ids=token[:, None], **cache_kwargs(cache), use_cache=True).logits[:, -1]
    return answer, kv_bytes


def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    context_lengths: Sequence[int] = (512, 1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    trials: int = 2,
    mode: str = "dense",
    num_sink_tokens: int = 4,
    window_length: int = 1020,
    chunk_size: int = 512,
    max_new_tokens: int = 8,
    digits: int = 5,
    seed: int = 0,
    progress: bool = True,
    prefix_ids: Sequence[int] | None = None,
    heavy_budget: int | None = None,
    pattern: Any = None,
) -> list[dict]:
    """Passkey retrieval accuracy of ``model`` for every ``(context_length, depth)``.

    The keys depend only on ``seed``, the length, the depth and the trial, so every mode sees the same prompts.

    Args:
        prefix_ids: token ids put in front of every prompt (e.g. a trained sink token, see
            :func:`hf_sinks.training.prepend_sink_token`). They do **not** count toward ``context_length``: the model
            receives ``prefix_ids`` + the same ``context_length``-token prompt (same keys, same text) as without them.
            In ``"sink"`` mode they are the first cached tokens, so with ``num_sink_tokens >= len(prefix_ids)`` they
            are (among) the sinks.
        mode: ``"dense"``, ``"sink"`` (``SinkCache(num_sink_tokens, window_length)``), ``"h2o"``
            (``H2OCache(num_sink_tokens, window_length, heavy_budget)``) or ``"duo"``
            (``DuoCache(pattern, num_sink_tokens, window_length)``); see the module docstring.
        heavy_budget: the ``"h2o"`` mode's heavy hitters per layer and KV head (required there, refused elsewhere).
        pattern: the ``"duo"`` mode's :class:`~hf_sinks.duo.HeadPattern` (required there, refused elsewhere).

    Returns:
        one row per ``(context_length, depth)``: ``mode, label, context_length, prompt_tokens`` (what the model
        received: ``len(prefix_ids)`` + the prompt), ``depth, needle_depth`` (actual, in what the model received, mean
        over trials), ``trials, correct, accuracy, num_sink_tokens, window_length`` (``None`` for ``"dense"``),
        ``heavy_budget`` (``None`` but for ``"h2o"``), ``kv_bytes`` (the cache's bytes at the end of the prompt,
        :func:`hf_sinks.eval.memory.cache_bytes`, max over trials) and ``answers`` (the decoded answers,
        ``" | "``-joined).

    Raises:
        ValueError: unknown mode, bad sizes, no lengths/depths, ``trials < 1``, ``digits < 1``, ``"h2o"`` without
            ``heavy_budget`` or ``"duo"`` without ``pattern`` (or either given to another mode), a pattern that does
            not fit the model.
    """
    if mode not in PASSKEY_MODES:
        raise ValueError(f"Unknown mode {mode!r}; allowed modes: {', '.join(PASSKEY_MODES)}.")
    for name, value, minimum in (
        ("trials", trials, 1),
        ("chunk_size", chunk_size, 1),
        ("max_new_tokens", max_new_tokens, 1),
        ("digits", digits, 1),
        ("num_sink_tokens", num_sink_tokens, 0),
        ("window_length", window_length, 1),
    ):
        check_int(name, value, minimum)
    if not context_lengths or not depths:
        raise ValueError(f"context_lengths={list(context_lengths)!r} and depths={list(depths)!r} must not be empty.")
    _check_cache_arguments(model, mode, heavy_budget, pattern)

    from tqdm.auto import tqdm

    prefix = torch.tensor([int(i) for i in (prefix_ids or ())], dtype=torch.long)
    sinks, window = (None, None) if mode == "dense" else (num_sink_tokens, window_length)
    label = _label(mode, num_sink_tokens, window_length, heavy_budget, pattern)
    bar = tqdm(
        total=len(context_lengths) * len(depths) * trials, desc=f"passkey {label}", disable=not progress, leave=False
    )
    rows = []
    for length in context_lengths:
        for depth in depths:
            correct, answers, tokens, needle_depths, kv_bytes = 0, [], [], [], 0
            for trial in range(trials):
                key = random_key(random.Random(f"{seed}-{length}-{depth}-{trial}"), digits)
                prompt = make_passkey_prompt(tokenizer, length, depth, key)
                input_ids = torch.cat([prefix, prompt.input_ids])
                ids, kv = _answer_passkey(
                    model,
                    input_ids,
                    mode,
                    num_sink_tokens,
                    window_length,
                    chunk_size,
                    max_new_tokens,
                    heavy_budget,
                    pattern,
                )
                kv_bytes = max(kv_bytes, kv)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                correct += is_correct(text, key)
                answers.append(f"{key}->{text.strip()!r}")
                tokens.append(len(input_ids))
                needle_depths.append((len(prefix) + prompt.needle_start) / len(input_ids))
                bar.update(1)
            rows.append(
                {
                    "mode": mode,
                    "label": label,
                    "context_length": length,
                    "prompt_tokens": round(sum(tokens) / trials),
                    "depth": depth,
                    "needle_depth": round(sum(needle_depths) / trials, 4),
                    "trials": trials,
                    "correct": correct,
                    "accuracy": correct / trials,
                    "num_sink_tokens": sinks,
                    "window_length": window,
                    "heavy_budget": heavy_budget,
                    "kv_bytes": kv_bytes,
                    "answers": " | ".join(answers),
                }
            )
    bar.close()
    return rows


def _check_cache_arguments(model, mode: str, heavy_budget: Any, pattern: Any) -> None:
    """``heavy_budget`` belongs to ``"h2o"`` and ``pattern`` to ``"duo"``: required there, refused elsewhere."""
    if mode == "h2o":
        if isinstance(heavy_budget, bool) or not isinstance(heavy_budget, int) or heavy_budget < 0:
            raise ValueError(f"mode 'h2o' needs heavy_budget, an integer >= 0 (got {heavy_budget!r}).")
    elif heavy_budget is not None:
        raise ValueError(f"heavy_budget={heavy_budget!r} is only used by mode 'h2o' (mode is {mode!r}).")
    if mode == "duo":
        from ..duo.pattern import HeadPattern

        if not isinstance(pattern, HeadPattern):
            raise ValueError(
                f"mode 'duo' needs pattern, a HeadPattern (got {type(pattern).__name__}); "
                "e.g. HeadPattern.load('docs/benchmarks/duo_attention_smollm2/pattern_passkey.json')."
            )
        pattern.validate(model.config)
    elif pattern is not None:
        raise ValueError(f"pattern is only used by mode 'duo' (mode is {mode!r}).")


def _label(mode: str, num_sink_tokens: int, window_length: int, heavy_budget: Any, pattern: Any) -> str:
    if mode == "dense":
        return "dense"
    if mode == "h2o":
        return f"h2o {num_sink_tokens}+{window_length}+{heavy_budget}"
    if mode == "duo":
        return f"duo {pattern.streaming_fraction:.0%} streaming {num_sink_tokens}+{window_length}"
    return f"sink {num_sink_tokens}+{window_length}"


def plot_passkey(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy (mean over depths and trials) vs context length, one line per mode/label (log-2 x axis)."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        sel = [r for r in rows if r["label"] == label]
        lengths = sorted({r["context_length"] for r in sel})
        acc = []
        for n in lengths:
            at = [r for r in sel if r["context_length"] == n]
            acc.append(100 * sum(r["correct"] for r in at) / sum(r["trials"] for r in at))
        style = {"color": "black", "zorder": 5} if label == "dense" else {}
        ax.plot(lengths, acc, marker="o", label=label, linewidth=1.3, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy (%, all depths)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


__all__ = [
    "PASSKEY_MODES",
    "PasskeyPrompt",
    "answer_passkey",
    "first_number",
    "is_correct",
    "make_passkey_prompt",
    "passkey_accuracy",
    "plot_passkey",
]
