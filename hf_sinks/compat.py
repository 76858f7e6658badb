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
* **Falcon's attention.** 5.23's ``FalconAttention`` hard-codes sdpa/eager and takes the ALiBi bias as an argument
  (the classes come from ``FALCON_ATTENTION_CLASSES``), so hf_sinks patches it; 5.25's calls ``ALL_ATTENTION_FUNCTIONS``
  itself and gets ALiBi through the mask, so Falcon takes the generic route. Use
  :func:`falcon_calls_attention_interface`.
* **the old cache keyword.** Where ``cache`` is the name, ``past_key_values`` is deprecated: a wrapper in front of
  transformers' ``generate`` would be the frame its ``FutureWarning`` blames, so hf_sinks' ``generate`` wrapper
  renames it and warns at the caller's line. Use :data:`DEPRECATED_CACHE_KWARGS` and :func:`deprecated_cache_kwarg`.
* **flex masks.** transformers' ``flex_attention_mask`` (5.23-5.25) calls ``create_block_mask(..., _compile=True)``,
  a flag torch deprecates (2.6+) in favour of ``torch.compile(create_block_mask)``. Use :func:`flex_attention_mask`.
* **mask objects.** 5.24 probes whatever a mask function returned (``.ndim``, ``.shape``): the ``sink_*`` mask
  functions therefore return plain tensors (see :mod:`hf_sinks.attention.masks`), never objects imitating one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

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


def falcon_calls_attention_interface() -> bool:
    """Whether this release's ``FalconAttention.forward`` calls ``ALL_ATTENTION_FUNCTIONS`` itself (5.25+).

    Then Falcon streams through the registered ``sink_*`` functions like Llama and needs no patch; otherwise
    ``hf_sinks.patches.falcon`` replaces the forward per instance. Falcon's class does not set
    ``_supports_attention_backend`` even where it calls the interface (5.25), so that flag counts only when set; the
    deciding feature is the forward's own code: the names its bytecode uses (``co_names``), which every install has,
    unlike the module source that transformers' ``_can_set_attn_implementation`` heuristic reads.
    """
    from transformers.models.falcon import modeling_falcon

    if getattr(modeling_falcon.FalconPreTrainedModel, "_supports_attention_backend", False):
        return True
    forward = inspect.unwrap(modeling_falcon.FalconAttention.forward)  # through decorators that keep __wrapped__
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


# ------------------------------------------------------------------------------------- the deprecated cache keyword
#: Cache keywords this release still accepts but deprecates: ``past_key_values`` wherever ``cache`` is the name.
DEPRECATED_CACHE_KWARGS: tuple[str, ...] = tuple(name for name in ("past_key_values",) if name != CACHE_KWARG)


def deprecated_cache_kwarg(kwargs: dict[str, Any]) -> str | None:
    """The keyword in ``kwargs`` under which the caller passed the cache and that this release deprecates, if any."""
    return next((name for name in DEPRECATED_CACHE_KWARGS if name in kwargs), None)


# ------------------------------------------------------------------------------------------------- flex masks
def _passes_keyword(function: Any, keyword: str) -> bool:
    """Whether ``function``'s own code passes ``keyword=`` to some call: the keyword names of a call are a tuple
    constant of the code object (``co_consts``) on every supported Python, whether or not the source is installed."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    return code is not None and any(isinstance(c, tuple) and keyword in c for c in code.co_consts)


def create_block_mask_deprecates_compile_flag() -> bool:
    """Whether torch's ``create_block_mask`` deprecates (or no longer has) its ``_compile`` flag.

    The flag was torch 2.5's only way to compile the mask builder; later releases warn when it is set and ask for
    ``torch.compile(create_block_mask)`` instead. Read from the function itself: its signature, and whether its code
    raises a ``DeprecationWarning`` (the flag's is its only one).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if "_compile" not in inspect.signature(create_block_mask).parameters:
        return True
    code = getattr(inspect.unwrap(create_block_mask), "__code__", None)
    return code is not None and "DeprecationWarning" in code.co_names


@functools.cache
def _flex_mask_avoids_compile_flag() -> bool:
    # transformers' builder passes `_compile=True` (5.23-5.25), and torch deprecates it: build the mask here instead
    from transformers.masking_utils import flex_attention_mask as stock

    return _passes_keyword(stock, "_compile") and create_block_mask_deprecates_compile_flag()


@functools.cache
def _compiled_create_block_mask() -> Callable[..., Any]:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)  # what `_compile=True` itself does on the torch releases that deprecate it


def flex_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: Any = None,
    device: Any = "cpu",
    **kwargs: Any,
) -> Any:
    """transformers' ``masking_utils.flex_attention_mask`` (same arguments, same ``BlockMask``), minus the deprecation.

    transformers builds the mask with ``create_block_mask(..., _compile=True)``, which newer torch deprecates (one
    ``DeprecationWarning`` per flex forward). Where both hold (:func:`create_block_mask_deprecates_compile_flag`),
    this builds the same mask through ``torch.compile(create_block_mask)``, the call torch asks for; elsewhere it is
    transformers' own builder.
    """
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if not _flex_mask_avoids_compile_flag():
        return mu.flex_attention_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device, **kwargs
        )
    # transformers' flex_attention_mask, step for step (its helpers exist from 5.23 on)
    if attention_mask is not None and not mu.fast_all(attention_mask):
        padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding_mask))
    mask_function = mu.add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    return _compiled_create_block_mask()(
        mask_mod=mask_function, B=batch_size, H=None, Q_LEN=q_length, KV_LEN=kv_length, device=device
    )
