"""Sink-aware fine-tuning: PEFT recipes (SinkLoRA, LongLoRA, a dedicated sink token), learned sink logits, RoPE
interpolation, packed data and a ``Trainer``-based ``finetune`` / ``load_finetuned``.

Needs ``peft`` (``pip install peft``); imported explicitly (``import hf_sinks`` does not load it).
"""

from .data import PackedDataset, split_token_ids, tokenize_text
from .finetune import DistributedSetupError, FinetuneResult, finetune, load_finetuned, load_recipe
from .learned_sinks import AttentionSinkLogits, add_learned_sinks, get_sink_logits, remove_learned_sinks
from .recipes import ARCHITECTURES, RECIPES, SinkRecipe, lora_recipe, trainable_parameter_names
from .rope_scaling import rope_scaling_for_length, set_rope_scaling, supported_rope_types
from .sink_token import DEFAULT_SINK_TOKEN, add_sink_token, prepend_sink_token, resize_for_sink_token

__all__ = [
    "ARCHITECTURES",
    "AttentionSinkLogits",
    "DEFAULT_SINK_TOKEN",
    "DistributedSetupError",
    "FinetuneResult",
    "PackedDataset",
    "RECIPES",
    "SinkRecipe",
    "add_learned_sinks",
    "add_sink_token",
    "finetune",
    "get_sink_logits",
    "load_finetuned",
    "load_recipe",
    "lora_recipe",
    "prepend_sink_token",
    "remove_learned_sinks",
    "resize_for_sink_token",
    "rope_scaling_for_length",
    "set_rope_scaling",
    "split_token_ids",
    "supported_rope_types",
    "tokenize_text",
    "trainable_parameter_names",
]
