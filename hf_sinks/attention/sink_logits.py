"""Learned per-head sink logits (gpt-oss style) on an attention module: where they live and how they are read.

Unrelated to sink *tokens* (docs/design.md §2.4): one extra logit ``b_h`` per head joins every softmax
denominator with no value attached, ``out = (sum_j e^{s_j} v_j) / (sum_j e^{s_j} + e^{b_h})``. An attention module
carries them as ``module.sink_logits``: a ``[num_heads]`` tensor/parameter, or a module whose call returns one
(``hf_sinks.training.AttentionSinkLogits``; a module survives PEFT's ``modules_to_save`` wrapping, whose wrapper
dispatches the call to the trained copy). Every ``sink_*`` attention reads them through :func:`sink_logits_of`.
"""

from __future__ import annotations

import torch

#: Attribute of an attention module holding optional learned per-head sink logits.
SINK_LOGITS_ATTRIBUTE = "sink_logits"


def sink_logits_of(module: torch.nn.Module, num_heads: int) -> torch.Tensor | None:
    """``module.sink_logits`` as a ``[num_heads]`` tensor (a module is called), or ``None`` when there are none.

    Raises:
        ValueError: the attribute is set but is not a ``[num_heads]`` tensor.
    """
    logits = getattr(module, SINK_LOGITS_ATTRIBUTE, None)
    if logits is None:
        return None
    if isinstance(logits, torch.nn.Module):
        logits = logits()
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (num_heads,):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"{type(module).__name__}.{SINK_LOGITS_ATTRIBUTE} must be a [{num_heads}] tensor, got {shape}."
        )
    return logits


__all__ = ["SINK_LOGITS_ATTRIBUTE", "sink_logits_of"]
