"""Falcon: route its attention through transformers' ``AttentionInterface`` (Falcon hard-codes sdpa/eager).

The patch replaces ``forward`` on each ``FalconAttention`` *instance* (never the class): the module's own
projection, head split, rotary and output projection run as before, and only the attention core is delegated to
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (an hf_sinks ``sink_*`` function). Removing the instance
attribute restores the original method.

Falcon picks its attention class from ``FALCON_ATTENTION_CLASSES[config._attn_implementation]``, so
``from_pretrained(..., attn_implementation="sink_sdpa")`` would fail with a bare ``KeyError``: :func:`register` adds
the ``sink_*`` names there, mapped to :class:`FalconSinkAttention` (the same delegating forward, as a class), so
loading with a sink attention works as it does for Llama.

ALiBi Falcons are refused: Falcon builds its ALiBi bias from the absolute token count at model level, outside the
attention, so the cache cannot re-position it.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.falcon import modeling_falcon
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb


def check_supported(config: Any) -> None:
    if getattr(config, "alibi", False):
        raise ValueError(
            "Falcon with alibi=True is not supported by hf_sinks: its ALiBi bias is built from absolute token counts "
            "outside the attention, so evicted tokens cannot be re-positioned. Rotary Falcons (alibi=False, e.g. "
            "Falcon-7B/40B) are supported."
        )


def _sink_forward(
    self: FalconAttention,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: Any,
    position_ids: torch.LongTensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
):
    query, key, value = self._split_heads(self.query_key_value(hidden_states))  # [B, T, heads, D]
    batch, length = query.shape[:2]
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=self.config.attention_dropout if self.training else 0.0,
        scaling=self.inv_norm_factor,
        position_ids=position_ids,
        output_attentions=output_attentions,
    )
    return self.dense(out.reshape(batch, length, -1)), weights


def _set_groups(module: FalconAttention) -> None:
    # K/V arrive with `num_kv_heads` heads (new architecture: already broadcast to all heads by _split_heads)
    kv_heads = module.num_heads if module.new_decoder_architecture else module.num_kv_heads
    module.num_key_value_groups = module.num_heads // kv_heads


class FalconSinkAttention(FalconAttention):
    """``FalconAttention`` whose attention core is ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``."""

    def __init__(self, config: Any, layer_idx: int | None = None):
        check_supported(config)
        super().__init__(config, layer_idx)
        _set_groups(self)

    forward = _sink_forward


def register(names: Any) -> None:
    """Map each attention name in ``names`` to :class:`FalconSinkAttention` for Falcon models built from now on."""
    classes = getattr(modeling_falcon, "FALCON_ATTENTION_CLASSES", None)
    if not isinstance(classes, dict):  # Falcon routes through AttentionInterface in this release: nothing to add
        return
    for name in names:
        classes.setdefault(name, FalconSinkAttention)


def is_patched(model: torch.nn.Module) -> bool:
    return any("forward" in vars(m) for m in model.modules() if isinstance(m, FalconAttention))


def patch_model(model: torch.nn.Module) -> Callable[[], None]:
    """Patch every ``FalconAttention`` of ``model``; returns a function that undoes it. Raises if none matched."""
    check_supported(model.config)
    patched = [m for m in model.modules() if isinstance(m, FalconAttention)]
    if not patched:
        raise ValueError(f"{type(model).__name__} has no FalconAttention module to patch.")
    for module in patched:
        _set_groups(module)
        module.forward = types.MethodType(_sink_forward, module)

    def undo() -> None:
        for module in patched:
            del module.forward
            if not isinstance(module, FalconSinkAttention):
                del module.num_key_value_groups

    undo.count = len(patched)  # type: ignore[attr-defined]
    return undo
