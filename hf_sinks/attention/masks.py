"""Mask functions registered next to the sink attention functions (``AttentionMaskInterface``).

transformers builds one mask per forward, before any layer runs, and may probe or copy what the mask function
returned (``.ndim``, ``.shape``, ``.contiguous()``). The ``sink_*`` mask functions therefore return exactly what
transformers' own builder returns (a tensor, a ``BlockMask`` or ``None``), with the 2D padding mask attached as an
attribute. Two consumers read it:

* with a :class:`~hf_sinks.cache.SinkCache`, the sink attention functions need only the padding of the *new* tokens
  (:func:`new_token_validity`); visibility comes from the cache's per-slot bookkeeping;
* without one, they fall back to the stock implementation with the stock mask (:func:`stock_mask`).

A prompt far longer than the cache would make the dense mask huge (``q x (stored + q)``) although a SinkCache
never needs it, so above :data:`DENSE_MASK_LIMIT` elements the mask function returns the compact key-padding mask
``[B, 1, 1, kv]`` instead and builds the dense one only if a stock fallback asks for it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.masking_utils import eager_mask, sdpa_mask

from ..compat import flex_attention_mask  # transformers' builder, without torch's deprecated `_compile` flag

#: Above this many mask elements (batch x queries x keys) the dense mask is built only on demand.
DENSE_MASK_LIMIT = 1 << 24

_PADDING = "_hf_sinks_padding"  # the 2D padding mask ([B, seen + q] bool, True = real token) the mask was built from
_DEFERRED = "_hf_sinks_deferred"  # (builder, kwargs) of a compact mask whose dense form was not built


def _sink_mask_function(builder: Callable[..., Any]) -> Callable[..., Any]:
    def mask_function(**kwargs: Any) -> Any:
        batch, q, kv = kwargs["batch_size"], kwargs["q_length"], kwargs["kv_length"]
        padding = kwargs.get("attention_mask")
        if isinstance(padding, torch.Tensor) and padding.dim() != 2:
            padding = None
        if q == 1 or batch * q * kv <= DENSE_MASK_LIMIT:
            mask = builder(**kwargs)
        else:
            device = kwargs.get("device") or (padding.device if padding is not None else None)
            if padding is None:
                mask = torch.ones(batch, 1, 1, kv, dtype=torch.bool, device=device)
            else:
                keys = padding[:, -kv:].to(device=device, dtype=torch.bool)
                keys = torch.nn.functional.pad(keys, (kv - keys.shape[-1], 0), value=True)  # a mask shorter than kv
                mask = keys[:, None, None, :].clone()
            setattr(mask, _DEFERRED, (builder, kwargs))
        if mask is not None:
            setattr(mask, _PADDING, padding)  # present even when None: marks a mask built by hf_sinks
        return mask

    mask_function.__name__ = mask_function.__qualname__ = f"sink_{builder.__name__}"
    mask_function.__doc__ = f"{builder.__name__} for the sink_* attentions (see hf_sinks.attention.masks)."
    return mask_function


sink_sdpa_mask = _sink_mask_function(sdpa_mask)
sink_eager_mask = _sink_mask_function(eager_mask)
sink_flex_mask = _sink_mask_function(flex_attention_mask)


def stock_mask(attention_mask: Any) -> Any:
    """The mask transformers' own builder would have produced for a stock attention function."""
    deferred = getattr(attention_mask, _DEFERRED, None)
    if deferred is not None:
        builder, kwargs = deferred
        return builder(**kwargs)
    return attention_mask


def is_sink_mask(attention_mask: Any) -> bool:
    """Whether ``attention_mask`` was built by a ``sink_*`` mask function (and so carries its padding mask)."""
    return hasattr(attention_mask, _PADDING)


def new_token_validity(attention_mask: Any, q: int) -> torch.Tensor | None:
    """``[B, q]`` bool: which of the ``q`` current tokens are real (``None``: all of them, or nothing is known).

    Read from the padding mask attached by the sink mask functions; for a dense mask that lost it (copied by
    transformers), from its diagonal: a token always sees itself unless it is padding.
    """
    padding = getattr(attention_mask, _PADDING, None)
    if not is_sink_mask(attention_mask) and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        if attention_mask.shape[-2] == 1:  # compact (or a decode mask): the key padding itself
            padding = attention_mask[:, 0, 0, :]
        elif attention_mask.shape[-2] == q:
            rows = torch.arange(q, device=attention_mask.device)
            diagonal = attention_mask[:, 0, rows, attention_mask.shape[-1] - q + rows]
            floating = diagonal.is_floating_point()
            padding = diagonal > torch.finfo(diagonal.dtype).min / 2 if floating else diagonal.bool()
    if padding is None:
        return None
    valid = padding[:, -q:].bool()
    return None if bool(valid.all()) else valid
