"""The ``hf-sinks`` CLI on a tiny random Llama saved to disk with a tiny word-level tokenizer (CPU, seconds)."""

import csv
import io
import re

import pytest
import torch
from helpers import VOCAB, tiny_model

from hf_sinks.cli import build_parser, main

WORDS = (
    "the king is dead long live the king and the queen of the north is here to see the prince "
    "who would be king if the old man in the tower had not lost the crown to a fool at sea "
).split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "words.txt"
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(WORDS), (600,), generator=gen).tolist()
    lines = [" ".join(WORDS[i] for i in picks[k : k + 12]) for k in range(0, len(picks), 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text_file):
    """A tiny Llama plus a word-level tokenizer (vocab < the model's) saved like any local HF model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model("llama", layers=2).save_pretrained(path)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text_file.read_text()], trainers.WordLevelTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, model_dir):
    """The same model with a chat template on its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_chat")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tok.save_pretrained(path)
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_perplexity(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["perplexity", "--model", str(model_dir), "--text-file", str(text_file), "--num-tokens", "120",
                 "--modes", "dense,window,sink", "--num-sink-tokens", "2", "--window-length", "10,20",
                 "--chunk-size", "16", "--output-dir", str(out), "--no-progress"])
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
    assert main(["perplexity", "--model", str(model_dir), "--text-file", str(text_file), "--num-tokens", "40",
                 "--modes", "recompute,sink", "--window-length", "8", "--csv-every", "5", "--output-dir", str(out),
                 "--no-progress", "--no-plot"]) == 0
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
    args = ["perplexity", "--model", str(model_dir), "--text-file", str(text_file), "--num-tokens", "50",
            "--output-dir", str(tmp_path), "--no-progress", "--no-plot"]
    # later occurrences of an option win in argparse
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert "hf-sinks perplexity: error:" in err and re.search(message, err), err


def test_generate_one_shot(model_dir, capsys):
    code = main(["generate", "--model", str(model_dir), "--prompt", "the king is", "--max-new-tokens", "40",
                 "--ignore-eos", "--num-sink-tokens", "2", "--window-length", "12", "--no-progress"])
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
        assert main(["generate", "--model", str(model_dir), "--prompt", "the king is", "--max-new-tokens", "20",
                     "--ignore-eos", "--num-sink-tokens", "2", "--window-length", "8", "--no-progress"]) == 0
        demo.main(["--model", str(model_dir), "--prompt", "the king", "--raw-prompt", "--max-new-tokens", "20",
                   "--num-sink-tokens", "2", "--window-length", "8", "--greedy"])
    assert "bounded" in capsys.readouterr().out
    deprecations = [str(r.message) for r in records if issubclass(r.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []
    assert not [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


@pytest.mark.parametrize("fixture", ["model_dir", "chat_model_dir"])
def test_chat_reuses_one_cache(request, monkeypatch, capsys, fixture):
    path = request.getfixturevalue(fixture)
    monkeypatch.setattr("sys.stdin", io.StringIO("the king is dead\nlong live the queen\n\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "20", "--ignore-eos", "--num-sink-tokens", "2",
                 "--window-length", "16"]) == 0
    err = capsys.readouterr().err
    seen = [int(s) for s in re.findall(r"seen (\d+) tokens", err)]
    resident = [int(s) for s in re.findall(r"resident (\d+)", err)]
    assert len(seen) == 2 and seen[1] > seen[0] + 20  # the second turn continued the same cache
    assert resident == [min(seen[0], 18), 18]


def test_bench(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(model_dir), "--text-file", str(text_file), "--lengths", "16,48,96",
                 "--num-sink-tokens", "2", "--window-length", "14", "--steps", "3", "--warmup", "1",
                 "--prefill-chunk", "32", "--recompute-max-length", "48", "--recompute-steps", "2",
                 "--output-dir", str(out), "--no-progress", "--threads", "1"]) == 0
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


def test_generate_errors(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--window-length", "0", "--prompt", "x"]) == 2
    assert "--window-length=0 must be >= 1" in capsys.readouterr().err


def test_parser_commands():
    parser = build_parser()
    for command in ("perplexity", "generate", "chat", "bench", "passkey", "analyze", "train"):
        assert parser.parse_args([command]).command == command
    with pytest.raises(SystemExit):
        parser.parse_args(["nope"])


def test_passkey(model_dir, tmp_path, capsys):
    out = tmp_path / "passkey"
    assert main(["passkey", "--model", str(model_dir), "--lengths", "48,96", "--depths", "0,1", "--trials", "1",
                 "--num-sink-tokens", "2", "--window-length", "30", "--chunk-size", "16", "--max-new-tokens", "2",
                 "--modes", "dense,sink,h2o", "--heavy-budget", "8",
                 "--output-dir", str(out), "--no-progress", "--threads", "1"]) == 0
    rows = read_csv(out / "passkey.csv")
    assert [(r["mode"], int(r["context_length"]), float(r["depth"])) for r in rows] == [
        (mode, n, d) for mode in ("dense", "sink", "h2o") for n in (48, 96) for d in (0.0, 1.0)]
    rows = [r for r in rows if r["mode"] != "h2o"]
    assert all(int(r["trials"]) == 1 and 0 <= int(r["correct"]) <= 1 for r in rows)
    assert {r["label"] for r in rows} == {"dense", "sink 2+30"}
    assert (out / "passkey.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert re.search(r"context\s+dense\s+sink 2\+30", printed)


@pytest.mark.parametrize("extra,message", [
    (["--modes", "dense,window"], "unknown mode 'window'; allowed modes: dense, sink, h2o, duo"),
    (["--modes", "h2o"], "--modes h2o needs --heavy-budget >= 0 (got None)"),
    (["--modes", "duo"], "--modes duo needs --pattern"),
    (["--modes", "duo", "--pattern", "nope.json"], "--pattern 'nope.json' does not exist"),
    (["--depths", "0,1.5"], "--depths='0,1.5' must be comma-separated numbers in [0, 1]"),
    (["--lengths", "8"], "--lengths=8 must be >= 16"),
    (["--trials", "0"], "--trials=0 must be >= 1"),
])
def test_passkey_errors(model_dir, capsys, extra, message):
    assert main(["passkey", "--model", str(model_dir)] + extra) == 2
    assert message in capsys.readouterr().err


def test_passkey_duo_with_a_pattern_file(model_dir, tmp_path):
    from transformers import AutoConfig

    from hf_sinks.duo import HeadPattern

    pattern = tmp_path / "pattern.json"
    HeadPattern.full(AutoConfig.from_pretrained(model_dir)).save(pattern)  # all retrieval heads: dense answers
    out = tmp_path / "passkey"
    assert main(["passkey", "--model", str(model_dir), "--lengths", "48", "--depths", "0.5", "--trials", "2",
                 "--num-sink-tokens", "2", "--window-length", "8", "--chunk-size", "16", "--max-new-tokens", "3",
                 "--modes", "dense,duo", "--pattern", str(pattern), "--no-plot",
                 "--output-dir", str(out), "--no-progress", "--threads", "1"]) == 0
    dense, duo = read_csv(out / "passkey.csv")
    assert (dense["mode"], duo["mode"]) == ("dense", "duo")
    assert duo["answers"] == dense["answers"]


def test_generate_compile_matches_eager(model_dir, capsys):
    """`--compile`: StaticSinkCache + generate's compile path (forced on CPU); greedy text identical to eager."""
    args = ["generate", "--model", str(model_dir), "--prompt", "the king is", "--max-new-tokens", "30",
            "--ignore-eos", "--num-sink-tokens", "2", "--window-length", "6", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    eager = capsys.readouterr()
    assert main(args + ["--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out
    m = re.search(r"\[(\d+) new tokens .*seen (\d+) tokens, resident (\d+) \(capacity 8", compiled.err)
    assert m and int(m.group(1)) == 30 and int(m.group(3)) == 8, compiled.err
