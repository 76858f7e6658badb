"""Switching a model's attention for a while: :func:`use_attention` and :func:`routed_through_interface`.

transformers reads ``config._attn_implementation`` at every forward, so a model can run a registered attention
(``sink_sdpa``, ``h2o_sdpa``, ``duo_sdpa``, a test reference, ...) for the duration of a ``with`` block and get its
own back afterwards. A model that bypasses ``AttentionInterface`` (Falcon where its attention does not call it,
before 5.25; docs/design.md §5.5) reads that name only once patched: ``route=True`` (or
:func:`routed_through_interface`) patches it for the block unless it already is. The route is the model's
``get_spec(config).route``, so a Falcon that calls the interface itself is left as it is.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import torch


@contextmanager
def routed_through_interface(model: torch.nn.Module):
    """Patch a model that bypasses ``AttentionInterface`` (route ``"patch"``) for the duration, unless it already is.

    A model routed through the interface is left as it is; an unsupported ``model_type`` is a ``ValueError``.
    """
    from ..models import get_spec

    spec = get_spec(model.config)
    undo = None
    if spec.route == "patch":
        patch = importlib.import_module(f"hf_sinks.patches.{spec.model_type}")
        if not patch.is_patched(model):
            undo = patch.patch_model(model)
    try:
        yield
    finally:
        if undo is not None:
            undo()


@contextmanager
def use_attention(model: torch.nn.Module, name: str, *, route: bool = False):
    """Run ``model`` with attention implementation ``name`` for the duration; the previous one is restored.

    Args:
        model: a transformers model.
        name: a registered ``attn_implementation`` (``"sdpa"``, ``"eager"``, ``"sink_sdpa"``, ``"h2o_sdpa"``, ...).
        route: also patch a model that bypasses ``AttentionInterface`` (:func:`routed_through_interface`); needs a
            supported ``model_type``.
    """
    if route:
        with routed_through_interface(model), use_attention(model, name):
            yield
        return
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


__all__ = ["routed_through_interface", "use_attention"]
