"""Learned per-head sink logits (gpt-oss style): an extra logit per head in the softmax denominator, no value.

``out = (Σ_j e^{s_j} v_j) / (Σ_j e^{s_j} + e^{b_h})``: a head can put attention mass "nowhere" instead of on a sink
*token* (docs/design.md §2.4: ``num_sink_tokens`` vs ``sink_logits``). Equivalent to rescaling the
ordinary attention output by ``σ(lse − b_h)``.

Where the parameter lives: PEFT's ``modules_to_save`` wraps *modules*, not bare parameters, so each attention module
gets a tiny child :class:`AttentionSinkLogits` named ``sink_logits`` holding ``weight`` of shape
``[num_attention_heads]``; ``modules_to_save=["sink_logits"]`` then trains, saves and merges it like any other module.
Attention functions read it by *calling* it (``module.sink_logits()``, the convention of
``hf_sinks.attention.shifted_sparse``: PEFT's wrapper dispatches the call to the active adapter's copy), or with
:func:`get_sink_logits`. ``sink_sfattn``/``sink_s2attn`` use them in training and in eval, and the streaming
``sink_sdpa``/``sink_eager``/``sink_triton`` use them with or without a ``SinkCache`` (``sink_flex`` refuses them);
transformers' stock ``sdpa``/``eager`` do not know about them.

Initialisation: ``-4.0`` by default (:data:`DEFAULT_INIT`). The extra denominator term is ``e^{-4} ≈ 0.018`` of a
single key with logit 0, so the pretrained model is almost unchanged (output scaled by ``σ(lse + 4) ≥ 0.98`` wherever
``lse ≥ 0``), while the gradient, proportional to ``e^{b − lse}``, does not vanish as it would at ``-inf``.
(gpt-oss initialises ``N(0, 0.02)``, i.e. ``b ≈ 0``, which halves a first token's output: fine from scratch,
not for an already trained model.)
"""

from __future__ import annotations

import torch
from torch import nn

#: Name of the child module holding the logits (use it in ``modules_to_save``).
SINK_MODULE_NAME = "sink_logits"
#: Default initial logit (see the module docstring).
DEFAULT_INIT = -4.0


class AttentionSinkLogits(nn.Module):
    """Holds ``weight``: ``[num_heads]`` learned sink logits of one attention layer. ``forward()`` returns it."""

    def __init__(self, num_heads: int, init_value: float = DEFAULT_INIT, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        from ..validation import check_int, check_number

        check_int("num_heads", num_heads, 1)
        check_number("init_value", init_value)
        self.weight = nn.Parameter(
            torch.full((num_heads,), float(init_value), dtype=dtype or torch.float32, device=device)
        )

    def forward(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"num_heads={self.weight.shape[0]}"


def _num_heads(module: nn.Module, config) -> int:
    for name in ("num_heads", "num_attention_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    value = getattr(config, "num_attention_heads", None)
    if isinstance(value, int):
        return value
    raise ValueError(
        f"Cannot tell how many heads {type(module).__name__} has (no num_heads / config.num_attention_heads)."
    )


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every attention layer: classes named ``*Attention`` with a ``layer_idx``.

    Same criterion as ``hf_sinks.apply`` (Llama, Mistral, GPT-NeoX, Falcon all match).
    """
    found = [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
    ]
    if not found:
        raise ValueError(f"No attention module (a *Attention class with `layer_idx`) found in {type(model).__name__}.")
    return found


def add_learned_sinks(model: nn.Module, init_value: float = DEFAULT_INIT) -> int:
    """Give every attention module of ``model`` a ``sink_logits`` child (idempotent). Returns how many were added.

    Call before ``get_peft_model`` so that ``modules_to_save=["sink_logits"]`` finds them. The parameters take the
    dtype/device of the module's weights. Note: only attention functions that read :func:`get_sink_logits` use them
    (e.g. ``sink_sfattn`` for training); ``sdpa``/``eager`` ignore them.

    Raises:
        ValueError: ``model`` is of a model type no sink attention supports (the message gives the reason), or
            ``init_value`` is not a finite number.
    """
    from ..models import check_model
    from ..validation import check_number

    try:
        check_model(model)
    except ValueError as e:
        raise ValueError(
            f"add_learned_sinks: {type(model).__name__} has no sink attention that reads learned sink logits, so they "
            f"would be trained for nothing: {e}"
        ) from None
    config = model.config
    check_number("init_value", init_value)
    added = 0
    for _, module in attention_modules(model):
        if hasattr(module, SINK_MODULE_NAME):
            continue
        ref = next(module.parameters(), None)
        sink = AttentionSinkLogits(
            _num_heads(module, config),
            init_value,
            dtype=ref.dtype if ref is not None and ref.is_floating_point() else None,
            device=ref.device if ref is not None else None,
        )
        module.add_module(SINK_MODULE_NAME, sink)
        added += 1
    return added


def remove_learned_sinks(model: nn.Module) -> int:
    """Delete every ``sink_logits`` child (the model is back to plain attention). Returns how many were removed."""
    removed = 0
    for _, module in model.named_modules():
        if SINK_MODULE_NAME in module._modules:
            del module._modules[SINK_MODULE_NAME]
            removed += 1
    return removed


def get_sink_logits(module: nn.Module) -> torch.Tensor | None:
    """The ``[num_heads]`` sink logits of an attention ``module``, or ``None`` if it has none.

    Calls ``module.sink_logits`` when it is a module (PEFT's ``ModulesToSaveWrapper`` dispatches the call to the
    active adapter's copy, or to the original when adapters are disabled); also accepts a bare tensor there, or
    gpt-oss's ``sinks`` parameter.
    """
    for name in (SINK_MODULE_NAME, "sinks"):
        value = getattr(module, name, None)
        if isinstance(value, nn.Module):
            value = value()
        if isinstance(value, torch.Tensor):
            return value
    return None


def learned_sink_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{attention module name: sink logits}`` (detached copies), e.g. to inspect or plot what was learned."""
    state = {}
    for name, module in attention_modules(model):
        logits = get_sink_logits(module)
        if logits is not None:
            state[name] = logits.detach().clone()
    return state


__all__ = [
    "AttentionSinkLogits",
    "DEFAULT_INIT",
    "SINK_MODULE_NAME",
    "add_learned_sinks",
    "attention_modules",
    "get_sink_logits",
    "learned_sink_state",
    "remove_learned_sinks",
]
