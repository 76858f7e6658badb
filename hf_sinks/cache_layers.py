"""Machinery shared by the cache layers of :class:`~hf_sinks.SinkCache`, :class:`~hf_sinks.H2OCache` and
:class:`~hf_sinks.DuoCache`: per-row state and how an attention function finds the layer it attends with.

* :class:`RowStateLayer`: a cache layer whose per-row state is a list of batch-first tensors, so beam search and batch
  expansion/selection map them all.
* :func:`tag_keys` / :func:`layer_of`: ``update`` returns the key tensor tagged with its layer (one attribute,
  ``key._hf_sinks_layer``); the registered attention asks for a layer of *its* type and gets ``None`` for any other
  (no cache, a ``DynamicCache``, or another method's cache), where it behaves like the stock attention.

The argument checks every cache shares (batch size, layer shape, layers in step) are in :mod:`hf_sinks.validation`.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from transformers.cache_utils import CacheLayerMixin

#: Attribute set on the key tensor returned by ``update`` so the attention function can find the layer.
LAYER_ATTRIBUTE = "_hf_sinks_layer"

Layer = TypeVar("Layer")


class RowStateLayer(CacheLayerMixin):
    """Cache layer whose per-row state is the tensors named in ``_ROW_STATE`` (batch first): beam search and batch
    expansion/selection map those rows (``_map_rows``; a subclass extends it for more state)."""

    _ROW_STATE: tuple[str, ...] = ()

    def _map_rows(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in self._ROW_STATE:
            setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])


def tag_keys(keys: torch.Tensor, layer: object) -> torch.Tensor:
    """Tag the key tensor ``update`` returns with the layer that produced it; returns ``keys``."""
    setattr(keys, LAYER_ATTRIBUTE, layer)
    return keys


def layer_of(key: torch.Tensor, layer_type: type[Layer]) -> Layer | None:
    """The cache layer of type ``layer_type`` that produced ``key``, or ``None`` (no such cache in this forward)."""
    layer = getattr(key, LAYER_ATTRIBUTE, None)
    return layer if isinstance(layer, layer_type) else None


__all__ = ["LAYER_ATTRIBUTE", "RowStateLayer", "layer_of", "tag_keys"]
