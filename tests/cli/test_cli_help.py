"""``--help`` of every ``hf-sinks`` command (``duo``'s subcommands included): plain text, every default shown."""

from __future__ import annotations

import argparse
import re

import pytest

from hf_sinks.cli import build_parser

#: reST that must not reach a terminal: ``literal``, :func:`x`, :class:`x`, ...
_REST = re.compile(r"``|:(?:func|class|mod|meth|attr|data|exc|obj|ref|py:\w+):`")


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """``("hf-sinks duo bench", parser)`` for the top-level parser and every (sub-)subcommand, depth first."""
    found: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}", sub)

    walk("hf-sinks", build_parser())
    return found


PARSERS = _all_parsers()


def _shows(help_text: str, default: object) -> bool:
    """Whether ``help_text`` names ``default`` (a list default may be written space- or comma-separated)."""
    candidates = {str(default)}
    if isinstance(default, (list, tuple)):
        candidates |= {" ".join(map(str, default)), ",".join(map(str, default))}
    if isinstance(default, float):
        candidates |= {f"{default:g}", repr(default)}
    return any(c in help_text for c in candidates)


def test_every_command_is_walked() -> None:
    names = {name for name, _ in PARSERS}
    expected = {"perplexity", "generate", "chat", "bench", "passkey", "analyze", "train", "duo"}
    assert {f"hf-sinks {c}" for c in expected} <= names
    assert {f"hf-sinks duo {c}" for c in ("identify", "score", "bench", "passkey")} <= names


@pytest.mark.parametrize("name,parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_help_is_plain_text(name: str, parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    bad = sorted({m.group(0) for m in _REST.finditer(text)})
    assert not bad, f"`{name} --help` prints reST markup {bad}:\n{text}"


@pytest.mark.parametrize("name,parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_help_shows_every_default(name: str, parser: argparse.ArgumentParser) -> None:
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        # flags (store_true, --help) and None defaults have no value worth printing
        if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            continue
        shown = formatter._expand_help(action) if action.help is not None else ""
        if not _shows(shown, action.default):
            missing.append(f"{'/'.join(action.option_strings)} (default {action.default!r}): {shown!r}")
    assert not missing, f"`{name} --help` hides these defaults:\n" + "\n".join(missing)


def test_train_choices_are_the_library_s():
    """``hf-sinks train`` spells its choices out (its ``--help`` imports no torch): they must stay the library's."""
    from hf_sinks.cli.train import RECIPE_CHOICES, ROPE_SCALING_CHOICES
    from hf_sinks.training.recipes import RECIPES
    from hf_sinks.training.rope_scaling import KNOWN_ROPE_TYPES

    assert RECIPE_CHOICES == RECIPES
    assert ROPE_SCALING_CHOICES == KNOWN_ROPE_TYPES
