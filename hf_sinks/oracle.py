"""The recompute oracle (docs/design.md §3.1): what a streaming model must output, computed the slow, obvious way.

For token ``i`` the oracle runs a fresh forward pass over only the tokens visible to ``i`` (sinks + window, by the
visibility rule) with positions ``0..len-1`` and no cache, and takes the last logits. This is also the "sliding
window with re-computation" baseline of the StreamingLLM paper.
"""

from __future__ import annotations

import torch

from .attention.switch import use_attention
from .visibility import visible_keys


@torch.no_grad()
def recompute_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    num_sink_tokens: int,
    window_length: int,
    start: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.Tensor:
    """Oracle next-token logits for every token of ``input_ids`` from ``start`` on.

    Args:
        model: a causal LM.
        input_ids: ``[T]`` or ``[1, T]`` token ids of one sequence (no padding).
        num_sink_tokens, window_length: ``S`` and ``W``.
        start: first token to compute logits for.
        attn_implementation: attention used for the fresh passes (independent of what the model is set to).

    Returns:
        ``[T - start, vocab]`` logits; row ``k`` predicts the token after ``input_ids[start + k]``.
    """
    ids = input_ids.reshape(-1)
    rows = []
    with use_attention(model, attn_implementation):
        for i in range(start, ids.numel()):
            visible = ids[visible_keys(i, num_sink_tokens, window_length, ids.device)][None]
            positions = torch.arange(visible.shape[1], device=ids.device)[None]
            out = model(input_ids=visible, position_ids=positions, use_cache=False)
            rows.append(out.logits[0, -1])
    return torch.stack(rows)


# ------------------------------------------------------------------------------------ spec-attention model run
_REFERENCE_NAME = "hf_sinks_reference"
_REFERENCE_ARGS: list = []  # per-layer rules of the running reference_logits call (not every model forwards kwargs)


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from .attention.reference import reference_sink_attention
    from .attention.sink_logits import sink_logits_of
    from .layers import rule_for
    from .rope import shift_rotary

    sinks, window, rules = _REFERENCE_ARGS[-1]
    rule = rules[module.layer_idx]
    if "sliding_window" in kwargs and (kwargs["sliding_window"] or None) != rule.sliding_window:
        rule = rule_for(sinks, window, rule.rotary, kwargs["sliding_window"] or None)  # as the sink_* functions do
    length = query.shape[2]
    positions = torch.arange(length, device=query.device)
    # the model rotated q/k at positions 0..T-1 with this layer's RoPE; undo it exactly, then let the spec assign
    # positions (a layer without RoPE: nothing to undo)
    raw_q = shift_rotary(query.double(), -positions, rule.rotary)
    raw_k = shift_rotary(key.double(), -positions, rule.rotary)
    logits = sink_logits_of(module, query.shape[1])
    if logits is None and kwargs.get("s_aux") is not None:
        logits = kwargs["s_aux"]
    out = reference_sink_attention(
        raw_q,
        raw_k,
        value.double(),
        rule.num_sink_tokens,
        rule.window_length,
        rule.rotary,
        scaling,
        sink_logits=None if logits is None else logits.double(),
        softcap=kwargs.get("softcap"),
    )
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register_reference() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(_REFERENCE_NAME, _reference_attention)
    AttentionMaskInterface.register(_REFERENCE_NAME, sdpa_mask)


@torch.no_grad()
def reference_logits(model: torch.nn.Module, input_ids: torch.Tensor, num_sink_tokens: int, window_length: int):
    """Logits of one full-sequence forward (no cache) where every attention layer is the fp64 spec of its own rule.

    Each layer follows its rule of docs/design.md §2.3 (:mod:`hf_sinks.layers`, the same function the cache and
    the ``sink_*`` attentions use): its own sliding window when it fits the cache, its own rotary parameters.

    This is what streaming computes for a model of any depth: each token's states at every layer come from
    attending over *its own* visible set, with cache-relative positions. (For a one-layer model it coincides with
    :func:`recompute_logits`; for deeper models recompute differs, as the StreamingLLM paper's Fig. 1 (c) vs (d).)

    Args:
        model: a causal LM routed through ``AttentionInterface``.
        input_ids: ``[T]`` or ``[1, T]`` token ids of one sequence (no padding).

    Returns:
        ``[T, vocab]`` logits.
    """
    from .cache import model_rules

    _register_reference()
    ids = input_ids.reshape(1, -1)
    _REFERENCE_ARGS.append((num_sink_tokens, window_length, model_rules(model, num_sink_tokens, window_length)))
    try:
        with use_attention(model, _REFERENCE_NAME, route=True):
            out = model(
                input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None], use_cache=False
            )
    finally:
        _REFERENCE_ARGS.pop()
    return out.logits[0]
