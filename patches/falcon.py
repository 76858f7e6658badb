"""Falcon: its route into the ``sink_*`` attentions, which depends on the transformers release, and its refusals.

Where ``FalconAttention.forward`` calls ``ALL_ATTENTION_FUNCTIONS`` itself (5.25+, detected from its code by
:func:`hf_sinks.compat.falcon_calls_attention_interface`, never from the version), Falcon takes the generic interface
route: ``hf_sinks.apply`` sets the attention implementation as for Llama and nothing here replaces a forward.

Where it does not (5.23: sdpa/eager hard-coded, classes picked from ``FALCON_ATTENTION_CLASSES``), the patch replaces
``forward`` on each ``FalconAttention`` *instance* (never the class): the module's own projection, head split, rotary
and output projection run as before, and only the attention core is delegated to
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (an hf_sinks ``sink_*`` function). Removing the instance
attribute restores the original method. ``from_pretrained(..., attn_implementation="sink_sdpa")`` would fail there
with a bare ``KeyError``, so :func:`register` adds the ``sink_*`` names to ``FALCON_ATTENTION_CLASSES``, mapped to
:class:`FalconSinkAttention` (the same delegating forward, as a class).

ALiBi Falcons (``config.alibi=True``) are refused on every release: the bias comes from absolute token counts (5.23:
an argument of the attention; 5.25: folded into the dense mask, which a sink attention with a ``SinkCache`` does not
read), so evicted tokens cannot be re-positioned. :func:`check_supported` is the one refusal; it runs at load (in
``FalconSinkAttention.__init__``, or where transformers checks the requested implementation, see :func:`register`),
in ``hf_sinks.apply`` and, through ``hf_sinks.models``, in every sink attention call.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Iterable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.falcon import modeling_falcon
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb

from hf_sinks.compat import falcon_calls_attention_interface

#: The attention implementations whose loading on Falcon refuses ALiBi (filled by :func:`register`).
_SINK_NAMES: set[str] = set()
_LOAD_CHECK = "_hf_sinks_load_check"  # marks the wrapper installed by _install_load_check (register is idempotent)


def route() -> str:
    """``"interface"`` where ``FalconAttention`` calls the attention interface itself, else ``"patch"``."""
    return "interface" if falcon_calls_attention_interface() else "patch"


def _patchable() -> bool:
    # _sink_forward replaces a forward called as (hidden_states, alibi, attention_mask, ...) by FalconDecoderLayer
    parameters = list(inspect.signature(FalconAttention.forward).parameters)
    return parameters[1:3] == ["hidden_states", "alibi"]


def check_supported(config: Any) -> None:
    """Raise ``ValueError`` when Falcon ``config`` cannot stream: ALiBi, or a release neither route fits."""
    if getattr(config, "alibi", False):
        raise ValueError(
            f"Falcon with alibi={config.alibi!r} is not supported by hf_sinks: its ALiBi bias is built from absolute "
            "token counts (in this transformers release: "
            f"{'folded into the attention mask' if route() == 'interface' else 'passed to the attention'}), so "
            "evicted tokens cannot be re-positioned. Rotary Falcons (alibi=False, e.g. Falcon-7B/40B) are supported."
        )
    if route() == "patch" and not _patchable():
        import transformers

        raise ValueError(
            f"hf_sinks cannot stream Falcon on transformers {transformers.__version__}: its FalconAttention.forward "
            f"{inspect.signature(FalconAttention.forward)} neither calls ALL_ATTENTION_FUNCTIONS nor has the "
            "(hidden_states, alibi, attention_mask, ...) signature that hf_sinks.patches.falcon replaces."
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """5.23's ``FalconAttention.forward`` with its attention core taken from ``ALL_ATTENTION_FUNCTIONS`` (rotary only:
    ``alibi`` is always ``None`` here, since :func:`check_supported` refused ALiBi configs)."""
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


def register(names: Iterable[str]) -> None:
    """Let Falcon load with each attention name in ``names`` (``sink_*``) and refuse ALiBi Falcons at that load.

    Patch route: map each name to :class:`FalconSinkAttention` in ``FALCON_ATTENTION_CLASSES`` (its ``__init__``
    refuses ALiBi). Interface route: loading needs nothing, but no Falcon code of ours runs at load any more, so
    :func:`_install_load_check` adds the refusal where transformers validates the requested implementation.
    """
    _SINK_NAMES.update(names)
    classes = getattr(modeling_falcon, "FALCON_ATTENTION_CLASSES", None)
    if isinstance(classes, dict) and route() == "patch":
        for name in _SINK_NAMES:
            classes.setdefault(name, FalconSinkAttention)
    else:
        _install_load_check()


def _install_load_check() -> None:
    """Wrap ``FalconPreTrainedModel._check_and_adjust_attn_implementation`` (once) to run :func:`check_supported`.

    transformers calls it in ``PreTrainedModel.__init__`` (``from_config`` / ``from_pretrained``) and in
    ``set_attn_implementation``, with ``self.config`` set, so an ALiBi Falcon asking for a ``sink_*`` name is refused
    before any weight loads. Only Falcon's classes and only the ``sink_*`` names are affected; every other name passes
    straight through. Should a release rename the method, the refusal still happens at the first sink attention call.
    """
    cls = modeling_falcon.FalconPreTrainedModel
    original = getattr(cls, "_check_and_adjust_attn_implementation", None)
    if original is None or getattr(original, _LOAD_CHECK, False):
        return

    @functools.wraps(original)
    def checked(self: Any, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(attn_implementation, str) and attn_implementation in _SINK_NAMES:
            check_supported(self.config)
        return original(self, attn_implementation, *args, **kwargs)

    setattr(checked, _LOAD_CHECK, True)
    cls._check_and_adjust_attn_implementation = checked


def is_patched(model: torch.nn.Module) -> bool:
    """Whether any ``FalconAttention`` of ``model`` carries the instance ``forward`` set by :func:`patch_model`."""
    return any("forward" in vars(m) for m in model.modules() if isinstance(m, FalconAttention))


def patch_model(model: torch.nn.Module) -> Callable[[], None]:
    """Patch every ``FalconAttention`` of ``model``; returns a function that undoes it.

    Raises:
        ValueError: the model is an ALiBi Falcon, has no ``FalconAttention``, or this release's Falcon calls the
            attention interface itself (route ``"interface"``: a patch would replace a forward it does not mirror).
    """
    check_supported(model.config)
    if route() != "patch":
        raise ValueError(
            "FalconAttention calls ALL_ATTENTION_FUNCTIONS itself in this transformers release, so hf_sinks does not "
            "patch it: hf_sinks.apply(model) routes Falcon through the attention interface (models.get_spec(config)"
            ".route == 'interface')."
        )
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
