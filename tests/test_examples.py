"""examples/*.py on a tiny random Llama: they run, and nothing in them or in hf_sinks raises or causes a deprecation.

Loaded as ``examples.<name>`` so that pyproject's filters (``error::...:(hf_sinks|examples)``) also apply to them;
``streaming_generate.py`` (the README demo) is run with the CLI in tests/cli/test_cli_generate.py.
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
from helpers import save_word_model, write_word_text

import hf_sinks

EXAMPLES = Path(__file__).parents[1] / "examples"
OURS = (os.path.dirname(hf_sinks.__file__) + os.sep, str(EXAMPLES) + os.sep)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    text = write_word_text(tmp_path_factory.mktemp("text") / "words.txt")
    return save_word_model(tmp_path_factory.mktemp("tiny_model"), text.read_text()), text


def _run(name: str, argv: list[str], monkeypatch) -> list[str]:
    """Runs ``examples/<name>.py``'s ``main()`` with ``argv``; the deprecations that point into hf_sinks or examples."""
    spec = importlib.util.spec_from_file_location(f"examples.{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        module.main()
    return [
        f"{r.filename}:{r.lineno}: {r.message}"
        for r in records
        if issubclass(r.category, (FutureWarning, DeprecationWarning)) and r.filename.startswith(OURS)
    ]


def test_streaming_perplexity_warns_nothing(tiny, monkeypatch, capsys):
    model, text = tiny
    argv = ["--model", str(model), "--text-file", str(text), "--num-tokens", "64", "--num-sink-tokens", "2"]
    assert _run("streaming_perplexity", [*argv, "--window-length", "16", "--chunk-size", "8"], monkeypatch) == []
    assert capsys.readouterr().out


def test_passkey_retrieval_warns_nothing(tiny, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")  # the example plots its accuracy
    model, _ = tiny
    argv = ["--model", str(model), "--lengths", "64", "--depths", "0", "--trials", "1", "--num-sink-tokens", "2"]
    argv += ["--window-length", "16", "--chunk-size", "16", "--max-new-tokens", "3", "--output-dir", str(tmp_path)]
    assert _run("passkey_retrieval", argv, monkeypatch) == []
    assert (tmp_path / "passkey.csv").exists()
