"""``hf-sinks perplexity`` on a tiny random Llama (tests/cli/conftest.py), CPU, seconds."""

import re

import pytest
import torch
from helpers import read_csv

from hf_sinks.cli import main


def test_perplexity(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(_perplexity_args(model_dir, text_file, out, 120, "10,20", plot=True))
    assert code == 0
    rows = read_csv(out / "perplexity.csv")
    labels = list(dict.fromkeys(r["label"] for r in rows))
    assert labels == ["dense", "window 0+12", "sink 2+10", "window 0+22", "sink 2+20"]
    for label in labels:
        sel = [r for r in rows if r["label"] == label]
        assert [int(r["token_index"]) for r in sel] == list(range(1, 120))
        nll = torch.tensor([float(r["nll"]) for r in sel], dtype=torch.float64)
        cum = float(sel[-1]["cumulative_log_ppl"])
        assert cum == pytest.approx(nll.mean().item(), abs=1e-5)
    sink = [int(r["kv_cache_bytes"]) for r in rows if r["label"] == "sink 2+10"]
    dense = [int(r["kv_cache_bytes"]) for r in rows if r["label"] == "dense"]
    assert len(set(sink)) == 1 and dense[-1] > dense[0] and dense[-1] > sink[-1]
    assert (out / "perplexity.png").stat().st_size > 1000
    assert len(read_csv(out / "perplexity_summary.csv")) == 5
    printed = capsys.readouterr().out
    assert re.search(r"sink 2\+10\s+\d+\.\d+", printed) and "tokens/s" in printed and "peak KV MiB" in printed


def test_perplexity_csv_every_and_recompute(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "perplexity",
                "--model",
                str(model_dir),
                "--text-file",
                str(text_file),
                "--num-tokens",
                "40",
                "--modes",
                "recompute,sink",
                "--window-length",
                "8",
                "--csv-every",
                "5",
                "--output-dir",
                str(out),
                "--no-progress",
                "--no-plot",
            ]
        )
        == 0
    )
    rows = read_csv(out / "perplexity.csv")
    assert [int(r["token_index"]) for r in rows if r["mode"] == "recompute"] == list(range(1, 40, 5))
    assert not (out / "perplexity.png").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num-tokens", "100000"], r"larger than the text, which has \d+ tokens"),
        (["--modes", "dense,bogus"], r"unknown mode 'bogus'; allowed modes: dense, window, sink, recompute"),
        (["--window-length", "0"], r"--window-length=0 must be >= 1"),
        (["--window-length", "-4"], r"--window-length=-4 must be >= 1"),
        (["--chunk-size", "0"], r"--chunk-size=0 must be >= 1"),
        (["--text-file", "/no/such/file.txt"], r"text file '/no/such/file.txt' does not exist"),
        (["--model", "/no/such/model"], r"Model path '/no/such/model' does not exist"),
    ],
)
def test_perplexity_errors(model_dir, text_file, tmp_path, capsys, extra, message):
    args = [
        "perplexity",
        "--model",
        str(model_dir),
        "--text-file",
        str(text_file),
        "--num-tokens",
        "50",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
        "--no-plot",
    ]
    # later occurrences of an option win in argparse
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert "hf-sinks perplexity: error:" in err and re.search(message, err), err


def _perplexity_args(model_dir, text_file, out, num_tokens: int, windows: str, plot: bool = False) -> list[str]:
    return [
        "perplexity",
        "--model",
        str(model_dir),
        "--text-file",
        str(text_file),
        "--num-tokens",
        str(num_tokens),
        "--modes",
        "dense,window,sink",
        "--num-sink-tokens",
        "2",
        "--window-length",
        windows,
        "--chunk-size",
        "16",
        "--output-dir",
        str(out),
        "--no-progress",
    ] + ([] if plot else ["--no-plot"])


def test_perplexity_notes_the_caches_that_never_evict(model_dir, text_file, tmp_path, capsys):
    # 24 tokens: the 2+10 cache (12) evicts, the 2+30 one (32) holds the whole stream and equals dense
    assert main(_perplexity_args(model_dir, text_file, tmp_path / "out", 24, "10,30")) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, captured.err
    assert "window 0+32, sink 2+30" in notes[0] and "equal dense attention" in notes[0]
    assert "2+10" not in notes[0] and "0+12" not in notes[0] and "--num-tokens > 32" in notes[0]
    rows = read_csv(tmp_path / "out" / "perplexity_summary.csv")
    ppl = {r["label"]: float(r["perplexity"]) for r in rows}
    assert ppl["sink 2+30"] == pytest.approx(ppl["dense"], rel=1e-4)  # what the note says
    assert ppl["sink 2+10"] != pytest.approx(ppl["dense"], rel=1e-4)


def test_perplexity_prints_no_note_when_every_cache_evicts(model_dir, text_file, tmp_path, capsys):
    assert main(_perplexity_args(model_dir, text_file, tmp_path / "out", 40, "10")) == 0
    assert "note:" not in capsys.readouterr().err
