"""Mask functions registered next to the sink attention functions (``AttentionMaskInterface``).

transformers builds one mask per forward, before any layer runs, from the cache's ``get_mask_sizes``. With a
``SinkCache`` the true visibility depends on per-slot bookkeeping the mask builder cannot see, so the sink mask
functions return a lazy :class:`SinkMask`: the sink attention functions read only its 2D padding mask and build
visibility from the cache layer, and the dense mask of the stock builder is materialised only when the attention
falls back to the stock path (no ``SinkCache``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.masking_utils import eager_mask, sdpa_mask


class SinkMask:
    """The mask a ``sink_*`` attention function receives: the 2D padding mask plus a lazily built dense mask."""

    def __init__(self, builder: Callable[..., Any], kwargs: dict[str, Any]):
        self._builder = builder
        self._kwargs = kwargs
        self._dense: Any = None
        self._built = False
        self.padding_mask: torch.Tensor | None = kwargs.get("attention_mask")  # [B, seen + q] bool, True = real

    def dense(self) -> Any:
        """The mask transformers' own builder would have produced (4D tensor or ``None``)."""
        if not self._built:
            self._dense, self._built = self._builder(**self._kwargs), True
        return self._dense

    def new_token_validity(self, q: int) -> torch.Tensor | None:
        """``[B, q]`` bool: which of the ``q`` current tokens are real (``None`` means all)."""
        if self.padding_mask is None:
            return None
        valid = self.padding_mask[:, -q:]
        return None if bool(valid.all()) else valid

    # generate() precomputes masks for compileable caches (never a SinkCache) and calls .contiguous(): hand over
    # the dense mask, which the model then treats as already prepared.
    def contiguous(self) -> Any:
        dense = self.dense()
        return dense.contiguous() if dense is not None else None

    @property
    def shape(self) -> torch.Size:
        dense = self.dense()
        return dense.shape if dense is not None else torch.Size()


def dense_mask(attention_mask: Any) -> Any:
    """What a stock attention function expects: the dense mask behind a :class:`SinkMask`, anything else as is."""
    return attention_mask.dense() if isinstance(attention_mask, SinkMask) else attention_mask


def sink_sdpa_mask(**kwargs: Any) -> SinkMask:
    return SinkMask(sdpa_mask, kwargs)


def sink_eager_mask(**kwargs: Any) -> SinkMask:
    return SinkMask(eager_mask, kwargs)


def validity_from_mask(attention_mask: Any, q: int) -> torch.Tensor | None:
    """Padding of the current tokens from whatever mask the attention function was handed."""
    if isinstance(attention_mask, SinkMask):
        return attention_mask.new_token_validity(q)
    return None  # a user-supplied 4D mask or no mask: nothing is known about padding
