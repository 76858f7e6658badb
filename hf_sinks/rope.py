"""Rotary-embedding helpers shared by the cache and the attention functions.

All four supported families use the ``rotate_half`` convention on the first ``rotary_dim`` channels of each head
(GPT-NeoX rotates only ``partial_rotary_factor`` of them). hf_sinks never re-applies a model's RoPE from scratch: it
only *shifts* already-rotated keys or queries by a small integer number of positions, computing the angles in fp64
so a shift is exact whatever position the stream has reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .validation import SinkTypeError

# RoPE types whose frequencies depend on the current sequence length: a cached key cannot be shifted exactly.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")
_SUPPORTED = "hf_sinks supports the RoPE model types falcon (rotary), gpt_neox, llama, mistral"


@dataclass(frozen=True)
class RotaryParams:
    """The inverse frequencies a model rotates with, and how many channels of a head they cover."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], fp32, exactly the model's buffer when taken from the model
    rotary_dim: int
    source: str = field(default="", compare=False)  # where the parameters came from, for error messages

    def matches(self, other: "RotaryParams") -> bool:
        """Same rotation (to fp32 rounding of the frequencies)."""
        return self.rotary_dim == other.rotary_dim and torch.allclose(
            self.inv_freq.double().cpu(), other.inv_freq.double().cpu(), rtol=1e-5, atol=0
        )

    def describe(self) -> str:
        """E.g. ``rope_theta=10000.0 (rotary_dim=64, inv_freq[1]=0.749894)``, for error messages."""
        first = f", inv_freq[1]={float(self.inv_freq[1]):.6g}" if self.inv_freq.numel() > 1 else ""
        return f"{self.source or 'rotary'} (rotary_dim={self.rotary_dim}{first})"

    @classmethod
    def from_model(cls, model: nn.Module) -> "RotaryParams":
        """Take the model's own rotary buffer (exact even if the model was cast)."""
        for module in model.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor) and hasattr(module, "attention_scaling"):
                _check_static(getattr(module, "rope_type", "default"))
                return cls(inv_freq.detach().float(), 2 * inv_freq.numel(), _describe_config(model.config))
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (no `inv_freq` buffer).")

    @classmethod
    def from_config(cls, config) -> "RotaryParams":
        """Recompute the frequencies from a transformers config (what the model's rotary module does at init)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
            raise SinkTypeError(
                f"config must be a transformers PretrainedConfig (e.g. model.config), got {type(config).__name__}."
            )
        model_type = getattr(config, "model_type", None)
        rope = getattr(config, "rope_parameters", None) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config.rope_parameters={rope!r} (model_type={model_type!r}) is not a dict of RoPE settings.")
        rope = dict(rope)
        if getattr(config, "alibi", False):
            raise ValueError(
                f"{type(config).__name__} (model_type={model_type!r}) has alibi=True: ALiBi models have no rotary "
                f"embedding to re-position sinks with; {_SUPPORTED}."
            )
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default" and "rope_theta" not in rope:
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
        if rope_type == "default":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
            base = rope["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        else:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        return cls(inv_freq.float(), 2 * inv_freq.numel(), _describe_config(config))


def _describe_config(config) -> str:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = rope.get("rope_type", "default")
    kind = "" if rope_type == "default" else f"rope_type={rope_type!r}, "
    return f"{getattr(config, 'model_type', 'model')} config ({kind}rope_theta={theta})"


def _check_static(rope_type: str) -> None:
    if rope_type in _DYNAMIC_ROPE_TYPES:
        raise ValueError(
            f"rope_type={rope_type!r} changes its frequencies with the sequence length, so cached keys cannot be "
            f"re-positioned exactly; hf_sinks supports static RoPE types (default, linear, llama3, yarn, ...)."
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def shift_tables(delta: torch.Tensor, rotary: RotaryParams, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``delta * inv_freq`` (angles in fp64), shaped ``delta.shape + (rotary_dim,)``, in ``dtype``."""
    inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float64)
    angles = delta.to(device=device, dtype=torch.float64).unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_with(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Apply a rotation given its cos/sin tables to the first ``rotary_dim`` channels of ``x``."""
    compute = cos.dtype
    xr = x[..., :rotary_dim].to(compute)
    rotated = (xr * cos + rotate_half(xr) * sin).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def shift_rotary(x: torch.Tensor, delta: torch.Tensor, rotary: RotaryParams) -> torch.Tensor:
    """Move rotated vectors ``x`` by ``delta`` positions (``R(p) x -> R(p + delta) x``).

    Args:
        x: ``[..., n, head_dim]`` keys or queries, already rotated by the model.
        delta: integer shifts broadcastable to ``x.shape[:-1]`` (e.g. ``[B, 1, n]``).
        rotary: the model's rotary parameters.

    The angle ``delta * inv_freq`` is formed in fp64 so shifts stay exact for any ``delta``; the rotation itself runs
    in fp32 (or the input dtype if wider) and the result is cast back.
    """
    cos, sin = shift_tables(delta, rotary, x.device, torch.promote_types(x.dtype, torch.float32))
    return rotate_with(x, cos, sin, rotary.rotary_dim)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary: RotaryParams) -> torch.Tensor:
    """Rotate raw vectors to absolute ``positions`` (used by the fp64 reference; same maths as :func:`shift_rotary`)."""
    return shift_rotary(x, positions, rotary)
