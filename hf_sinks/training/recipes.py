"""PEFT recipes for sink-aware fine-tuning: ``lora_recipe(model, "sinklora" | "longlora" | "sink_token")``.

=============  =====================================  ==========================================  ==================
recipe         trains                                 attention while training                    streams with
=============  =====================================  ==========================================  ==================
``longlora``   LoRA on attention + embeddings + norms ``sink_s2attn`` (S²-Attn) if registered      4 sinks
``sinklora``   LoRA on attention + embeddings + norms ``sink_sfattn`` (S²-Attn + global sinks)     4 sinks
``sink_token`` LoRA + the ``<|sink|>`` embedding row  the model's attention (full causal)           1 sink: the token
=============  =====================================  ==========================================  ==================

LongLoRA's finding (§1.3 of the research notes): LoRA on q/k/v/o alone does not adapt a model to a new context length
or position scheme; trainable embeddings + norms close the gap at <2 % extra parameters. They go to PEFT
``modules_to_save``, so they are saved with the adapter and merged by ``merge_and_unload`` (no zero_to_fp32 +
key-slicing dance). Tied input/output embeddings (``config.tie_word_embeddings``, e.g. SmolLM2, Falcon) are trained
as one matrix: ``modules_to_save=["lm_head"]`` + ``ensure_weight_tying=True``, because PEFT only recognises
``embed_tokens``/``lm_head`` as tied names and saving ``word_embeddings`` alone would break the tie.

The norms go to ``modules_to_save`` as full module paths: PEFT 0.21 matched each entry as a plain string suffix
(``"norm"`` also hit ``input_layernorm``), PEFT 0.22 at a dot boundary (``"norm"`` is only ``model.norm``); a full
path selects the same module under both rules. :meth:`SinkRecipe.apply` checks that PEFT wrapped exactly the declared
modules and raises otherwise, so a future matching change cannot silently train less.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_ATTRIBUTE, SinkConfig
from .learned_sinks import DEFAULT_INIT, SINK_MODULE_NAME, add_learned_sinks
from .rope_scaling import normalize_rope_scaling, set_rope_scaling
from .sink_token import DEFAULT_SINK_TOKEN, add_sink_token, resize_for_sink_token

logger = logging.getLogger(__name__)

RECIPES = ("sinklora", "longlora", "sink_token")
#: Attention each recipe prefers for training, if registered (``hf_sinks.attention.shifted_sparse``).
PREFERRED_TRAINING_ATTENTION = {"sinklora": "sink_sfattn", "longlora": "sink_s2attn", "sink_token": None}
#: Sink tokens each recipe streams with afterwards.
INFERENCE_SINK_TOKENS = {"sinklora": 4, "longlora": 4, "sink_token": 1}


@dataclass(frozen=True)
class ArchitectureTargets:
    """Module names for one ``model_type``: a name selects the modules whose path is it or ends with ``.name``."""

    target_modules: tuple[str, ...]  # LoRA: attention projections (LongLoRA: q, k, v, o)
    embedding: str  # the input embedding
    norms: tuple[str, ...]  # every normalisation layer, by its exact (last) name; absent ones are skipped


ARCHITECTURES: dict[str, ArchitectureTargets] = {
    "llama": ArchitectureTargets(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "embed_tokens",
        ("input_layernorm", "post_attention_layernorm", "norm"),
    ),
    "mistral": ArchitectureTargets(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "embed_tokens",
        ("input_layernorm", "post_attention_layernorm", "norm"),
    ),
    # `.dense` is attention.dense only (PEFT matches `endswith(".dense")`; dense_h_to_4h etc. are not hit).
    "gpt_neox": ArchitectureTargets(
        ("query_key_value", "dense"), "embed_in", ("input_layernorm", "post_attention_layernorm", "final_layer_norm")
    ),
    # Falcon: input_layernorm (+ post_attention_layernorm unless parallel_attn), or ln_attn/ln_mlp in the new
    # decoder architecture; ln_f at the end.
    "falcon": ArchitectureTargets(
        ("query_key_value", "dense"),
        "word_embeddings",
        ("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp", "ln_f"),
    ),
}


def architecture_targets(model_type: str | None) -> ArchitectureTargets:
    targets = ARCHITECTURES.get(model_type)  # type: ignore[arg-type]
    if targets is None:
        raise ValueError(
            f"No LoRA recipe for model_type={model_type!r}; supported model types: {sorted(ARCHITECTURES)}."
        )
    return targets


def attention_is_registered(name: str) -> bool:
    """Whether ``attn_implementation=name`` is usable: a stock name or registered in ``AttentionInterface``."""
    from transformers import AttentionInterface

    return name in ("eager", "sdpa") or name in AttentionInterface._global_mapping


def forget_dequantized_gguf(model: torch.nn.Module) -> bool:
    """Drop the GGUF "quantizer" of a model whose GGUF weights were dequantized at load (e.g. the default SmolLM2).

    transformers dequantizes GGUF files to ordinary float tensors but keeps ``hf_quantizer`` set, which makes
    ``Trainer`` refuse to train ("GGUF does not support training") and ``save_pretrained`` refuse to save. The
    weights are plain tensors, so forgetting it is exact. Returns whether anything was dropped; other (real)
    quantizations are left alone.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)).lower() != "gguf":
        return False
    if getattr(quantizer, "packed_modules", None) or not all(p.is_floating_point() for p in model.parameters()):
        return False  # weights really kept in GGUF blocks: not trainable, leave transformers' error to speak
    quantizer.remove_quantization_config(model)  # hf_quantizer, config.quantization_config, is_quantized
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "_is_quantized"):
            module.config._is_quantized = False
    return True


def _is_module_named(path: str, name: str) -> bool:
    """``path`` is the module ``name`` or ends with ``.name`` (PEFT >= 0.22's ``modules_to_save`` rule)."""
    return path == name or path.endswith("." + name)


def module_paths(model: torch.nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    """Full paths, in model order, of the modules of ``model`` selected by ``names`` (see :class:`ArchitectureTargets`).

    A path selects exactly one module whether PEFT matches ``modules_to_save`` as a plain string suffix (<= 0.21) or
    at a dot boundary (>= 0.22), which bare names such as ``"norm"`` do not.
    """
    return [path for path, _ in model.named_modules() if path and any(_is_module_named(path, n) for n in names)]


def _wrapped_modules(model: torch.nn.Module) -> dict[str, set[str]]:
    """Paths of the modules PEFT wrapped to train whole (``modules_to_save``) or by rows (``trainable_tokens``)."""
    from peft.utils import ModulesToSaveWrapper, TrainableTokensWrapper

    wrapped: dict[str, set[str]] = {"modules_to_save": set(), "trainable_token_indices": set()}
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            wrapped["modules_to_save"].add(path)
        elif isinstance(module, TrainableTokensWrapper):
            wrapped["trainable_token_indices"].add(path)
    return wrapped


def _declared_modules(model: torch.nn.Module, lora_config: Any) -> dict[str, set[str]]:
    """What ``lora_config`` declares, resolved on the unwrapped ``model``, tied weight partners included.

    A module sharing its weight tensor with a declared one (tied input/output embeddings) trains with it: PEFT wraps
    both (``ensure_weight_tying`` for ``modules_to_save``, always for ``trainable_token_indices``).
    """
    modules = dict(model.named_modules())
    declared: dict[str, set[str]] = {}
    for field in ("modules_to_save", "trainable_token_indices"):
        value = getattr(lora_config, field, None) or []
        if field == "trainable_token_indices" and not isinstance(value, dict):  # a bare list: the input embedding
            embedding = model.get_input_embeddings()
            value = [p for p, m in modules.items() if m is embedding] if value else []
        paths = set(module_paths(model, list(value)))  # a dict's keys are its module names
        weights = {id(w) for p in paths if isinstance(w := getattr(modules[p], "weight", None), torch.Tensor)}
        paths |= {
            p
            for p, m in modules.items()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and id(m.weight) in weights
        }
        declared[field] = paths
    return declared


def check_trained_modules(peft_model: torch.nn.Module, declared: dict[str, set[str]]) -> None:
    """Raise unless PEFT wrapped exactly the ``declared`` modules (:func:`_declared_modules`) of ``peft_model``.

    Raises:
        RuntimeError: naming the declared modules PEFT left out and the undeclared ones it wrapped.
    """
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    wrapped = _wrapped_modules(inner)
    for field, expected in declared.items():
        missing, extra = sorted(expected - wrapped[field]), sorted(wrapped[field] - expected)
        if missing or extra:
            raise RuntimeError(
                f"hf_sinks: PEFT did not train what the recipe declares in {field}: declared but not trained "
                f"{missing}, trained but not declared {extra} (does this PEFT release match module names "
                "differently?). Please report it."
            )


def _tied(model: torch.nn.Module) -> bool:
    """Input and output embeddings are one tensor (config says so and the model really shares it)."""
    out = model.get_output_embeddings()
    if out is None:
        return False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return (
        bool(getattr(text_config, "tie_word_embeddings", False)) and out.weight is model.get_input_embeddings().weight
    )


@dataclass
class SinkRecipe:
    """Everything a sink-aware fine-tune needs; :meth:`apply` turns a model into the PEFT model to train.

    Attributes:
        recipe: ``"sinklora"``, ``"longlora"`` or ``"sink_token"``.
        lora_config: the ``peft.LoraConfig`` (targets, ``modules_to_save``, ``trainable_token_indices``).
        attn_implementation: attention to train with (``None``: keep the model's).
        sink_config: how the fine-tuned model streams (``num_sink_tokens``, ``window_length``).
        rope_scaling: RoPE interpolation set on the config (``None``: unchanged).
        sink_token: the dedicated sink token string (``"sink_token"`` recipe), else ``None``.
        sink_token_id: its id in the tokenizer/embedding.
        sink_token_init_from: token id whose embedding the new row copies (``None``: the mean embedding).
        learned_sink_logits: add per-head learned sink logits (``sink_logits`` modules) and train them.
        learned_sink_init: their initial value.
        group_size_ratio: S²/SF-Attn group size as a fraction of the sequence (``None``: the attention's default,
            LongLoRA's 1/4); written to ``config.s2attn_group_size_ratio``.
    """

    recipe: str
    lora_config: Any
    attn_implementation: str | None
    sink_config: SinkConfig
    rope_scaling: dict[str, Any] | None = None
    sink_token: str | None = None
    sink_token_id: int | None = None
    sink_token_init_from: int | None = None
    learned_sink_logits: bool = False
    learned_sink_init: float = DEFAULT_INIT
    group_size_ratio: float | None = None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The structural changes, without PEFT: rope scaling, training attention, sink-token row, learned sinks.

        Idempotent and tokenizer-free: :func:`hf_sinks.training.load_finetuned` replays the same changes (except
        the training attention) on a fresh base model before loading the adapter. The sink row's initial value
        does not matter there: PEFT saves trained token rows as values (``index_copy``), not as deltas.
        """
        forget_dequantized_gguf(model)
        if self.rope_scaling is not None:
            set_rope_scaling(model, self.rope_scaling)
        # The streaming setup travels with the config: hf_sinks.apply reads it, and sink_sfattn takes its number of
        # global sink tokens from it, so training and serving use the same sinks.
        setattr(model.config, CONFIG_ATTRIBUTE, self.sink_config.to_dict())
        if self.group_size_ratio is not None:
            model.config.s2attn_group_size_ratio = self.group_size_ratio
        if self.attn_implementation is not None and model.config._attn_implementation != self.attn_implementation:
            if getattr(model.config, "model_type", None) == "falcon":
                raise ValueError(
                    f"Falcon bypasses transformers' AttentionInterface; it cannot switch to "
                    f"attn_implementation={self.attn_implementation!r} after loading. Load it with that attention "
                    f"(from_pretrained(..., attn_implementation=...)) or pass attn_implementation=None."
                )
            model.set_attn_implementation(self.attn_implementation)
        if self.sink_token_id is not None:
            resize_for_sink_token(model, self.sink_token_id, self.sink_token_init_from)
        if self.learned_sink_logits:
            add_learned_sinks(model, self.learned_sink_init)
        return model

    def apply(self, model: torch.nn.Module):
        """Prepare ``model`` (:meth:`prepare_model`) and wrap it with ``peft.get_peft_model``.

        Returns:
            the ``PeftModel``; only the recipe's parameters require grad. The recipe is kept as
            ``peft_model.sink_recipe`` (``finetune`` saves it next to the adapter).
        """
        from peft import get_peft_model

        self.prepare_model(model)
        declared = _declared_modules(model, self.lora_config)  # before PEFT wraps anything
        peft_model = get_peft_model(model, self.lora_config)
        check_trained_modules(peft_model, declared)
        peft_model.sink_recipe = self
        return peft_model

    # ---------------------------------------------------------------- persistence (next to the adapter)
    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("lora_config", "sink_config")}
        data["sink_config"] = self.sink_config.to_dict()
        return data

    def to_json_file(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], lora_config: Any = None) -> "SinkRecipe":
        data = dict(data)
        data["sink_config"] = SinkConfig.from_dict(data["sink_config"])
        return cls(lora_config=lora_config, **data)


def lora_recipe(
    model: torch.nn.Module,
    recipe: str = "sinklora",
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    train_embeddings: bool = True,
    train_norms: bool = True,
    learned_sink_logits: bool = False,
    learned_sink_init: float = DEFAULT_INIT,
    rope_scaling: dict[str, Any] | float | None = None,
    attn_implementation: str | None = "auto",
    num_sink_tokens: int | None = None,
    window_length: int = 1020,
    tokenizer: Any = None,
    sink_token: str = DEFAULT_SINK_TOKEN,
    sink_token_init_from: int | None = None,
    group_size_ratio: float | None = None,
    **lora_kwargs: Any,
) -> SinkRecipe:
    """Build a sink-aware LoRA recipe for ``model`` (nothing is changed until ``recipe.apply(model)``).

    Args:
        model: a supported causal LM (``llama``, ``mistral``, ``gpt_neox``, ``falcon``).
        recipe: ``"sinklora"`` (LongLoRA's LoRA+ trained with SF-Attn: shifted sparse attention + global attention
            to the first sink tokens), ``"longlora"`` (LoRA+ with S²-Attn), ``"sink_token"`` (a dedicated sink
            token, StreamingLLM §3.3: LoRA + that token's embedding row; streams with one sink).
        r, lora_alpha, lora_dropout: LoRA hyper-parameters (LongLoRA: 8, 16, 0).
        target_modules: LoRA targets; default per architecture (q/k/v/o, or ``query_key_value``/``dense``).
        train_embeddings: ``sinklora``/``longlora``: train the input embeddings (tied output embeddings with them);
            ``sink_token``: train the sink token's row (only that row).
        train_norms: train every normalisation layer (LongLoRA's "+norm").
        learned_sink_logits: also add and train per-head learned sink logits (see :mod:`.learned_sinks`); only an
            attention that reads them (``sink_sfattn``) uses them while training.
        learned_sink_init: their initial value.
        rope_scaling: RoPE interpolation: a linear factor, or ``{"rope_type": "linear"|"yarn"|"dynamic",
            "factor": f, ...}`` (see :mod:`.rope_scaling`; ``dynamic`` cannot stream with hf_sinks).
        attn_implementation: attention to train with. ``"auto"``: the recipe's own (``sink_sfattn``/``sink_s2attn``)
            when registered, else the model's current one (with a warning); ``None``: keep the model's.
        num_sink_tokens, window_length: the streaming setup after training (default sinks: 4, ``sink_token``: 1).
        tokenizer: required by ``"sink_token"``: ``sink_token`` is added to it (idempotent) to get its id.
        sink_token: the sink token string.
        sink_token_init_from: token id whose embedding initialises the sink row (default: mean embedding).
        group_size_ratio: S²/SF-Attn group size as a fraction of the training length (default: the attention's,
            1/4 as in LongLoRA).
        **lora_kwargs: passed on to ``peft.LoraConfig`` (e.g. ``layers_to_transform``).

    Raises:
        ValueError: unknown recipe or model type, unregistered ``attn_implementation``, ``sink_token`` without a
            tokenizer, bad rope scaling.
    """
    from peft import LoraConfig

    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; allowed recipes: {', '.join(RECIPES)}.")
    if group_size_ratio is not None and not (isinstance(group_size_ratio, (int, float)) and 0 < group_size_ratio <= 1):
        raise ValueError(f"group_size_ratio={group_size_ratio!r} must be a number in (0, 1].")
    model_type = getattr(model.config, "model_type", None)
    arch = architecture_targets(model_type)
    rope = normalize_rope_scaling(rope_scaling)

    # Training attention: never silently fall back from something the caller named explicitly.
    if attn_implementation == "auto":
        preferred = PREFERRED_TRAINING_ATTENTION[recipe]
        if preferred is not None and attention_is_registered(preferred) and model_type != "falcon":
            attn_implementation = preferred
        else:
            if preferred is not None:
                logger.warning(
                    "hf_sinks: %r is not registered (or %s bypasses the attention interface); recipe %r trains with "
                    "the model's attention %r instead.",
                    preferred,
                    model_type,
                    recipe,
                    model.config._attn_implementation,
                )
            attn_implementation = None
    elif attn_implementation is not None and not attention_is_registered(attn_implementation):
        from transformers import AttentionInterface

        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not registered; use 'eager', 'sdpa' or one of "
            f"{sorted(AttentionInterface._global_mapping)}."
        )

    modules_to_save: list[str] = []
    ensure_tying = False
    trainable_token_indices = None
    sink_token_id = None
    tied = _tied(model)
    if recipe == "sink_token":
        if tokenizer is None:
            raise ValueError(
                "recipe='sink_token' needs the tokenizer (the sink token is added to it); pass tokenizer=."
            )
        sink_token_id = add_sink_token(tokenizer, sink_token)
        if train_embeddings:
            # Only the sink row trains; with tied embeddings PEFT ties lm_head's row to it.
            trainable_token_indices = {arch.embedding: [sink_token_id]}
    elif train_embeddings:
        if tied:
            modules_to_save.append("lm_head")
            ensure_tying = True
        else:
            modules_to_save += module_paths(model, (arch.embedding,))
    if train_norms:
        # Full paths, not names: PEFT 0.21 and 0.22 match names differently (see the module docstring).
        modules_to_save += module_paths(model, arch.norms)
    if learned_sink_logits:
        modules_to_save.append(SINK_MODULE_NAME)

    lora_config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=list(target_modules) if target_modules is not None else list(arch.target_modules),
        modules_to_save=modules_to_save or None,
        trainable_token_indices=trainable_token_indices,
        ensure_weight_tying=ensure_tying,
        **lora_kwargs,
    )
    if num_sink_tokens is None:
        num_sink_tokens = INFERENCE_SINK_TOKENS[recipe]
    return SinkRecipe(
        recipe=recipe,
        lora_config=lora_config,
        attn_implementation=attn_implementation,
        sink_config=SinkConfig(num_sink_tokens=num_sink_tokens, window_length=window_length),
        rope_scaling=rope,
        sink_token=sink_token if recipe == "sink_token" else None,
        sink_token_id=sink_token_id,
        sink_token_init_from=sink_token_init_from,
        learned_sink_logits=learned_sink_logits,
        learned_sink_init=learned_sink_init,
        group_size_ratio=group_size_ratio,
    )


def saved_modules_to_save(base_model: torch.nn.Module, adapter_dir: str | os.PathLike, names: Any) -> Any:
    """``names`` (an adapter's ``modules_to_save``) plus every module of ``base_model`` a bare name saved there.

    Adapters saved before the recipes declared full paths list bare names (``"norm"``, ``"layernorm"``) that PEFT
    0.21 matched as string suffixes (every ``*norm`` module trained and was saved) but PEFT 0.22 matches at a dot
    boundary: reloaded there, the per-layer norms would silently keep their base weights. Adding the paths whose
    weights the adapter file really holds restores what was trained, under either rule, and adds nothing else.
    """
    if not names:
        return names
    saved = _saved_module_paths(Path(adapter_dir))
    extra = [
        path
        for path, _ in base_model.named_modules()
        # only what the old string-suffix rule selected and the dot-boundary rule does not; the rest is PEFT's
        if path in saved and path not in names and any(path.endswith(n) and not path.endswith("." + n) for n in names)
    ]
    return list(names) + extra


def _saved_module_paths(adapter_dir: Path) -> set[str]:
    """Module paths (relative to the base model) whose own parameters an adapter file stores whole."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    if (adapter_dir / SAFETENSORS_WEIGHTS_NAME).is_file():
        from safetensors import safe_open

        with safe_open(str(adapter_dir / SAFETENSORS_WEIGHTS_NAME), "pt") as f:
            keys = list(f.keys())
    elif (adapter_dir / WEIGHTS_NAME).is_file():
        keys = list(torch.load(adapter_dir / WEIGHTS_NAME, map_location="cpu", weights_only=True))
    else:
        return set()
    prefix = "base_model.model."
    return {
        key.removeprefix(prefix).rpartition(".")[0]
        for key in keys
        if key.startswith(prefix) and "lora_" not in key and "token_adapter" not in key
    }


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that require grad (what a recipe trains)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


__all__ = [
    "ARCHITECTURES",
    "RECIPES",
    "ArchitectureTargets",
    "SinkRecipe",
    "architecture_targets",
    "attention_is_registered",
    "check_trained_modules",
    "forget_dequantized_gguf",
    "lora_recipe",
    "module_paths",
    "saved_modules_to_save",
    "trainable_parameter_names",
]
