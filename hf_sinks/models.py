"""Which model types hf_sinks supports and how each is routed (docs/design.md §5.5).

``route="interface"``: the model calls transformers' ``AttentionInterface``, so the registered ``sink_*`` functions
and ``SinkCache`` are all it needs. ``route="patch"``: the model bypasses the interface and needs
``hf_sinks.patches.<model_type>``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    route: str  # "interface" or "patch"
    base_model_attr: str  # attribute of the *ForCausalLM holding the base model
    notes: str = ""


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.model_type: spec
    for spec in (
        ModelSpec("llama", "interface", "model", "GQA; any static RoPE type (default, linear, llama3, yarn)"),
        ModelSpec("mistral", "interface", "model", "its own sliding_window never hides the sinks"),
        ModelSpec("gpt_neox", "interface", "gpt_neox", "Pythia; partial rotary (rotary_pct)"),
        ModelSpec("falcon", "patch", "transformer", "rotary variants (multi-query, new decoder architecture); ALiBi refused"),
    )
}


def get_spec(model_type: str | None) -> ModelSpec:
    """The spec for ``model_type``; ``ValueError`` listing the supported types otherwise."""
    spec = MODEL_SPECS.get(model_type)  # type: ignore[arg-type]
    if spec is None:
        raise ValueError(
            f"hf_sinks does not support model_type={model_type!r}; supported model types: {sorted(MODEL_SPECS)}."
        )
    return spec
