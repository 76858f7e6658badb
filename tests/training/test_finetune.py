"""finetune / load_finetuned / the example / the CLI on tiny models: loss goes down, exact round trips, streaming."""

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from training_helpers import LEARNABLE_TEXT, char_tokenizer, logits_of

import hf_sinks
from hf_sinks.compat import cache_kwargs
from hf_sinks.training import finetune, load_finetuned, prepend_sink_token
from hf_sinks.training.finetune import LOSS_CSV, LOSS_PNG, RECIPE_FILE

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path, recipe, arch="llama", steps=30, lr=1e-2, **kwargs):
    tok = char_tokenizer()
    model = tiny_model(arch, attn_implementation="sdpa", **kwargs.pop("model_kwargs", {}))
    result = finetune(
        model,
        tok,
        recipe,
        LEARNABLE_TEXT,
        seq_len=32,
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=0,
        output_dir=tmp_path / "out",
        progress=False,
        **kwargs,
    )
    return result, tok


def test_a_few_steps_reduce_the_loss_and_everything_is_saved(tmp_path):
    result, _ = _train(tmp_path, "longlora", lr=2e-2, attn_implementation=None)
    losses = result.losses
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)  # nats; a frozen model would stay put
    out = result.output_dir
    for name in ("adapter_model.safetensors", "adapter_config.json", RECIPE_FILE, LOSS_CSV, LOSS_PNG, "tokenizer.json"):
        assert (out / name).is_file(), name
    with open(out / LOSS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert float(rows[-1]["loss"]) == pytest.approx(losses[-1])
    saved = json.loads((out / RECIPE_FILE).read_text())
    assert saved["recipe"] == "longlora" and saved["sink_config"]["num_sink_tokens"] == 4


def test_sink_token_training_reduces_the_loss(tmp_path):
    result, tok = _train(tmp_path, "sink_token", steps=30, lr=1e-2)
    losses = result.losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4  # LoRA + one embedding row only: slower than longlora
    assert result.recipe.sink_token_id == len(tok) - 1


@pytest.mark.parametrize(
    "recipe, kwargs",
    [
        ("sink_token", {}),
        ("sinklora", {"learned_sink_logits": True, "rope_scaling": 2.0, "model_kwargs": {"tie_word_embeddings": True}}),
        ("longlora", {"attn_implementation": None}),
    ],
)
def test_save_load_merge_round_trip(tmp_path, recipe, kwargs):
    result, tok = _train(tmp_path, recipe, steps=6, **kwargs)
    tied = kwargs.get("model_kwargs", {}).get("tie_word_embeddings", False)
    ids = torch.randint(1, 90, (2, 24))
    if result.recipe.sink_token_id is not None:
        ids = prepend_sink_token(ids, result.recipe.sink_token_id)
    expected = logits_of(result.model, ids)
    untrained = tiny_model("llama", attn_implementation="sdpa", **kwargs.get("model_kwargs", {}))
    if result.recipe.sink_token_id is None:  # the adapter really changed something
        assert not torch.allclose(logits_of(untrained, ids), expected, atol=1e-3)

    fresh = lambda: tiny_model("llama", attn_implementation="sdpa", **kwargs.get("model_kwargs", {}))  # noqa: E731
    reloaded = load_finetuned(fresh(), result.output_dir, merge=False)
    torch.testing.assert_close(logits_of(reloaded, ids), expected, rtol=0, atol=1e-5)
    merged = load_finetuned(fresh(), result.output_dir, merge=True)
    assert not any("lora_" in n or "modules_to_save" in n or "token_adapter" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=0, atol=1e-5)
    assert merged.config.attention_sinks["num_sink_tokens"] == result.recipe.sink_config.num_sink_tokens
    if tied:
        torch.testing.assert_close(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)


def test_merged_sink_token_model_streams_with_one_sink(tmp_path):
    result, tok = _train(tmp_path, "sink_token", steps=4)
    merged = load_finetuned(tiny_model("llama", attn_implementation="sdpa"), result.output_dir)
    handle = hf_sinks.apply(merged, window_length=8)
    assert handle.sink_config.num_sink_tokens == 1  # from config.attention_sinks, written by the recipe
    prompt = prepend_sink_token(tok("the cat", return_tensors="pt")["input_ids"], result.recipe.sink_token_id)
    out = merged.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert out.shape == (1, prompt.shape[1] + 20) and out[0, 0] == result.recipe.sink_token_id
    # token-by-token streaming with the trained sink matches hf_sinks' spec model (docs/design.md §3.2)
    from hf_sinks.oracle import reference_logits

    ids = out[:, :30]
    cache = hf_sinks.SinkCache.from_model(merged, num_sink_tokens=1, window_length=8)
    streamed = torch.cat(
        [merged(input_ids=ids[:, i : i + 1], **cache_kwargs(cache)).logits for i in range(ids.shape[1])], 1
    )
    oracle = reference_logits(merged, ids[0], 1, 8)
    torch.testing.assert_close(streamed[0], oracle, rtol=1e-4, atol=1e-4)


def _tiny_model_dir(tmp_path) -> tuple[Path, Path]:
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama", attn_implementation="sdpa").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(LEARNABLE_TEXT)
    return model_dir, text


def test_example_runs_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("finetune_sinks_example", REPO / "examples" / "finetune_sinks.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model_dir, text = _tiny_model_dir(tmp_path)
    out = tmp_path / "example-out"
    status = example.main(
        [
            "--model",
            str(model_dir),
            "--text-file",
            str(text),
            "--recipe",
            "sink_token",
            "--seq-len",
            "32",
            "--max-steps",
            "3",
            "--learning-rate",
            "1e-2",
            "--output-dir",
            str(out),
            "--no-progress",
            "--demo-tokens",
            "5",
            "--demo-prompt",
            "the cat",
        ]
    )
    assert status == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / LOSS_CSV).is_file()
    printed = capsys.readouterr().out
    assert "streaming with 1 sink(s)" in printed and "loss" in printed


def test_cli_train_subcommand(tmp_path, capsys):
    from hf_sinks.cli.train import add_train_parser, cmd_train

    parser = argparse.ArgumentParser(prog="hf-sinks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    model_dir, text = _tiny_model_dir(tmp_path)
    out = tmp_path / "cli-out"
    args = parser.parse_args(
        [
            "train",
            "--model",
            str(model_dir),
            "--text-file",
            str(text),
            "--recipe",
            "longlora",
            "--r",
            "4",
            "--seq-len",
            "32",
            "--max-steps",
            "2",
            "--output-dir",
            str(out),
            "--no-progress",
            "--no-plot",
            "--attn-implementation",
            "sdpa",
            "--rope-scaling-type",
            "linear",
            "--rope-scaling-factor",
            "2",
        ]
    )
    assert args.func is cmd_train
    assert args.func(args) == 0
    saved = json.loads((out / RECIPE_FILE).read_text())
    assert saved["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "trained longlora for 2 steps" in capsys.readouterr().out

    bad = parser.parse_args(["train", "--model", str(model_dir), "--rope-scaling-type", "yarn"])
    with pytest.raises(ValueError, match="needs --rope-scaling-factor"):
        cmd_train(bad)
    missing = parser.parse_args(["train", "--model", str(model_dir), "--text-file", str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        cmd_train(missing)
