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
* RoPE types whose frequencies depend on the sequence length (``dynamic``, ``longrope``);
* KV sharing across layers (``num_kv_shared_layers``, ``kv_sharing``): a layer reads another layer's cache;
* per-layer attention shapes (a heterogeneous config, ``per_layer_config``): heads of different sizes per layer;
* cross-attention layers (``cross_attention_layers``): keys from another modality, not from the stream;
* convolution layers in the decoder (``nn.Conv1d``, found in the module tree by :func:`check_model` when the
  config does not mark them): their state is the last tokens before the window, not a cache that can be evicted.

``MODEL_SPECS`` keeps only the exceptions: models that bypass the interface but are patched (Falcon on releases
where its attention hard-codes sdpa/eager), and behaviours or refusals a feature check cannot see.

What passes the feature checks must also be **proven**: :data:`VERIFIED_MODEL_TYPES` holds the model types that
``tests/test_model_coverage.py`` streams exactly against the fp64 spec (the test keeps the two in step). Any other
type is refused as "not verified by hf_sinks' coverage tests"; ``HF_SINKS_ALLOW_UNVERIFIED=1`` turns that refusal
into a warning (once per model type), for a model type newer than this release.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .compat import falcon_calls_attention_interface

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    route: str  # "interface", "patch" (hf_sinks.patches.<model_type>) or "refused"
    notes: str = ""
    no_rope_layer_types: tuple[str, ...] = ()  # layer types whose attention skips RoPE (only its code shows it)
    rope_everywhere_without_window: bool = False  # every layer rotates when config.sliding_window is unset
    # hf_sinks.patches.<model_type>.check_supported decides which configs stream, on either route; on route
    # "interface" the model's attention code was checked to call the interface although its class does not set
    # `_supports_attention_backend` (Falcon on 5.25)
    patch_module: bool = False


def _falcon_spec() -> ModelSpec:
    """Falcon's entry. Its route follows its attention code, never the version string: 5.25's ``FalconAttention``
    calls the interface itself (without setting ``_supports_attention_backend``), 5.23's hard-codes sdpa/eager and
    is patched per instance (:func:`hf_sinks.compat.falcon_calls_attention_interface`)."""
    if falcon_calls_attention_interface():
        return ModelSpec(
            "falcon",
            "interface",
            "its attention calls the interface (its class does not declare it); ALiBi refused (patches/falcon.py)",
            patch_module=True,
        )
    return ModelSpec(
        "falcon",
        "patch",
        "hard-codes its attention classes: patches/falcon.py routes the core through the interface; ALiBi refused",
        patch_module=True,
    )


#: The exceptions to the generic route (everything else is decided from features, see the module docstring); Falcon's
#: entry is added by :func:`model_specs`.
_STATIC_SPECS: dict[str, ModelSpec] = {
    spec.model_type: spec
    for spec in (
        # Cohere 2 rotates only in its sliding layers (`if self.sliding_window is not None: apply_rotary_pos_emb`)
        ModelSpec("cohere2", "interface", "global layers have no RoPE", ("full_attention",)),
        ModelSpec("cohere2_moe", "interface", "global layers have no RoPE", ("full_attention",)),
        # `if self.sliding_window is not None:` / `if self.is_local_attention:` around apply_rotary_pos_emb
        ModelSpec("afmoe", "interface", "global layers have no RoPE", ("full_attention",)),
        ModelSpec("flint", "interface", "global layers have no RoPE", ("full_attention",)),
        # `if self.sliding_window is None or self.is_sliding:`: NoPE global layers only when the model has a window
        ModelSpec(
            "exaone4", "interface", "global layers have no RoPE when sliding_window is set", ("full_attention",), True
        ),
        ModelSpec(
            "exaone_moe",
            "interface",
            "global layers have no RoPE when sliding_window is set",
            ("full_attention",),
            True,
        ),
        ModelSpec(
            "kolibri1", "interface", "global layers have no RoPE when sliding_window is set", ("full_attention",), True
        ),
        ModelSpec(
            "beam",
            "refused",
            "its global layers scale queries by their absolute position (attention temperature "
            "from `attention_scaling`), which a cache-relative stream cannot reproduce",
        ),
        ModelSpec(
            "diffllama",
            "refused",
            "differential attention subtracts two softmax maps inside its own attention "
            "code, which the sink_* functions do not implement",
        ),
        ModelSpec(
            "jetmoe",
            "refused",
            "its attention copies the cached keys (repeated per expert) before calling the "
            "attention function, so the sink_* functions cannot find the cache layer behind them",
        ),
        ModelSpec(
            "dory",
            "refused",
            "recurrent loops run its middle layers several times per token (n_recurrent_loops), "
            "so a layer's cache is not one set of stream tokens",
        ),
        ModelSpec(
            "hrm_text",
            "refused",
            "hierarchical recurrent cycles run the same layers several times per token, so a "
            "layer's cache is not one set of stream tokens",
        ),
    )
}

_SPECS: dict[str, ModelSpec] = {}


def model_specs() -> dict[str, ModelSpec]:
    """:data:`MODEL_SPECS`, built on first use: Falcon's route is read from its modeling code, which importing this
    module must not import (hf_sinks registers its attentions when transformers' modeling modules are imported, and
    an import from here, mid-import of hf_sinks, would pass that moment by)."""
    if not _SPECS:
        _SPECS.update({"falcon": _falcon_spec(), **_STATIC_SPECS})
    return _SPECS


#: Every exception to the generic route, Falcon's included (a module attribute served by ``__getattr__``).
MODEL_SPECS: dict[str, ModelSpec]


def __getattr__(name: str) -> Any:  # PEP 562: MODEL_SPECS is built lazily (see model_specs)
    if name == "MODEL_SPECS":
        return model_specs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Model types proven to stream exactly by tests/test_model_coverage.py (top-level and text-config types).
VERIFIED_MODEL_TYPES: frozenset[str] = frozenset(
    """
    afmoe apertus apertus1p5_text arcee aria_text bitnet cohere cohere2 cohere2_moe cwm dbrx doge dots1 ernie4_5
    ernie4_5_moe exaone exaone4 exaone_moe falcon flex_olmo flint fuyu gemma gemma2 gemma3 gemma3_text glm glm4
    glm4_moe got_ocr2 gpt_neox gpt_oss granite granite_swa granitemoe granitemoe_swa granitemoeshared helium
    hunyuan_v1_dense hunyuan_v1_moe hy_v3 hyperclovax internlm3 iquestcoder jais2 kolibri1 laguna lfm2 lfm2_moe
    llama mellum mimo_v2_flash minimax_m2 minimax_m3_vl_text ministral ministral3 mistral mixtral nanochat
    modernbert-decoder moshi moss_transcribe_diarize nemotron olmo olmo2 olmo3 olmoe phi phi3 phi4_multimodal
    persimmon phimoe qwen2 qwen2_moe qwen3 qwen3_moe sarvam_moe seed_oss smollm3 solar_open starcoder2 vaultgemma
    """.split()
)
UNVERIFIED_ENV = "HF_SINKS_ALLOW_UNVERIFIED"
_WARNED: set[str] = set()


def _attr(config: Any, name: str, default: Any = None) -> Any:
    try:
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001 (heterogeneous configs refuse ambiguous global reads)
        return "per-layer"


def unsupported_reason(config: Any) -> str | None:
    """Why ``config``'s model cannot stream with hf_sinks (``None``: it can): its features, then whether its type
    is proven by the coverage tests (:data:`VERIFIED_MODEL_TYPES`)."""
    reason = feature_reason(config)
    if reason is not None:
        return reason
    return _unverified_reason(config)


def _unverified_reason(config: Any) -> str | None:
    model_type = _attr(config, "model_type", None)
    if model_type in VERIFIED_MODEL_TYPES:
        return None
    reason = (
        f"model_type={model_type!r} passes hf_sinks' feature checks but is not verified by hf_sinks' coverage tests "
        "(tests/test_model_coverage.py), so exact streaming is not guaranteed"
    )
    if os.environ.get(UNVERIFIED_ENV) == "1":
        if model_type not in _WARNED:
            _WARNED.add(model_type)
            warnings.warn(f"hf_sinks: {reason}; streaming anyway because {UNVERIFIED_ENV}=1.", stacklevel=3)
        return None
    return f"{reason}; set {UNVERIFIED_ENV}=1 to stream it anyway (with a warning)"


def feature_reason(config: Any) -> str | None:
    """Why ``config``'s model cannot stream, from its features alone (``None``: it takes the generic route)."""
    model_type = _attr(config, "model_type", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    spec = model_specs().get(model_type)
    if spec is not None and spec.route == "refused":
        return spec.notes
    if spec is not None and spec.patch_module:
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
        return (
            "multi-head latent attention (kv_lora_rank): keys are rebuilt from a compressed latent, not cached rotated"
        )
    shared = _attr(text, "num_kv_shared_layers", None)
    if shared or _attr(text, "kv_sharing", None):
        return (
            f"KV sharing across layers (num_kv_shared_layers={shared!r}): a layer attends with another layer's "
            "cached keys, which hf_sinks' per-layer caches and rules do not model"
        )
    if _attr(text, "is_heterogeneous", False) is True:
        return (
            "per-layer attention shapes (a heterogeneous config: per_layer_config sets head_dim or heads per layer), "
            "which hf_sinks' rotary and cache checks do not model"
        )
    if _attr(text, "cross_attention_layers", None):
        return "cross-attention layers (cross_attention_layers): their keys come from another input, not the stream"
    layer_types = _attr(text, "layer_types", None) or ()
    other = sorted({t for t in layer_types if t not in ATTENTION_LAYER_TYPES})
    if other:
        return (
            f"layer types {other} keep state that is not a set of cached tokens (recurrent / state-space / linear / "
            f"chunked or indexed attention); hf_sinks streams layers of types {list(ATTENTION_LAYER_TYPES)}"
        )
    rope = _attr(text, "rope_parameters", None)
    if not rope:
        return (
            "no RoPE: positions are absolute (learned or sinusoidal embeddings), so the cache cannot re-position tokens"
        )
    ropes = (
        [rope] if ("rope_type" in rope or "rope_theta" in rope) else [v for v in rope.values() if isinstance(v, dict)]
    )
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
    return model_specs().get(model_type) or ModelSpec(model_type, "interface")


def no_rope_layer_types(config: Any) -> tuple[str, ...]:
    """Layer types that skip RoPE in ``config``'s model (an exception recorded in :data:`MODEL_SPECS`)."""
    spec = model_specs().get(_attr(config, "model_type", None))
    return spec.no_rope_layer_types if spec is not None else ()


def check_model(model: Any) -> ModelSpec:
    """:func:`get_spec` plus the checks that need the model: it routes through ``AttentionInterface`` (or has a patch)
    and its decoder layers hold no convolution."""
    model_type = _attr(model.config, "model_type", None)
    exception = model_specs().get(model_type)
    generic = exception is None or (exception.route == "interface" and not exception.patch_module)
    bypasses = generic and not getattr(type(model), "_supports_attention_backend", False)
    if bypasses and feature_reason(model.config) is None:  # a feature refusal is the more specific reason
        raise ValueError(
            f"hf_sinks cannot stream {type(model).__name__} (model_type={model_type!r}): it does not route its "
            "attention through transformers' AttentionInterface (_supports_attention_backend is not set), so the "
            "sink_* attentions would never be called."
        )
    spec = get_spec(model.config)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)  # the decoder layers (not an audio or vision embedder beside them)
    layers = layers if isinstance(layers, torch.nn.ModuleList) else decoder
    convs = [name for name, module in layers.named_modules() if isinstance(module, torch.nn.Conv1d)]
    if convs:
        raise ValueError(
            f"hf_sinks cannot stream {type(model).__name__} (model_type={spec.model_type!r}): its decoder has "
            f"convolution layers ({convs[0]}, ...) whose state is not a set of cached tokens (hybrid conv / "
            "state-space layers), even where its config marks no such layer type."
        )
    return spec


__all__ = [
    "MODEL_SPECS",
    "VERIFIED_MODEL_TYPES",
    "ModelSpec",
    "check_config",
    "check_model",
    "feature_reason",
    "get_spec",
    "model_specs",
    "unsupported_reason",
]
