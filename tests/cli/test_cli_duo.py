"""``hf-sinks duo identify|score|bench|passkey`` on a tiny random Llama with a BPE tokenizer (CPU, seconds)."""

import pytest
from helpers import passkey_bpe_tokenizer, read_csv, tiny_model

from hf_sinks import duo
from hf_sinks.cli import main
from hf_sinks.duo import HeadPattern


@pytest.fixture(scope="module")
def duo_model(tmp_path_factory):
    """A tiny Llama (vocab 320) with a byte-level BPE tokenizer that knows the passkey texts, and a text file."""
    path = tmp_path_factory.mktemp("duo_model")
    model_dir = path / "model"
    passkey_bpe_tokenizer().save_pretrained(model_dir)
    tiny_model("llama", attn_implementation="sdpa", vocab_size=320).save_pretrained(model_dir)
    text = path / "text.txt"
    text.write_text(duo.identify.FILLER * 40)
    return model_dir, text


def test_identify_score_bench_passkey(duo_model, tmp_path, capsys):
    model_dir, text = duo_model
    sizes = ["--num-sink-tokens", "2", "--window-length", "4"]
    assert (
        main(
            [
                "duo",
                "identify",
                "--model",
                str(model_dir),
                "--output",
                str(tmp_path / "alpha.safetensors"),
                "--steps",
                "2",
                "--context-length",
                "40",
                "60",
                *sizes,
            ]
        )
        == 0
    )
    trained = HeadPattern.load(tmp_path / "alpha.safetensors")
    assert trained.metadata["num_steps"] == 2 and trained.scores is not None
    assert (
        main(
            [
                "duo",
                "score",
                "--model",
                str(model_dir),
                "--output",
                str(tmp_path / "sub" / "p.json"),
                "--source",
                "passkey",
                "--context-length",
                "60",
                *sizes,
            ]
        )
        == 0
    )
    assert (tmp_path / "sub" / "p.png").exists() and HeadPattern.load(
        tmp_path / "sub" / "p.json"
    ).streaming_fraction == 0.5
    assert (
        main(
            [
                "duo",
                "score",
                "--model",
                str(model_dir),
                "--output",
                str(tmp_path / "t.json"),
                "--source",
                "text",
                "--text-file",
                str(text),
                "--context-length",
                "40",
                "--no-plot",
                *sizes,
            ]
        )
        == 0
    )
    assert (tmp_path / "t.json").exists() and not (tmp_path / "t.png").exists()
    out = tmp_path / "bench"
    assert (
        main(
            [
                "duo",
                "bench",
                "--model",
                str(model_dir),
                "--text-file",
                str(text),
                "--output-dir",
                str(out),
                "--num-tokens",
                "80",
                "--score-tokens",
                "40",
                "--num-sink-tokens",
                "2",
                "--window-length",
                "6",
                "--chunk-size",
                "16",
            ]
        )
        == 0
    )
    rows = (out / "perplexity.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[1].startswith("dense")
    assert {p.name for p in out.iterdir()} >= {"perplexity.png", "pattern.json", "pattern.png"}
    passkey = ["duo", "passkey", "--model", str(model_dir), "--pattern", str(out / "pattern.json")]
    passkey += ["--output-dir", str(out), "--lengths", "48", "--trials", "1", *sizes, "--chunk-size", "16"]
    assert main([*passkey, "--depths", "0,0.5", "--modes", "dense,duo"]) == 0
    assert main([*passkey, "--depths", "0.25", "--modes", "sink", "--append"]) == 0  # rows added to the same CSV
    rows = read_csv(out / "passkey.csv")
    assert [(r["mode"], float(r["depth"])) for r in rows] == [
        ("dense", 0.0),
        ("dense", 0.5),
        ("duo", 0.0),
        ("duo", 0.5),
        ("sink", 0.25),
    ]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["score", "--output", "{tmp}/p.txt"], "--output '{tmp}/p.txt' must end in .json or .safetensors"),
        (["score", "--output", "{tmp}/p.json", "--sparsity", "1.5"], "--sparsity=1.5 must be in [0, 1]"),
        (["score", "--output", "{tmp}/p.json", "--window-length", "0"], "--window-length=0 must be >= 1"),
        (["identify", "--output", "{tmp}/p.json", "--context-length", "80", "40"], "MIN must be <= MAX"),
        (["identify", "--output", "{tmp}/p.json", "--num-sink-tokens", "-1"], "--num-sink-tokens=-1 must be >= 0"),
        (
            ["bench", "--output-dir", "{tmp}/b", "--pattern", "{tmp}/nope.json"],
            "--pattern '{tmp}/nope.json' does not exist",
        ),
        (["bench", "--output-dir", "{tmp}/b", "--text-file", "{tmp}/nope.txt"], "nope.txt"),
        (
            ["passkey", "--pattern", "{tmp}/nope.json", "--output-dir", "{tmp}/pk"],
            "--pattern '{tmp}/nope.json' does not exist",
        ),
        (["passkey", "--pattern", "{tmp}/nope.json", "--modes", "dense,window"], "unknown mode 'window'"),
        (
            ["passkey", "--pattern", "{tmp}/nope.json", "--depths", "0,2"],
            "--depths='0,2' must be comma-separated numbers",
        ),
        (["passkey", "--pattern", "{tmp}/nope.json", "--lengths", "8"], "--lengths=8 must be >= 16"),
    ],
)
def test_errors_are_one_line_before_loading(duo_model, tmp_path, capsys, argv, message):
    model_dir, _ = duo_model
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["duo", *argv, "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"hf-sinks duo {argv[0]}: error: "), err
    assert message.format(tmp=tmp_path) in errors[0], err
    assert "loading model" not in err
