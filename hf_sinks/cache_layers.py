"""Machinery shared by the cache layers of :class:`~hf_sinks.SinkCache`, :class:`~hf_sinks.H2OCache` and
:class:`~hf_sinks.DuoCache`: per-row state and how an attention function finds the layer it attends with.

* :class:`RowStateLayer`: a cache layer whose per-row state is a list of batch-first tensors, so beam search and batch
  expansion/selection map them all and ``reset`` drops them; it counts the tokens seen and refuses a forward whose
  attention left the previous one pending (:meth:`RowStateLayer.refuse_unattended_pending`).
* :func:`refuse_crop`: the error of an evicting cache asked to crop (assisted decoding).
* :func:`grow_layers`: the layer ``update`` writes to, created on first use.
* :func:`tag_keys` / :func:`layer_of`: ``update`` returns the key tensor tagged with its layer (one attribute,
  ``key._hf_sinks_layer``); the registered attention asks for a layer of *its* type and gets ``None`` for any other
  (no cache, a ``DynamicCache``, or another method's cache), where it behaves like the stock attention.

The argument checks every cache shares (batch size, layer shape, layers in step) are in :mod:`hf_sinks.validation`.
"""

from __future__ import annotations

from typing import Callable, NoReturn, TypeVar

import torch
from transformers.cache_utils import CacheLayerMixin

#: Attribute set on the key tensor returned by ``update`` so the attention function can find the layer.
LAYER_ATTRIBUTE = "_hf_sinks_layer"

Layer = TypeVar("Layer")


class RowStateLayer(CacheLayerMixin):
    """Cache layer whose per-row state is the tensors named in ``_ROW_STATE`` (batch first): beam search and batch
    expansion/selection map those rows (``_map_rows``; a subclass extends it for more state) and :meth:`reset` drops
    them. ``seen`` counts the tokens written so far; ``pending`` is the forward in flight until its attention has
    consumed it (``None``: nothing pending)."""

    _ROW_STATE: tuple[str, ...] = ()
    seen: int  # set by the subclass's __init__
    pending: object

    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        """Forget every token; the row state is allocated again by the next ``update``."""
        for name in self._ROW_STATE:
            setattr(self, name, None)
        self.is_initialized = False
        self.seen = 0
        self.pending = None

    def refuse_unattended_pending(self, cache_name: str, attention: str, package: str, missed: str) -> None:
        """Raise when the previous forward's attention did not consume its update (``missed``: what it did not do),
        i.e. the model runs a stock attention instead of ``attention`` (registered by ``hf_sinks.<package>``)."""
        if self.pending is not None:
            raise ValueError(
                f"{cache_name} needs attn_implementation={attention!r}: the previous forward's attention did not "
                f"{missed}. Call hf_sinks.{package}.register() and load the model with "
                f"attn_implementation={attention!r} (or model.set_attn_implementation({attention!r})). If the previous "
                f"forward failed instead, call cache.reset()."
            )

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


def refuse_crop(cache_name: str, evicted: str = "tokens") -> NoReturn:
    """The error of an evicting cache (or one of its layers) asked to ``crop``: assisted decoding needs it."""
    raise NotImplementedError(
        f"{cache_name} evicts {evicted}; it cannot be cropped (assisted decoding is unsupported)."
    )


def grow_layers(layers: list, layer_idx: int, make_layer: Callable[[int], Layer]) -> Layer:
    """``layers[layer_idx]``, first appending ``make_layer(i)`` for every missing index ``i`` up to it."""
    while len(layers) <= layer_idx:
        layers.append(make_layer(len(layers)))
    return layers[layer_idx]


def tag_keys(keys: torch.Tensor, layer: object) -> torch.Tensor:
    """Tag the key tensor ``update`` returns with the layer that produced it; returns ``keys``."""
    setattr(keys, LAYER_ATTRIBUTE, layer)
    return keys


def layer_of(key: torch.Tensor, layer_type: type[Layer]) -> Layer | None:
    """The cache layer of type ``layer_type`` that produced ``key``, or ``None`` (no such cache in this forward)."""
    layer = getattr(key, LAYER_ATTRIBUTE, None)
    return layer if isinstance(layer, layer_type) else None


__all__ = ["LAYER_ATTRIBUTE", "RowStateLayer", "grow_layers", "layer_of", "refuse_crop", "tag_keys"]
