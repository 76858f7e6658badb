"""Which models hf_sinks streams, decided from the model's own features (docs/design.md §5.5).

The generic route needs no entry: a decoder whose attention goes through transformers' ``AttentionInterface``
(its class sets ``_supports_attention_backend``) and whose layers use RoPE streams with the registered ``sink_*``
functions and ``SinkCache``; per-layer sliding windows and rotary parameters come from the config
(:mod:`hf_sinks.layers`). What cannot stream is refused with its reason, read from the config:

* no RoPE (absolute or learned positions: GPT-2, OPT, BERT-style decoders) or ALiBi: evicted tokens cannot be
  re-positioned;
* multi-head latent attention (``kv_lora_rank``): keys are rebuilt from a compressed latent, not cached as rotated;
* layer types other than full/sliding attention (recurrent, state-space, linear attention, convolutions, chunked or
  indexed/compressed attention): their state is not a set of tokens a cache can evict;
* RoPE types whose frequencies depend on the sequence length (``dynamic``, ``longrope``).

``MODEL_SPECS`` keeps only the exceptions: models that bypass the interface but are patched (Falcon), and
refusals a feature check cannot see.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    route: str  # "interface", "patch" (hf_sinks.patches.<model_type>) or "refused"
    notes: str = ""
    no_rope_layer_types: tuple[str, ...] = ()  # layer types whose attention skips RoPE (only its code shows it)


#: The exceptions to the generic route (everything else is decided from features, see the module docstring).
MODEL_SPECS: dict[str, ModelSpec] = {
    spec.model_type: spec
    for spec in (
        ModelSpec("falcon", "patch", "hard-codes its attention classes: patches/falcon.py routes the core through the interface; ALiBi refused"),
        # Cohere 2 rotates only in its sliding layers (`if self.sliding_window is not None: apply_rotary_pos_emb`)
        ModelSpec("cohere2", "interface", "global layers have no RoPE", ("full_attention",)),
        ModelSpec("cohere2_moe", "interface", "global layers have no RoPE", ("full_attention",)),
    )
}


def _attr(config: Any, name: str, default: Any = None) -> Any:
    try:
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001 (heterogeneous configs refuse ambiguous global reads)
        return "per-layer"


def unsupported_reason(config: Any) -> str | None:
    """Why ``config``'s model cannot stream with hf_sinks (``None``: it can), from its features."""
    model_type = _attr(config, "model_type", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    spec = MODEL_SPECS.get(model_type)
    if spec is not None and spec.route == "refused":
        return spec.notes
    if spec is not None and spec.route == "patch":
        import importlib

        try:
            importlib.import_module(f"hf_sinks.patches.{model_type}").check_supported(text)
        except ValueError as error:
            return str(error)
        return None
    if _attr(text, "is_encoder_decoder", False) is True:
        return "an encoder-decoder model (hf_sinks streams decoder-only causal LMs)"
    if _attr(text, "alibi", False) is True or _attr(text, "position_embedding_type", None) == "alibi":
        return "ALiBi position biases are built from absolute token counts, so evicted tokens cannot be re-positioned"
    if _attr(text, "kv_lora_rank", None) is not None:
        return "multi-head latent attention (kv_lora_rank): keys are rebuilt from a compressed latent, not cached rotated"
    layer_types = _attr(text, "layer_types", None) or ()
    other = sorted({t for t in layer_types if t not in ATTENTION_LAYER_TYPES})
    if other:
        return (
            f"layer types {other} keep state that is not a set of cached tokens (recurrent / state-space / linear / "
            f"chunked or indexed attention); hf_sinks streams layers of types {list(ATTENTION_LAYER_TYPES)}"
        )
    rope = _attr(text, "rope_parameters", None)
    if not rope:
        return "no RoPE: positions are absolute (learned or sinusoidal embeddings), so the cache cannot re-position tokens"
    ropes = [rope] if ("rope_type" in rope or "rope_theta" in rope) else [v for v in rope.values() if isinstance(v, dict)]
    for params in ropes:
        if params.get("rope_type", "default") in _DYNAMIC_ROPE_TYPES:
            return (
                f"rope_type={params['rope_type']!r} changes its frequencies with the sequence length, so cached keys "
                "cannot be re-positioned exactly"
            )
    return None


_CHECKED: dict[int, tuple[weakref.ref, str | None]] = {}


def check_config(config: Any) -> None:
    """Raise ``ValueError`` with the reason when ``config``'s model cannot stream (cached per config object).

    Objects that are not transformers configs (bare test modules) are not checked.
    """
    from transformers import PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        return
    entry = _CHECKED.get(id(config))
    if entry is None or entry[0]() is not config:
        entry = (weakref.ref(config), unsupported_reason(config))
        _CHECKED[id(config)] = entry
    if entry[1] is not None:
        raise ValueError(f"hf_sinks cannot stream model_type={_attr(config, 'model_type', None)!r}: {entry[1]}.")


def get_spec(config: Any) -> ModelSpec:
    """How ``config``'s model streams (``route`` "interface" or "patch"); ``ValueError`` with the reason otherwise."""
    check_config(config)
    model_type = _attr(config, "model_type", None)
    return MODEL_SPECS.get(model_type) or ModelSpec(model_type, "interface")


def no_rope_layer_types(config: Any) -> tuple[str, ...]:
    """Layer types that skip RoPE in ``config``'s model (an exception recorded in :data:`MODEL_SPECS`)."""
    spec = MODEL_SPECS.get(_attr(config, "model_type", None))
    return spec.no_rope_layer_types if spec is not None else ()


def check_model(model: Any) -> ModelSpec:
    """:func:`get_spec` plus the checks that need the model: it routes through ``AttentionInterface`` (or has a patch)."""
    spec = get_spec(model.config)
    if spec.route == "interface" and not getattr(type(model), "_supports_attention_backend", False):
        raise ValueError(
            f"hf_sinks cannot stream {type(model).__name__} (model_type={spec.model_type!r}): it does not route its "
            "attention through transformers' AttentionInterface (_supports_attention_backend is not set), so the "
            "sink_* attentions would never be called."
        )
    return spec


__all__ = ["MODEL_SPECS", "ModelSpec", "check_config", "check_model", "get_spec", "unsupported_reason"]
