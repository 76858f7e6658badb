"""``hf-sinks bench`` on a tiny random Llama (tests/cli/conftest.py)."""

import re

from helpers import read_csv

from hf_sinks.cli import main


def test_bench(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--model",
                str(model_dir),
                "--text-file",
                str(text_file),
                "--lengths",
                "16,48,96",
                "--num-sink-tokens",
                "2",
                "--window-length",
                "14",
                "--steps",
                "3",
                "--warmup",
                "1",
                "--prefill-chunk",
                "32",
                "--recompute-max-length",
                "48",
                "--recompute-steps",
                "2",
                "--output-dir",
                str(out),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    rows = read_csv(out / "bench.csv")
    by_mode = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).append(r)
    assert [int(r["stream_length"]) for r in by_mode["sink"]] == [16, 48, 96]
    assert [int(r["stream_length"]) for r in by_mode["recompute"]] == [16, 48]
    assert {int(r["resident_tokens"]) for r in by_mode["sink"][1:]} == {16}
    assert int(by_mode["dense"][-1]["resident_tokens"]) == 96 + 4  # warmup + timed steps were appended
    assert int(by_mode["sink"][-1]["kv_cache_bytes"]) == int(by_mode["sink"][1]["kv_cache_bytes"])
    assert int(by_mode["dense"][-1]["kv_cache_bytes"]) > int(by_mode["dense"][0]["kv_cache_bytes"])
    assert (out / "bench.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert re.search(r"sink: .* \(ratio \d+\.\d+\)", printed)
    assert re.search(r"speedup of the sink cache over sliding-window recompute at cache 16: \d+\.\d+x", printed)


def test_bench_errors(model_dir, capsys):
    assert main(["bench", "--model", str(model_dir), "--modes", "sink,nope"]) == 2
    assert "unknown mode 'nope'; allowed modes: sink, dense, recompute" in capsys.readouterr().err
    assert main(["bench", "--model", str(model_dir), "--lengths", "0,5"]) == 2
    assert "--lengths=0 must be >= 1" in capsys.readouterr().err
