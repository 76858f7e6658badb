"""Head identification: DuoAttention §3.2 gate optimisation on synthetic passkey data, and a no-training heuristic."""

from __future__ import annotations

import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..validation import check_int
from .attention import gated_attention, register
from .cache import visibility_mask
from .pattern import HeadPattern, _kv_shape

#: Filler sentences of the synthetic passkey haystack (text mode).
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class PasskeyExample:
    """One synthetic example: ``input_ids`` ``[T]`` and ``answer_mask`` ``[T]`` (True on the answer span)."""

    input_ids: torch.Tensor
    answer_mask: torch.Tensor


def make_passkey_example(
    context_length: int,
    rng: random.Random,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    key_length: int = 8,
) -> PasskeyExample:
    """A haystack of ``~context_length`` tokens with a key at a random depth in [5 %, 95 %], asked for at the end.

    With a ``tokenizer``: English filler, a 5-digit-group key (``key_length`` digits), the question
    "What is the pass key? The pass key is" and the key as the answer. Without one (tiny random models): random
    filler tokens, ``key_length`` random key tokens fenced by a marker token (id 1), and the marker + key again at the
    end as the answer. Only the answer span is marked (DuoAttention distils on answer tokens).
    """
    check_int("context_length", context_length, 4)
    check_int("key_length", key_length, 1)
    if tokenizer is not None:

        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        key = "".join(rng.choice("0123456789") for _ in range(key_length))
        needle = ids(f" The pass key is {key}. Remember it. {key} is the pass key.")
        question = ids(" What is the pass key? The pass key is")
        answer = ids(f" {key}.")
        unit = ids(FILLER)
        fill = max(0, context_length - len(needle) - len(question) - len(answer))
        filler = (unit * (fill // len(unit) + 1))[:fill]
    else:
        if vocab_size is None or vocab_size < 4:
            raise ValueError(f"vocab_size={vocab_size!r}: give a tokenizer or vocab_size >= 4 (token-level examples).")
        key = [rng.randrange(2, vocab_size) for _ in range(key_length)]
        needle, question, answer = [1] + key + [1], [1], key
        fill = max(0, context_length - len(needle) - len(question) - len(answer))
        filler = [rng.randrange(2, vocab_size) for _ in range(fill)]
    before = round(rng.uniform(0.05, 0.95) * len(filler))
    tokens = filler[:before] + needle + filler[before:] + question + answer
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    mask[len(tokens) - len(answer) :] = True
    return PasskeyExample(torch.tensor(tokens, dtype=torch.long), mask)


def _lr_multiplier(step: int, total: int) -> float:
    """DuoAttention's schedule: linear warm-up over the first 20 %, flat, linear decay over the last 20 %, floor 0.1."""
    edge = max(1, int(0.2 * total))
    if step < edge:
        return max(0.1, (step + 1) / edge)
    if step >= total - edge:
        return max(0.1, (total - step) / edge)
    return 1.0


def _final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Post-norm final hidden states of the decoder (``model.base_model``'s ``last_hidden_state``)."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


@dataclass
class IdentificationResult:
    """What :func:`identify_heads` returns: the pattern (scores = the trained gates) and the loss history."""

    pattern: HeadPattern
    alpha: torch.Tensor
    history: list[dict]


def identify_heads(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    num_steps: int = 2000,
    lr: float = 0.02,
    reg_weight: float = 0.05,
    num_sink_tokens: int = 128,
    window_length: int = 256,
    context_length: int | tuple[int, int] = 2048,
    sparsity: float = 0.5,
    initial_value: float = 1.0,
    key_length: int = 8,
    seed: int = 0,
    examples: Iterator[PasskeyExample] | None = None,
    accelerator: Any = None,
    progress: bool = True,
) -> IdentificationResult:
    """Find retrieval heads by optimisation (DuoAttention §3.2), with plain torch + ``accelerate``.

    One gate ``alpha[layer, kv_head]`` in [0, 1] mixes full and streaming (``S`` sinks + ``W`` window) attention
    outputs in the ``duo_gate`` attention; the model's weights are frozen. Each step runs the full-attention model
    (teacher, no grad) and the gated one on a synthetic passkey example and minimises
    ``mean((h_gated - h_full)^2 over the answer span) + reg_weight * mean(|alpha|)`` (``h``: post-norm final hidden
    states). AdamW, no weight decay, DuoAttention's warm-up/decay schedule; ``alpha`` is clamped to [0, 1] after
    every step. Under ``accelerate launch`` every process draws its own examples and the gate gradients are averaged.

    Args:
        model: a causal LM routed through ``AttentionInterface`` (its ``_attn_implementation`` is restored after).
        tokenizer: builds English passkey prompts; without it, token-level examples from ``model.config.vocab_size``.
        num_steps, lr, reg_weight: optimisation (DuoAttention: 2000, 0.02, 0.05).
        num_sink_tokens, window_length: the streaming attention trained against (DuoAttention: 128, 256).
        context_length: tokens per example, or ``(min, max)`` to draw uniformly.
        sparsity: fraction of streaming heads in the returned pattern (see :meth:`HeadPattern.from_scores`).
        initial_value: initial ``alpha`` (DuoAttention: 1.0).
        examples: optional iterator of :class:`PasskeyExample` replacing the built-in generator.
        accelerator: an ``accelerate.Accelerator`` (one is created if ``None``).

    Returns:
        an :class:`IdentificationResult`; ``.pattern.scores`` is ``alpha``.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..attention.switch import routed_through_interface, use_attention

    check_int("num_steps", num_steps, 1)
    check_int("num_sink_tokens", num_sink_tokens, 0)
    check_int("window_length", window_length, 1)
    if not 0 <= initial_value <= 1:
        raise ValueError(f"initial_value={initial_value!r} must be in [0, 1].")
    if reg_weight < 0 or lr <= 0:
        raise ValueError(f"reg_weight={reg_weight!r} must be >= 0 and lr={lr!r} > 0.")
    lengths = (context_length, context_length) if isinstance(context_length, int) else tuple(context_length)
    register()
    accelerator = accelerator or Accelerator()
    device = accelerator.device
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)  # only the gates train (restored afterwards)
    model.to(device)
    was_training = model.training
    model.eval()
    layers, kv_heads = _kv_shape(model.config)
    alpha = torch.nn.Parameter(torch.full((layers, kv_heads), float(initial_value), device=device))
    optimizer = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_multiplier(step, num_steps))
    rng = random.Random(seed + accelerator.process_index)  # every process its own examples
    vocab = model.config.get_text_config(decoder=True).vocab_size

    def draw() -> PasskeyExample:
        if examples is not None:
            return next(examples)
        return make_passkey_example(rng.randint(*lengths), rng, tokenizer, vocab, key_length)

    history = []
    bar = tqdm(
        range(num_steps), desc="duo heads", disable=not (progress and accelerator.is_local_main_process), leave=False
    )
    start = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(routed_through_interface(model))
        for step in bar:
            example = draw()
            ids = example.input_ids.to(device)[None]
            mask = example.answer_mask.to(device)
            with torch.no_grad(), use_attention(model, "sdpa"):
                teacher = _final_hidden(model, ids)[0, mask]
            with gated_attention(model, alpha, num_sink_tokens, window_length):
                student = _final_hidden(model, ids)[0, mask]
            distill = (student.float() - teacher.float()).pow(2).mean(-1).mean()
            reg = alpha.abs().mean()
            loss = distill + reg_weight * reg
            distill, reg = distill.detach(), reg.detach()
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if accelerator.num_processes > 1:  # alpha is not wrapped in DDP: average its gradient by hand
                alpha.grad = accelerator.reduce(alpha.grad, reduction="mean")
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            record = {
                "step": step,
                "loss": loss.item(),
                "distill": distill.item(),
                "reg": reg.item(),
                "tokens": ids.shape[1],
            }
            history.append(record)
            bar.set_postfix(distill=f"{record['distill']:.3g}", alpha=f"{record['reg']:.3f}", refresh=False)
    bar.close()
    model.train(was_training)
    for p in trainable:
        p.requires_grad_(True)
    scores = alpha.detach().float().cpu()
    metadata = {
        "method": "duo_attention_optimisation",
        "num_steps": num_steps,
        "lr": lr,
        "reg_weight": reg_weight,
        "num_sink_tokens": num_sink_tokens,
        "window_length": window_length,
        "context_length": list(lengths),
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
        "data": "passkey_text" if tokenizer is not None else "passkey_tokens",
    }
    return IdentificationResult(HeadPattern.from_scores(scores, sparsity=sparsity, metadata=metadata), scores, history)


@torch.no_grad()
def attention_mass_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    num_sink_tokens: int,
    window_length: int,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Heuristic retrieval scores: attention mass each KV head puts *outside* its sinks + window (no training).

    One full-attention forward over ``input_ids`` ``[T]``; for every query head, the mean over the queries
    ``query_positions`` (default: every ``i >= S + W``) of the softmax mass on keys a streaming head would drop
    (``S <= j <= i - W``), then the max over the query heads of each KV group (a group is streaming only if all its
    heads are). Higher = more retrieval-like; binarise with :meth:`HeadPattern.from_scores`.
    ``[num_layers, num_key_value_heads]``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    from ..attention.switch import use_attention

    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    t = ids.shape[1]
    if t <= num_sink_tokens + window_length:
        raise ValueError(
            f"input_ids has {t} tokens: need more than num_sink_tokens + window_length = "
            f"{num_sink_tokens + window_length} to measure mass outside the window."
        )
    if query_positions is None:
        rows = torch.arange(num_sink_tokens + window_length, t)
    else:
        rows = torch.as_tensor(query_positions, dtype=torch.long).flatten()
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= t:
            raise ValueError(f"query_positions must be non-empty indices in [0, {t}), got {rows.tolist()[:8]}...")
    layers, kv_heads = _kv_shape(model.config)
    scores = torch.zeros(layers, kv_heads)
    name = "hf_sinks_duo_mass"

    def mass(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, 1)
        idx = torch.arange(t, device=query.device)
        at = rows.to(query.device)
        causal = idx[None] <= at[:, None]  # [rows, T]
        dropped = causal & ~visibility_mask(at, idx, num_sink_tokens, window_length)
        total = query.new_zeros(query.shape[1])
        for h in range(query.shape[1]):  # one head at a time: rows x T scores, not H x T x T
            logits = (query[0, h, at] @ k[0, h].T * scaling).masked_fill(~causal, float("-inf"))
            p = torch.softmax(logits.float(), -1)
            total[h] = (p * dropped).sum(-1).mean()
        scores[module.layer_idx] = total.view(key.shape[1], groups).amax(-1).cpu()
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True)

    AttentionInterface.register(name, mass)
    AttentionMaskInterface.register(name, sdpa_mask)
    with use_attention(model, name, route=True):
        model(input_ids=ids, use_cache=False)
    return scores


def passkey_retrieval_scores(
    model: torch.nn.Module,
    tokenizer: Any = None,
    num_sink_tokens: int = 64,
    window_length: int = 256,
    context_length: int = 2048,
    num_examples: int = 2,
    key_length: int = 5,
    seed: int = 1,
) -> torch.Tensor:
    """Heuristic retrieval scores from passkey prompts: :func:`attention_mass_scores` at the queries that predict
    the answer (the tokens a streaming head would drop then include the needle), averaged over ``num_examples``
    synthetic examples (:func:`make_passkey_example`; token-level without a tokenizer). ``[L, KVH]``."""
    check_int("num_examples", num_examples, 1)
    rng = random.Random(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    total = None
    for _ in range(num_examples):
        example = make_passkey_example(context_length, rng, tokenizer, vocab, key_length)
        answer = example.answer_mask.nonzero().flatten()
        scores = attention_mass_scores(model, example.input_ids, num_sink_tokens, window_length, answer - 1)
        total = scores if total is None else total + scores
    return total / num_examples
