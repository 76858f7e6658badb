"""The ``hf-sinks`` parser: every command, ``duo``'s subcommands, ``python -m hf_sinks.cli`` as a process."""

import os
import subprocess
import sys

import pytest

from hf_sinks.cli import COMMANDS, build_parser


def test_parser_commands():
    parser = build_parser()
    for command in ("perplexity", "generate", "chat", "bench", "passkey", "analyze", "train"):
        assert parser.parse_args([command]).command == command
    with pytest.raises(SystemExit):
        parser.parse_args(["nope"])


def test_duo_subcommands_share_the_flag_names():
    """``hf-sinks duo ...`` takes the rest of the CLI's names: --num-sink-tokens, --window-length, --text-file,
    --output-dir; DuoAttention's --sink-size and --recent-size are gone (argparse still reads the old --out and
    --text as abbreviations of --output-dir/--output and --text-file, which mean the same)."""
    parser = build_parser()
    assert "duo" in COMMANDS
    required = {
        "identify": ["--output", "p.json"],
        "score": ["--output", "p.json"],
        "bench": [],
        "passkey": ["--pattern", "p.json"],
    }
    for sub, extra in required.items():
        args = parser.parse_args(["duo", sub, "--num-sink-tokens", "3", "--window-length", "7", *extra])
        assert (args.command, args.duo_command, args.command_name) == ("duo", sub, f"duo {sub}")
        assert (args.num_sink_tokens, args.window_length) == (3, 7)
        for old in ("--sink-size", "--recent-size"):
            with pytest.raises(SystemExit):
                parser.parse_args(["duo", sub, *extra, old, "1"])
    assert parser.parse_args(["duo", "bench"]).output_dir == "hf_sinks_duo"  # never a folder of the repository
    assert parser.parse_args(["duo", "passkey", "--pattern", "p.json"]).output_dir == "hf_sinks_duo"
    assert parser.parse_args(["duo", "score", "--output", "p.json", "--text-file", "t.txt"]).text_file == "t.txt"
    with pytest.raises(SystemExit):
        parser.parse_args(["duo"])


def test_python_m_hf_sinks_cli_runs_duo(tmp_path):
    """``python -m hf_sinks.cli`` (what ``accelerate launch -m hf_sinks.cli duo identify`` runs) is ``hf-sinks``: a
    user error is one line and exit status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "hf_sinks.cli", "duo", "identify", "--output", str(tmp_path / "pattern.txt")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("hf-sinks duo identify: error: --output "), proc.stderr
    assert "pattern.txt" in lines[0] and ".json or .safetensors" in lines[0]
