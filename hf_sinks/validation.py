"""Argument checks shared by the Python API and the ``hf-sinks`` CLI (one place, one message style).

Every check raises *before* any work starts, with a message that names the offending value, what is allowed and,
where it helps, what to do: ``num_sink_tokens=-1 is invalid: must be an int >= 0``. A value of the wrong type raises
:class:`SinkTypeError`, which is both a ``TypeError`` (what it is) and a ``ValueError`` (what callers that catch bad
arguments, like the CLI, already expect).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

#: Most tokens a bounded cache may hold per layer (``S + W``, ``S + W + H``). Far above any real window (a 16M-token
#: window of a 135M model is already ~750 GiB of KV), low enough that a typo like ``10**13`` fails at construction
#: instead of in the allocator at the first forward.
MAX_CACHE_TOKENS = 2**24


class SinkTypeError(TypeError, ValueError):
    """An argument of the wrong type. Also a ``ValueError``, so ``except ValueError`` keeps catching bad arguments."""


def _kind(minimum: Any, maximum: Any, what: str) -> str:
    if minimum is not None and maximum is not None:
        return f"{what} in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"{what} >= {minimum}"
    if maximum is not None:
        return f"{what} <= {maximum}"
    return what


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """Return ``value`` if it is an int (not a bool) in ``[minimum, maximum]``; raise naming it otherwise.

    Raises:
        SinkTypeError: not an int (``True``, ``2.5``, ``"64"``).
        ValueError: out of range.
    """
    allowed = _kind(minimum, maximum, "an int")
    suffix = f"; {hint}" if hint else ""
    # bool is an int subclass; `num_sink_tokens=True` is a bug, not a count. numpy/torch ints index like ints.
    if isinstance(value, bool) or not (isinstance(value, int) or _is_integer_scalar(value)):
        raise SinkTypeError(f"{name}={value!r} is invalid: must be {allowed}, not {type(value).__name__}{suffix}.")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}={value} is invalid: must be {allowed}{suffix}.")
    return value


def _is_integer_scalar(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Integral)


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    hint: str = "",
) -> float:
    """Return ``value`` as a float if it is a finite real number in range; raise naming it otherwise."""
    lo = "(" if exclusive_minimum else "["
    hi = ")" if exclusive_maximum else "]"
    if minimum is not None and maximum is not None:
        allowed = f"a finite number in {lo}{minimum}, {maximum}{hi}"
    elif minimum is not None:
        allowed = f"a finite number {'>' if exclusive_minimum else '>='} {minimum}"
    elif maximum is not None:
        allowed = f"a finite number {'<' if exclusive_maximum else '<='} {maximum}"
    else:
        allowed = "a finite number"
    suffix = f"; {hint}" if hint else ""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SinkTypeError(f"{name}={value!r} is invalid: must be {allowed}, not {type(value).__name__}{suffix}.")
    number = float(value)
    bad = not math.isfinite(number)
    if minimum is not None:
        bad |= number <= minimum if exclusive_minimum else number < minimum
    if maximum is not None:
        bad |= number >= maximum if exclusive_maximum else number > maximum
    if bad:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}{suffix}.")
    return number


def check_choice(name: str, value: Any, allowed: Iterable[Any], hint: str = "") -> Any:
    """Return ``value`` if it is one of ``allowed``; raise listing them otherwise."""
    allowed = tuple(allowed)
    if value not in allowed:
        suffix = f"; {hint}" if hint else ""
        raise ValueError(f"{name}={value!r} is invalid: must be one of {', '.join(map(str, allowed))}{suffix}.")
    return value


def check_cache_size(owner: str, **sizes: int) -> int:
    """Refuse a cache whose per-layer token budget (the sum of ``sizes``) exceeds :data:`MAX_CACHE_TOKENS`."""
    total = sum(sizes.values())
    if total > MAX_CACHE_TOKENS:
        parts = " + ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(
            f"{owner}: {parts} = {total} tokens per layer is too large: at most {MAX_CACHE_TOKENS} "
            f"(2**24) tokens per layer; StreamingLLM windows are typically 256..8192 tokens."
        )
    return total


def vocab_size_of(model: Any) -> int | None:
    """Rows of ``model``'s input embedding (what ids index), else ``config.vocab_size``, else ``None``."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            embedding = get()
        except (NotImplementedError, AttributeError):
            embedding = None
        rows = getattr(embedding, "num_embeddings", None)
        if isinstance(rows, int):
            return rows
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    vocab = getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def check_token_ids(ids: Any, model: Any, name: str = "input_ids") -> None:
    """Refuse token ids outside ``[0, vocab_size)`` of ``model`` (the embedding would fail deep inside torch)."""
    import torch

    ids = torch.as_tensor(ids)
    if ids.numel() == 0:
        return
    vocab = vocab_size_of(model)
    low, high = int(ids.min()), int(ids.max())
    bad = low if low < 0 else high if vocab is not None and high >= vocab else None
    if bad is None:
        return
    position = int((ids.reshape(-1) == bad).nonzero()[0])
    allowed = f"the model's vocabulary has {vocab} tokens (ids 0..{vocab - 1})" if vocab is not None else "ids are >= 0"
    raise ValueError(
        f"{name} holds token id {bad} (at flat position {position}), but {allowed}; tokenize the text with this "
        f"model's tokenizer."
    )


def check_layers_in_step(owner: str, layers: Sequence[Any], layer_idx: int, new_tokens: int) -> None:
    """Refuse to update ``layers[layer_idx]`` when the cache's layers are out of step.

    A forward that fails inside layer ``k`` leaves layers ``< k`` holding its tokens and the others not; a retry on
    the same cache would then silently diverge. Layers are in step when, at the update of layer ``k`` with ``q`` new
    tokens, the nearest earlier layer that holds tokens has seen ``q`` more tokens than layer ``k`` (it was updated
    in this forward), and, at the first layer of a forward, every layer holding tokens has seen the same count.
    Layers that never held a token are skipped (a model may leave some layers' caches unused). O(1) per layer plus
    O(layers) once per forward.

    Raises:
        RuntimeError: naming the two layers, their counts and ``reset()``.
    """
    layer = layers[layer_idx]
    seen = layer.seen
    previous = next((j for j in range(layer_idx - 1, -1, -1) if layers[j].is_initialized), None)
    if previous is not None:
        expected = layers[previous].seen
        if expected != seen + new_tokens:
            _out_of_step(owner, previous, expected, layer_idx, seen, f"and this forward brings {new_tokens} token(s)")
        return
    if not layer.is_initialized:
        later = [j for j in range(layer_idx + 1, len(layers)) if layers[j].is_initialized]
        if later:
            j = later[0]
            _out_of_step(owner, j, layers[j].seen, layer_idx, seen, "before this forward")
        return
    for j in range(layer_idx + 1, len(layers)):
        other = layers[j]
        if other.is_initialized and other.seen != seen:
            _out_of_step(owner, layer_idx, seen, j, other.seen, "before this forward")


def _out_of_step(owner: str, a: int, a_seen: int, b: int, b_seen: int, when: str) -> None:
    raise RuntimeError(
        f"{owner} layers are out of step: layer {a} has seen {a_seen} token(s) but layer {b} has seen {b_seen} "
        f"({when}); a previous forward failed part-way through the model, so some layers hold its tokens and the "
        f"others do not. Call cache.reset() and feed the stream again (or use a new cache)."
    )


def check_batch_size(owner: str, held: int, got: int) -> None:
    """Refuse a forward whose batch size differs from the one a cache holds."""
    if held != got:
        raise ValueError(
            f"{owner} holds a batch of {held} sequence(s) but this forward has batch size {got}; a cache serves one "
            f"batch: call cache.reset() (or create a new cache) before feeding a different batch."
        )


def check_cache_update(
    owner: str, layers: Sequence[Any], layer_idx: int, key_states: Any, held: tuple[int, int, int] | None
) -> None:
    """The checks every hf_sinks cache runs when ``layers[layer_idx]`` is updated with ``key_states``.

    Args:
        owner: the cache class name, for messages.
        held: ``(batch, kv_heads, head_dim)`` the layer holds, ``None`` before its first update.
    """
    if held is not None:
        check_batch_size(f"This {owner}", held[0], key_states.shape[0])
        check_layer_shape(owner, layer_idx, held[1:], (key_states.shape[1], key_states.shape[-1]))
    check_layers_in_step(owner, layers, layer_idx, key_states.shape[-2])


def check_layer_shape(owner: str, layer_idx: int, held: tuple[int, ...], got: tuple[int, ...]) -> None:
    """Refuse keys whose ``(kv_heads, head_dim)`` differ from what the layer holds (a cache reused across models)."""
    if held != got:
        raise ValueError(
            f"{owner} layer {layer_idx} holds keys of {held[0]} KV head(s) x head_dim {held[1]} but this forward gives "
            f"{got[0]} x {got[1]}; the cache was filled by another model: call cache.reset() or create a new cache."
        )


# ------------------------------------------------------------------------------------------------ CLI / files
def check_threads(value: int | None, flag: str = "--threads") -> int | None:
    """``None`` (torch's default) or an int >= 1."""
    if value is None:
        return None
    return check_int(flag, value, 1, hint="omit it for torch's default")


def check_device(device: Any, flag: str = "--device") -> Any:
    """Return a ``torch.device`` for ``device`` if it exists on this machine; raise naming it otherwise."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{flag}={device!r} is invalid: not a torch device; use e.g. 'cpu', 'cuda' or 'cuda:1'."
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag}={device!r} is invalid: CUDA is not available on this machine; use 'cpu'.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag}={device!r} is invalid: this machine has {count} CUDA device(s) (0..{count - 1}).")
        return dev
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"{flag}={device!r} is invalid: MPS is not available on this machine; use 'cpu'.")
        return dev
    module = getattr(torch, dev.type, None)
    available = getattr(module, "is_available", None)
    if callable(available) and available():
        return dev
    raise ValueError(
        f"{flag}={device!r} is invalid: device type {dev.type!r} is not available here; use 'cpu' or 'cuda'."
    )


def check_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Create ``path`` (parents included) and make sure a file can be written in it; raise naming it otherwise.

    Run at the start of a command, so a typo fails in a second instead of after an hour of benchmarking.

    Raises:
        NotADirectoryError: ``path`` or one of its parents is a regular file.
        PermissionError: the directory cannot be created or written.
    """
    out = Path(path).expanduser()
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a regular file" if parent == out else f"is under {str(parent)!r}, which is a regular file"
                raise NotADirectoryError(f"{flag} {str(path)!r} {where}; pass a directory path.")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".hf_sinks_write_test_"):
            pass
    except OSError as e:
        raise PermissionError(
            f"{flag} {str(path)!r} is not writable ({e.strerror or e}); pass a directory you can write to."
        ) from None
    return out


def one_line(message: Any) -> str:
    """``message`` on one line (newlines and runs of spaces collapsed), for CLI errors."""
    return " ".join(str(message).split())


__all__ = [
    "MAX_CACHE_TOKENS",
    "SinkTypeError",
    "check_batch_size",
    "check_cache_size",
    "check_choice",
    "check_device",
    "check_int",
    "check_layer_shape",
    "check_layers_in_step",
    "check_number",
    "check_output_dir",
    "check_threads",
    "check_token_ids",
    "one_line",
    "vocab_size_of",
]
