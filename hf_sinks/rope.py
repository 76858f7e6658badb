"""Rotary-embedding helpers shared by the cache and the attention functions.

RoPE rotates the first ``rotary_dim`` channels of each head (partial rotary: GPT-NeoX's ``rotary_pct``, Phi's
``partial_rotary_factor``), pairing either the two halves (``rotate_half``, Llama and most models) or neighbouring
channels (``interleaved``, Cohere). hf_sinks never re-applies a model's RoPE from scratch: it only *shifts*
already-rotated keys or queries by a small integer number of positions, computing the angles in fp64 so a shift is
exact whatever position the stream has reached.

Parameters are per layer (docs/design.md §2.3): :func:`layer_rotaries` gives each layer its own
:class:`RotaryParams` (Gemma 3 picks ``{layer_type}_inv_freq`` by ``config.layer_types``) or ``None`` for a layer
without RoPE (SmolLM3's ``no_rope_layers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .validation import SinkTypeError

_SUPPORTED = "hf_sinks streams RoPE decoders (docs/models.md lists what is proven and what is refused)"

# RoPE types whose frequencies depend on the current sequence length: a cached key cannot be shifted exactly.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class RotaryParams:
    """The inverse frequencies a model rotates with, and how many channels of a head they cover."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], fp32, exactly the model's buffer when taken from the model
    rotary_dim: int
    source: str = field(default="", compare=False)  # where the parameters came from, for error messages
    interleaved: bool = False  # pairs neighbouring channels (Cohere) instead of the two halves

    def matches(self, other: "RotaryParams | None") -> bool:
        """Same rotation (to fp32 rounding of the frequencies)."""
        if other is None:
            return False
        return (
            self.rotary_dim == other.rotary_dim
            and self.interleaved == other.interleaved
            and torch.allclose(self.inv_freq.double().cpu(), other.inv_freq.double().cpu(), rtol=1e-5, atol=0)
        )

    def describe(self) -> str:
        """E.g. ``rope_theta=10000.0 (rotary_dim=64, inv_freq[1]=0.749894)``, for error messages."""
        first = f", inv_freq[1]={float(self.inv_freq[1]):.6g}" if self.inv_freq.numel() > 1 else ""
        return f"{self.source or 'rotary'} (rotary_dim={self.rotary_dim}{first})"

    @classmethod
    def from_model(cls, model: nn.Module) -> "RotaryParams":
        """The rotary parameters of the model's first RoPE layer (its own buffer: exact even if the model was cast)."""
        found = [r for r in layer_rotaries(model.config, model=model) if r is not None]
        if not found:
            raise ValueError(f"{type(model).__name__} has no rotary embedding module (no `inv_freq` buffer).")
        return found[0]

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> "RotaryParams":
        """Recompute layer ``layer_idx``'s frequencies from a transformers config (what the model's rotary module
        does at init); ``ValueError`` for a layer without RoPE."""
        config = check_rope_config(config)
        rotary = _rotary_from_config(config, _layer_type(config, layer_idx), *_convention_for(config))
        if rotary is None:
            raise ValueError(f"{getattr(config, 'model_type', 'model')} has no RoPE parameters (`rope_parameters`).")
        return rotary


def check_rope_config(config):
    """The decoder text config of ``config``, checked to describe a static RoPE model; clear errors otherwise.

    Raises:
        SinkTypeError: ``config`` is not a transformers config.
        ValueError: no rotary embedding (learned absolute positions, ALiBi), an unknown or dynamic ``rope_type``.
    """
    if not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        raise SinkTypeError(
            f"config must be a transformers PretrainedConfig (e.g. model.config), got {type(config).__name__}."
        )
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model_type = getattr(config, "model_type", None)
    rope = getattr(config, "rope_parameters", None) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.rope_parameters={rope!r} (model_type={model_type!r}) is not a dict of RoPE settings.")
    if getattr(config, "alibi", False):
        raise ValueError(
            f"{type(config).__name__} (model_type={model_type!r}) has alibi=True: ALiBi models have no rotary "
            f"embedding to re-position sinks with; {_SUPPORTED}."
        )
    per_type = [dict(v) for v in rope.values() if isinstance(v, dict)]  # Gemma 3: one entry per layer type
    for params in per_type or [dict(rope)]:
        rope_type = params.get("rope_type", "default")
        if rope_type == "default" and "rope_theta" not in params:
            raise ValueError(
                f"{type(config).__name__} (model_type={model_type!r}) has no rotary embedding (no "
                f"rope_parameters['rope_theta']): attention sinks need a RoPE model; {_SUPPORTED}."
            )
        if rope_type not in ("default", *ROPE_INIT_FUNCTIONS, *_DYNAMIC_ROPE_TYPES):
            raise ValueError(
                f"rope_type={rope_type!r} (model_type={model_type!r}) is not a RoPE type transformers knows: "
                f"{sorted(ROPE_INIT_FUNCTIONS)}."
            )
        _check_static(rope_type)
    return config


def _layer_type(config, layer_idx: int) -> str | None:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer_idx] if layer_types and layer_idx < len(layer_types) else None


def _rope_parameters(config, layer_type: str | None) -> dict | None:
    """The RoPE parameters of a layer type: ``rope_parameters`` itself, or its entry per layer type (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None)
    if not rope:
        return None
    rope = dict(rope)
    if layer_type is not None and isinstance(rope.get(layer_type), dict):
        return dict(rope[layer_type])
    if "rope_type" not in rope and "rope_theta" not in rope:  # nested, but not for this layer type
        return None
    return rope


def _rotary_from_config(config, layer_type: str | None, interleaved: bool, sign: int = 1) -> "RotaryParams | None":
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _rope_parameters(config, layer_type)
    if rope is None:
        return None
    rope_type = rope.get("rope_type", "default")
    _check_static(rope_type)
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
        dim = int(head_dim * factor)
        base = rope["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    else:
        kwargs = (
            {"layer_type": layer_type}
            if layer_type is not None and layer_type in (config.rope_parameters or {})
            else {}
        )
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
    return RotaryParams(sign * inv_freq.float(), 2 * inv_freq.numel(), _describe(config, rope), interleaved)


def _describe(config, rope: dict) -> str:
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = rope.get("rope_type", "default")
    kind = "" if rope_type == "default" else f"rope_type={rope_type!r}, "
    return f"{getattr(config, 'model_type', 'model')} config ({kind}rope_theta={theta})"


def _describe_config(config) -> str:
    return _describe(config, _rope_parameters(config, None) or {})


def uses_rope(config, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` rotates its queries and keys (``no_rope_layers[i] == 0``: SmolLM3's NoPE layers;
    ``rope_parameters[layer_type] is None``; Cohere 2's global layers, recorded in ``MODEL_SPECS``)."""
    from .models import MODEL_SPECS, no_rope_layer_types

    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope is not None and layer_idx < len(no_rope) and not no_rope[layer_idx]:
        return False
    layer_type = _layer_type(config, layer_idx)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and layer_type in rope and rope[layer_type] is None:  # {"full_attention": None}
        return False
    spec = MODEL_SPECS.get(getattr(config, "model_type", None))
    if spec is not None and spec.rope_everywhere_without_window and not getattr(config, "sliding_window", None):
        return True
    return layer_type not in no_rope_layer_types(config)


def rotate_half_convention(rotate_half_fn) -> tuple[bool, int]:
    """How a modeling file's ``rotate_half`` pairs channels and which way it turns: ``(interleaved, sign)``.

    Probed on ``[0, 1, 2, 3]``: halves give ``[-2, -3, 0, 1]``, neighbouring pairs ``[-1, 0, -3, 2]`` (sign ``+1``,
    transformers' convention); the negated outputs (NanoChat's ``cat((x2, -x1))``) turn by ``-angle``: sign ``-1``.
    """
    out = rotate_half_fn(torch.arange(4.0)).tolist()
    for interleaved, expected in ((False, [-2.0, -3.0, 0.0, 1.0]), (True, [-1.0, 0.0, -3.0, 2.0])):
        if out == expected:
            return interleaved, 1
        if out == [-v for v in expected]:
            return interleaved, -1
    raise ValueError(f"unknown rotate_half convention: rotate_half([0, 1, 2, 3]) = {out}")


def _modeling_module(config):
    """The modeling module of ``config``'s causal LM (``None`` when transformers has none)."""
    import sys

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if name is None:
        return None
    import transformers

    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError):
        return None
    return sys.modules.get(cls.__module__)


def _convention_for(config, modeling=None) -> tuple[bool, int]:
    """From the model's own ``rotate_half`` (its modeling file): ``(interleaved, sign)``, see
    :func:`rotate_half_convention`. A model turning by ``-angle`` is modelled with negated frequencies."""
    modeling = modeling if modeling is not None else _modeling_module(config)
    fn = getattr(modeling, "rotate_half", None)
    return rotate_half_convention(fn) if callable(fn) else (False, 1)


def layer_rotaries(config, model: nn.Module | None = None, modeling=None) -> "list[RotaryParams | None]":
    """Each layer's rotary parameters (``None``: a layer without RoPE), docs/design.md §2.3.

    With ``model``, frequencies come from its rotary module's own buffers (``inv_freq``, or ``{layer_type}_inv_freq``
    chosen by ``config.layer_types``); otherwise they are recomputed from ``config``. The pairing convention comes
    from the modeling file's ``rotate_half``.
    """
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if modeling is None and model is not None:
        import sys

        modeling = sys.modules.get(type(model).__module__)
    interleaved, sign = _convention_for(config, modeling)
    buffers = _rotary_buffers(model) if model is not None else {}
    out: list[RotaryParams | None] = []
    for idx in range(config.num_hidden_layers):
        if not uses_rope(config, idx):
            out.append(None)
            continue
        layer_type = _layer_type(config, idx)
        inv_freq = buffers.get(layer_type, buffers.get(None)) if buffers else None
        if inv_freq is not None:
            rope = _rope_parameters(config, layer_type) or {}
            _check_static(rope.get("rope_type", "default"))
            out.append(RotaryParams(sign * inv_freq, 2 * inv_freq.numel(), _describe(config, rope), interleaved))
        else:
            out.append(_rotary_from_config(config, layer_type, interleaved, sign))
    return out


def _rotary_buffers(model: nn.Module) -> dict[str | None, torch.Tensor]:
    """``{layer_type or None: inv_freq}`` from the model's first rotary module (``None``: one for all layers)."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and hasattr(module, "attention_scaling"):
            _check_static(getattr(module, "rope_type", "default"))
            return {None: inv_freq.detach().float()}
        layer_types = getattr(module, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and layer_types:
            found = {t: getattr(module, f"{t}_inv_freq", None) for t in layer_types}
            if all(isinstance(v, torch.Tensor) for v in found.values()):
                return {t: v.detach().float() for t, v in found.items()}
    return {}


def _check_static(rope_type: str) -> None:
    if rope_type in _DYNAMIC_ROPE_TYPES:
        raise ValueError(
            f"rope_type={rope_type!r} changes its frequencies with the sequence length, so cached keys cannot be "
            f"re-positioned exactly; hf_sinks supports static RoPE types (default, linear, llama3, yarn, ...)."
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` for neighbouring pairs ``(x0, x1), (x2, x3), ...`` (Cohere)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def shift_tables(delta: torch.Tensor, rotary: RotaryParams, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``delta * inv_freq`` (angles in fp64), shaped ``delta.shape + (rotary_dim,)``, in ``dtype``."""
    inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float64)
    angles = delta.to(device=device, dtype=torch.float64).unsqueeze(-1) * inv_freq
    if rotary.interleaved:
        angles = angles.repeat_interleave(2, dim=-1)
    else:
        angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_with(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool = False
) -> torch.Tensor:
    """Apply a rotation given its cos/sin tables to the first ``rotary_dim`` channels of ``x``."""
    compute = cos.dtype
    xr = x[..., :rotary_dim].to(compute)
    rotated = (xr * cos + (rotate_pairs(xr) if interleaved else rotate_half(xr)) * sin).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def shift_rotary(x: torch.Tensor, delta: torch.Tensor, rotary: RotaryParams | None) -> torch.Tensor:
    """Move rotated vectors ``x`` by ``delta`` positions (``R(p) x -> R(p + delta) x``).

    Args:
        x: ``[..., n, head_dim]`` keys or queries, already rotated by the model.
        delta: integer shifts broadcastable to ``x.shape[:-1]`` (e.g. ``[B, 1, n]``).
        rotary: the layer's rotary parameters (``None``: a layer without RoPE, returned unchanged).

    The angle ``delta * inv_freq`` is formed in fp64 so shifts stay exact for any ``delta``; the rotation itself runs
    in fp32 (or the input dtype if wider) and the result is cast back.
    """
    if rotary is None:
        return x
    cos, sin = shift_tables(delta, rotary, x.device, torch.promote_types(x.dtype, torch.float32))
    return rotate_with(x, cos, sin, rotary.rotary_dim, rotary.interleaved)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary: RotaryParams | None) -> torch.Tensor:
    """Rotate raw vectors to absolute ``positions`` (used by the fp64 reference; same maths as :func:`shift_rotary`)."""
    return shift_rotary(x, positions, rotary)
