"""``hf-sinks passkey`` on a tiny random Llama (tests/cli/conftest.py)."""

import re

import pytest
from helpers import read_csv

from hf_sinks.cli import main


def test_passkey(model_dir, tmp_path, capsys):
    out = tmp_path / "passkey"
    assert (
        main(
            [
                "passkey",
                "--model",
                str(model_dir),
                "--lengths",
                "48,96",
                "--depths",
                "0,1",
                "--trials",
                "1",
                "--num-sink-tokens",
                "2",
                "--window-length",
                "30",
                "--chunk-size",
                "16",
                "--max-new-tokens",
                "2",
                "--modes",
                "dense,sink,h2o",
                "--heavy-budget",
                "8",
                "--output-dir",
                str(out),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    rows = read_csv(out / "passkey.csv")
    assert [(r["mode"], int(r["context_length"]), float(r["depth"])) for r in rows] == [
        (mode, n, d) for mode in ("dense", "sink", "h2o") for n in (48, 96) for d in (0.0, 1.0)
    ]
    rows = [r for r in rows if r["mode"] != "h2o"]
    assert all(int(r["trials"]) == 1 and 0 <= int(r["correct"]) <= 1 for r in rows)
    assert {r["label"] for r in rows} == {"dense", "sink 2+30"}
    assert (out / "passkey.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert re.search(r"context\s+dense\s+sink 2\+30", printed)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--modes", "dense,window"], "unknown mode 'window'; allowed modes: dense, sink, h2o, duo"),
        (["--modes", "h2o"], "--modes h2o needs --heavy-budget >= 0 (got None)"),
        (["--modes", "duo"], "--modes duo needs --pattern"),
        (["--modes", "duo", "--pattern", "nope.json"], "--pattern 'nope.json' does not exist"),
        (["--depths", "0,1.5"], "--depths='0,1.5' must be comma-separated numbers in [0, 1]"),
        (["--lengths", "8"], "--lengths=8 must be >= 16"),
        (["--trials", "0"], "--trials=0 must be >= 1"),
    ],
)
def test_passkey_errors(model_dir, capsys, extra, message):
    assert main(["passkey", "--model", str(model_dir)] + extra) == 2
    assert message in capsys.readouterr().err


def test_passkey_duo_with_a_pattern_file(model_dir, tmp_path):
    from transformers import AutoConfig

    from hf_sinks.duo import HeadPattern

    pattern = tmp_path / "pattern.json"
    HeadPattern.full(AutoConfig.from_pretrained(model_dir)).save(pattern)  # all retrieval heads: dense answers
    out = tmp_path / "passkey"
    assert (
        main(
            [
                "passkey",
                "--model",
                str(model_dir),
                "--lengths",
                "48",
                "--depths",
                "0.5",
                "--trials",
                "2",
                "--num-sink-tokens",
                "2",
                "--window-length",
                "8",
                "--chunk-size",
                "16",
                "--max-new-tokens",
                "3",
                "--modes",
                "dense,duo",
                "--pattern",
                str(pattern),
                "--no-plot",
                "--output-dir",
                str(out),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    dense, duo = read_csv(out / "passkey.csv")
    assert (dense["mode"], duo["mode"]) == ("dense", "duo")
    assert duo["answers"] == dense["answers"]
