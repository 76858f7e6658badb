"""``hf-sinks generate`` and ``hf-sinks chat`` on a tiny random Llama (tests/cli/conftest.py)."""

import io
import re

import pytest

from hf_sinks.cli import main


def test_generate_one_shot(model_dir, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "the king is",
            "--max-new-tokens",
            "40",
            "--ignore-eos",
            "--num-sink-tokens",
            "2",
            "--window-length",
            "12",
            "--no-progress",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    m = re.search(r"\[(\d+) new tokens .* tokens/s .*seen (\d+) tokens, resident (\d+) \(capacity 14", err)
    assert m, err
    new, seen, resident = map(int, m.groups())
    assert new == 40 and seen >= 40 + 3 - 1 and resident == 14


def test_generate_and_the_demo_warn_nothing(model_dir, capsys, caplog):
    """`hf-sinks generate` and examples/streaming_generate.py: no deprecation raised or logged, on any release."""
    import importlib.util
    import logging
    import warnings
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "streaming_generate_demo", Path(__file__).parents[2] / "examples" / "streaming_generate.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    if hasattr(logging.Logger.warning_once, "cache_clear"):  # transformers logs a deprecation once per process
        logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(model_dir),
                    "--prompt",
                    "the king is",
                    "--max-new-tokens",
                    "20",
                    "--ignore-eos",
                    "--num-sink-tokens",
                    "2",
                    "--window-length",
                    "8",
                    "--no-progress",
                ]
            )
            == 0
        )
        demo.main(
            [
                "--model",
                str(model_dir),
                "--prompt",
                "the king",
                "--raw-prompt",
                "--max-new-tokens",
                "20",
                "--num-sink-tokens",
                "2",
                "--window-length",
                "8",
                "--greedy",
            ]
        )
    assert "bounded" in capsys.readouterr().out
    deprecations = [str(r.message) for r in records if issubclass(r.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []
    assert not [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


@pytest.mark.parametrize("fixture", ["model_dir", "chat_model_dir"])
def test_chat_reuses_one_cache(request, monkeypatch, capsys, fixture):
    path = request.getfixturevalue(fixture)
    monkeypatch.setattr("sys.stdin", io.StringIO("the king is dead\nlong live the queen\n\n"))
    assert (
        main(
            [
                "chat",
                "--model",
                str(path),
                "--max-new-tokens",
                "20",
                "--ignore-eos",
                "--num-sink-tokens",
                "2",
                "--window-length",
                "16",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    seen = [int(s) for s in re.findall(r"seen (\d+) tokens", err)]
    resident = [int(s) for s in re.findall(r"resident (\d+)", err)]
    assert len(seen) == 2 and seen[1] > seen[0] + 20  # the second turn continued the same cache
    assert resident == [min(seen[0], 18), 18]


def test_generate_errors(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--window-length", "0", "--prompt", "x"]) == 2
    assert "--window-length=0 must be >= 1" in capsys.readouterr().err


def test_generate_compile_matches_eager(model_dir, capsys):
    """`--compile`: StaticSinkCache + generate's compile path (forced on CPU); greedy text identical to eager."""
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "the king is",
        "--max-new-tokens",
        "30",
        "--ignore-eos",
        "--num-sink-tokens",
        "2",
        "--window-length",
        "6",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    eager = capsys.readouterr()
    assert main(args + ["--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out
    m = re.search(r"\[(\d+) new tokens .*seen (\d+) tokens, resident (\d+) \(capacity 8", compiled.err)
    assert m and int(m.group(1)) == 30 and int(m.group(3)) == 8, compiled.err
