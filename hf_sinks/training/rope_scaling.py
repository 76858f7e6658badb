"""RoPE position interpolation for context extension (LongLoRA §1.4): set on the config, rotary modules rebuilt.

LongLoRA uses linear position interpolation with an integer factor ``ceil(target_length / trained_length)``
(:func:`rope_scaling_for_length`). ``"yarn"`` and ``"dynamic"`` are offered when transformers' ``ROPE_INIT_FUNCTIONS``
has them (checked at call time, not by version). Streaming caveat: ``hf_sinks.RotaryParams`` (which ``SinkCache``
uses to re-position cached keys) refuses ``"dynamic"`` (and ``"longrope"``): their frequencies change with the
sequence length, so keys rotated earlier cannot be re-rotated consistently. Train with ``"dynamic"`` only if the
model will not stream with hf_sinks; ``"linear"`` and ``"yarn"`` stream fine.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..validation import check_int

#: Types this helper knows how to set, in preference order; each is offered only if transformers implements it.
KNOWN_ROPE_TYPES = ("linear", "yarn", "dynamic")
#: Types hf_sinks' streaming cache refuses (their frequencies depend on the sequence length).
STREAMING_INCOMPATIBLE = ("dynamic", "longrope")


def supported_rope_types() -> tuple[str, ...]:
    """The interpolation types available here: :data:`KNOWN_ROPE_TYPES` that ``ROPE_INIT_FUNCTIONS`` implements."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return tuple(t for t in KNOWN_ROPE_TYPES if t in ROPE_INIT_FUNCTIONS)


def normalize_rope_scaling(rope_scaling: dict[str, Any] | float | int | None) -> dict[str, Any] | None:
    """Validate ``rope_scaling`` and return it as ``{"rope_type": ..., "factor": ...}`` (or ``None``).

    Accepts ``None``, a number (a linear factor, LongLoRA style) or a dict with ``"rope_type"`` (or the older
    ``"type"``) and ``"factor"`` plus any extra keys the type takes (e.g. yarn's ``beta_fast``).

    Raises:
        ValueError: unknown type (the message lists the supported ones), missing or non-positive factor.
    """
    if rope_scaling is None:
        return None
    if isinstance(rope_scaling, bool):
        raise ValueError(f"rope_scaling={rope_scaling!r} is not a factor or a dict.")
    if isinstance(rope_scaling, (int, float)):
        rope_scaling = {"rope_type": "linear", "factor": float(rope_scaling)}
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be None, a number or a dict, got {type(rope_scaling).__name__}.")
    scaling = dict(rope_scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    allowed = supported_rope_types()
    if rope_type not in allowed:
        raise ValueError(f"Unknown rope scaling type {rope_type!r}; supported types: {', '.join(allowed)}.")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise ValueError(f"rope_scaling needs a positive 'factor', got {factor!r}.")
    return {"rope_type": rope_type, **scaling, "factor": float(factor)}


def rope_scaling_for_length(config: Any, target_length: int, rope_type: str = "linear") -> dict[str, Any] | None:
    """LongLoRA's choice: factor ``ceil(target_length / (max_position_embeddings × existing linear factor))``.

    Returns ``None`` when ``target_length`` already fits (no interpolation needed). The factor composes with an
    existing linear factor (it multiplies it), as in LongLoRA PR #113.
    """
    check_int("target_length", target_length, 1)
    existing = dict(getattr(config, "rope_parameters", None) or {})
    existing_factor = float(existing.get("factor", 1.0)) if existing.get("rope_type") == "linear" else 1.0
    trained = config.max_position_embeddings
    extra = math.ceil(target_length / (trained * existing_factor))
    if extra <= 1:
        return None
    return normalize_rope_scaling({"rope_type": rope_type, "factor": float(extra * existing_factor)})


def set_rope_scaling(model: torch.nn.Module, rope_scaling: dict[str, Any] | float | None) -> dict[str, Any] | None:
    """Put ``rope_scaling`` into ``model.config.rope_parameters`` and rebuild the rotary embedding modules.

    ``rope_theta`` and other existing keys are kept. Rotary modules (any submodule with an ``inv_freq`` buffer and a
    ``config``) are re-initialised from the new config in place, so the loaded weights are untouched. The setting
    is saved with the config (``save_pretrained``) and must be the same at inference (LongLoRA issue #137).

    Returns:
        the normalised scaling (``None``: nothing changed).
    """
    scaling = normalize_rope_scaling(rope_scaling)
    if scaling is None:
        return None
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    for stale in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"):
        params.pop(stale, None)
    params.update(scaling)
    if scaling["rope_type"] in ("yarn", "dynamic"):
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    config.rope_parameters = params
    rebuilt = 0
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and getattr(module, "config", None) is not None:
            fresh = type(module)(config=module.config)
            device = module.inv_freq.device
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))
            for name in ("rope_type", "attention_scaling", "max_seq_len_cached", "original_max_seq_len"):
                if hasattr(fresh, name):
                    setattr(module, name, getattr(fresh, name))
            rebuilt += 1
    if rebuilt == 0:
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding module (no `inv_freq` buffer); "
            "rope scaling does not apply."
        )
    return scaling


__all__ = [
    "KNOWN_ROPE_TYPES",
    "STREAMING_INCOMPATIBLE",
    "normalize_rope_scaling",
    "rope_scaling_for_length",
    "set_rope_scaling",
    "supported_rope_types",
]
