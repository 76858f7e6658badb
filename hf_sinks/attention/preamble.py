"""The preamble every registered attention of hf_sinks runs before its own work, written once.

All of them (``sink_*``, ``sink_s2attn`` / ``sink_sfattn``, ``h2o_sdpa``, ``duo_sdpa`` / ``duo_gate``) share the
same opening and closing:

* find the cache layer of *their* type from the key tensor (:func:`~hf_sinks.cache_layers.layer_of`); without one
  they are exactly the stock attention (:func:`stock_sdpa`: transformers' ``sdpa`` on the dense mask);
* refuse what they cannot do with a clear error naming the cache and the bad value (:func:`refuse_padding`,
  :func:`refuse_dropout`);
* the default softmax scale ``head_dim ** -0.5`` (:func:`default_scaling`);
* hand the output back in the model's layout ``[B, q, H, D]`` (:func:`to_model_layout`).

:func:`cache_attention` puts these together for the inference caches that refuse padding and dropout
(:class:`~hf_sinks.H2OCache`, :class:`~hf_sinks.DuoCache`); the ``sink_*`` closure
(:func:`hf_sinks.attention.functions.make_sink_attention_forward`) and the training attentions use the pieces.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..cache_layers import layer_of
from .masks import new_token_validity, stock_mask


def default_scaling(query: torch.Tensor, scaling: float | None) -> float:
    """``scaling``, or the default softmax scale ``head_dim ** -0.5`` of ``query`` ``[B, H, q, D]``."""
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def to_model_layout(out: torch.Tensor) -> torch.Tensor:
    """An attention output ``[B, H, q, D]`` in the layout transformers expects back, ``[B, q, H, D]`` contiguous."""
    return out.transpose(1, 2).contiguous()


def stock_sdpa(module: torch.nn.Module, query, key, value, attention_mask: Any, **kwargs: Any):
    """Exactly transformers' ``sdpa`` (a lazy sink mask materialised as the stock dense mask; ``dropout``,
    ``scaling`` and the rest passed on): an hf_sinks attention without its cache."""
    return sdpa_attention_forward(module, query, key, value, stock_mask(attention_mask), **kwargs)


def refuse_padding(attention_mask: Any, query: torch.Tensor, what: str, on_error: Callable[[], None] | None = None):
    """Raise a ``ValueError`` naming ``what`` when the mask pads the new tokens (``on_error`` runs first)."""
    if new_token_validity(attention_mask, query.shape[2]) is not None:
        if on_error is not None:
            on_error()
        raise ValueError(f"{what} does not support padded batches (the attention mask has padding).")


def refuse_dropout(dropout: float, what: str, instead: str = "it is inference only") -> None:
    """Raise a ``ValueError`` naming ``what`` and the value when ``dropout > 0`` (``instead``: what to do)."""
    if dropout > 0:
        raise ValueError(f"{what} does not support attention dropout (dropout={dropout}); {instead}.")


def cache_attention(layer_type: type, what: str, on_padding: Callable[[Any], None] | None = None):
    """Decorate ``body(module, query, key, layer, scaling) -> [B, H, q, D]`` into an ``AttentionInterface``
    function: stock SDPA without a ``layer_type`` layer; with one, padding and dropout refused (naming ``what``,
    e.g. ``"H2OCache"``; ``on_padding(layer)`` runs before that error), the default scaling, the model's layout."""

    def decorate(body: Callable) -> Callable:
        @functools.wraps(body, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
        def attention(
            module: torch.nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: Any,
            dropout: float = 0.0,
            scaling: float | None = None,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, None]:
            layer = layer_of(key, layer_type)
            if layer is None:
                return stock_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
            refuse_padding(attention_mask, query, what, None if on_padding is None else lambda: on_padding(layer))
            refuse_dropout(dropout, what)
            out = body(module, query, key, layer, default_scaling(query, scaling))
            return to_model_layout(out), None

        del attention.__wrapped__  # the signature is the AttentionInterface one, not body's
        return attention

    return decorate


__all__ = [
    "cache_attention",
    "default_scaling",
    "refuse_dropout",
    "refuse_padding",
    "stock_sdpa",
    "to_model_layout",
]
