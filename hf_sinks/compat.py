"""The one place where differences between transformers releases live (docs/design.md §6).

hf_sinks supports transformers 5.23 and every newer 5.x release, and CI tests the oldest and the newest. Everything
else in the package asks this module instead of reading renamed or private names itself. Differences are detected
from what the installed transformers *has* (signatures, attributes), never from its version string.

Known differences:

* **the cache keyword.** 5.23 passes the cache to models and ``generate`` as ``past_key_values``; 5.24 renamed it to
  ``cache`` (``past_key_values`` still works there, with a ``FutureWarning`` and a logged deprecation, and model
  outputs expose ``.cache``). Use :data:`CACHE_KWARG`, :func:`cache_kwargs`, :func:`cache_from_kwargs` and
  :func:`output_cache`.
* **activation checkpointing.** 5.24 renamed ``gradient_checkpointing`` (a ``TrainingArguments`` field and
  ``model.gradient_checkpointing_enable``) to ``activation_checkpointing``; the old names warn. Use
  :func:`checkpointing_training_args` and :func:`enable_activation_checkpointing`.
* **compiling ``generate`` off CUDA.** ``generate`` compiles the decode step of a compileable cache on accelerators
  only; ``CompileConfig._compile_all_devices`` (a private flag, present in 5.23 and 5.24) extends it to every device.
  Use :func:`generate_compile_config`.
* **mask objects.** 5.24 probes whatever a mask function returned (``.ndim``, ``.shape``): the ``sink_*`` mask
  functions therefore return plain tensors (see :mod:`hf_sinks.attention.masks`), never objects imitating one.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import transformers


def _cache_keyword() -> str:
    # Every causal LM of one transformers release uses the same name; Llama's signature is the reference.
    parameters = inspect.signature(transformers.LlamaModel.forward).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    raise RuntimeError(  # a future rename: better a clear error than silently streaming with no cache
        "hf_sinks cannot tell how this transformers release passes the KV cache to a model (LlamaModel.forward has "
        f"neither `cache` nor `past_key_values`; transformers {transformers.__version__}). Please report it."
    )


#: The keyword under which this transformers release passes a ``Cache`` to ``forward`` and ``generate``.
CACHE_KWARG: str = _cache_keyword()

#: Every keyword a cache may arrive under (the current one first).
CACHE_KWARGS: tuple[str, ...] = tuple(dict.fromkeys((CACHE_KWARG, "past_key_values", "cache")))


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{CACHE_KWARG: cache}``: pass a cache to ``model(...)`` or ``model.generate(...)`` without a deprecation.

    Example::

        out = model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
    """
    return {CACHE_KWARG: cache}


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward's keyword arguments, whichever name the caller used (``None`` if absent)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_kwarg_in(kwargs: dict[str, Any]) -> str:
    """The keyword to store a cache under in ``kwargs``: the one the caller already used, else :data:`CACHE_KWARG`."""
    for name in CACHE_KWARGS:
        if name in kwargs:
            return name
    return CACHE_KWARG


def output_cache(outputs: Any) -> Any:
    """The cache returned in a model or ``generate`` output (``.cache`` or ``.past_key_values``), without a warning."""
    return getattr(outputs, CACHE_KWARG, None)


def _training_arguments_has(name: str) -> bool:
    from transformers import TrainingArguments

    return name in {f.name for f in dataclasses.fields(TrainingArguments)}


def checkpointing_training_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` for ``TrainingArguments`` with activation checkpointing under the name this release uses.

    Accepts either spelling (``gradient_checkpointing[_kwargs]`` or ``activation_checkpointing[_kwargs]``); a
    ``False`` flag is dropped (it is the default), so nothing deprecated is passed on any release.
    """
    out = dict(args)
    new = _training_arguments_has("activation_checkpointing")
    flag, kwargs = ("activation_checkpointing", "activation_checkpointing_kwargs")
    old_flag, old_kwargs = ("gradient_checkpointing", "gradient_checkpointing_kwargs")
    if not new:
        flag, kwargs, old_flag, old_kwargs = old_flag, old_kwargs, flag, kwargs
    if old_flag in out:
        out.setdefault(flag, out.pop(old_flag))
    if old_kwargs in out:
        out.setdefault(kwargs, out.pop(old_kwargs))
    if not out.get(flag):
        out.pop(flag, None)
        out.pop(kwargs, None)
    return out


def checkpointing_kwargs_name() -> str:
    """The ``TrainingArguments`` field holding the checkpointing keyword arguments on this release."""
    return (
        "activation_checkpointing_kwargs"
        if _training_arguments_has("activation_checkpointing")
        else ("gradient_checkpointing_kwargs")
    )


def enable_activation_checkpointing(model: Any, **checkpoint_kwargs: Any) -> None:
    """``model.activation_checkpointing_enable`` (5.24+) or ``gradient_checkpointing_enable`` (5.23)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


def generate_compile_config(device: Any) -> Any:
    """A ``CompileConfig`` with which ``generate`` compiles the one-token decode step (``fullgraph=True``).

    On CUDA this is transformers' own path with its default mode (CUDA graphs). Elsewhere ``generate`` would skip
    compilation, so the config sets the private ``_compile_all_devices`` flag (checked for, not assumed) and the
    plain inductor mode (CUDA graphs do not exist there).

    Raises:
        RuntimeError: this transformers release has no way to make ``generate`` compile on ``device``.
    """
    import torch
    from transformers import CompileConfig

    device = torch.device(device)
    if device.type == "cuda":
        return CompileConfig(fullgraph=True, dynamic=False)
    if not hasattr(CompileConfig, "_compile_all_devices"):
        raise RuntimeError(
            f"transformers {transformers.__version__} compiles generate's decode step only on accelerators (its "
            f"CompileConfig has no `_compile_all_devices` flag); compile on {device.type} by hand: "
            "step = torch.compile(model.forward, fullgraph=True) with a hf_sinks.StaticSinkCache."
        )
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True
    return config
