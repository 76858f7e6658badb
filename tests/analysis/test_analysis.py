"""Sink diagnostics (hf_sinks.analysis) against hand-computed attention, constructed sinks and bad input."""

import argparse
import csv
import math

import pytest
import torch
from helpers import VOCAB, random_ids, tiny_model

from hf_sinks.analysis import (
    ANALYSIS_ATTENTION,
    _Accumulator,
    _key_statistics,
    _secondary_sinks,
    analyze,
)
from hf_sinks.cli.analyze import add_analyze_parser, cmd_analyze


def eager_attentions(model, ids):
    """Full ``[L][H, T, T]`` attention matrices from stock eager attention with ``output_attentions=True``."""
    from hf_sinks.attention import use_attention

    with use_attention(model, "eager"), torch.no_grad():
        out = model(input_ids=ids[None], use_cache=False, output_attentions=True)
    return [a[0].double() for a in out.attentions], out.logits


def reference_statistics(attn, sink_tokens, min_distance):
    """Sink scores, received and ratio-to-uniform per key, from full matrices, with explicit loops."""
    heads, length, _ = attn.shape
    scores = torch.tensor([float(attn[h, sink_tokens:, :sink_tokens].sum(-1).mean()) for h in range(heads)])
    received = torch.full((heads, length), float("nan"), dtype=torch.float64)
    ratio = received.clone()
    for j in range(sink_tokens, length):
        queries = list(range(j + min_distance, length))
        if len(queries) < min_distance:
            continue
        uniform = sum(1.0 / (i + 1) for i in queries) / len(queries)
        for h in range(heads):
            received[h, j] = sum(float(attn[h, i, j]) for i in queries) / len(queries)
            ratio[h, j] = received[h, j] / uniform
    return scores, received, ratio


# --------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("sink_tokens", [1, 3])
def test_matches_eager_attention_matrices(sink_tokens):
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 40)[0]
    attns, _ = eager_attentions(model, ids)
    result = analyze(
        model, ids, num_tokens=None, sink_tokens=sink_tokens, min_distance=4, progress=False, query_block=16
    )  # several query blocks
    assert model.config._attn_implementation == "sdpa"  # restored
    for layer, attn in enumerate(attns):
        scores, received, ratio = reference_statistics(attn, sink_tokens, 4)
        torch.testing.assert_close(result.sink_scores[layer], scores.double(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.key_received[layer].double(), received, atol=1e-6, rtol=1e-4, equal_nan=True)
        torch.testing.assert_close(result.key_ratio[layer].double(), ratio, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_layer0_matches_attention_computed_by_hand_from_q_and_k():
    """Layer 0 from the embedding: RMSNorm, q/k projections, RoPE, causal softmax, all written out here."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama", attn_implementation="sdpa", layers=1, heads=4, kv_heads=2)
    ids = random_ids(1, 24, seed=3)[0]
    attn_mod = model.model.layers[0].self_attn
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[None]))
        d = attn_mod.head_dim
        q = attn_mod.q_proj(x).view(1, 24, -1, d).transpose(1, 2)
        k = attn_mod.k_proj(x).view(1, 24, -1, d).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(24)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q.double() @ k.double().transpose(-1, -2)) * d**-0.5
        logits = logits.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), -math.inf)
        attn = logits.softmax(-1)[0]
    result = analyze(model, ids, num_tokens=None, min_distance=3, progress=False)
    scores, received, _ = reference_statistics(attn, 1, 3)
    torch.testing.assert_close(result.sink_scores[0], scores.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.key_received[0].double(), received, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_forward_output_unchanged():
    model = tiny_model("llama", attn_implementation="sdpa", layers=2)
    ids = random_ids(1, 30)[0]
    _, eager_logits = eager_attentions(model, ids)
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(out.logits))
    try:
        analyze(model, ids, num_tokens=None, progress=False, query_block=7)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], eager_logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ constructed models
def attention_model(sink_heads=(0, 1, 2, 3), magnet_token=5, strength=10.0):
    """One layer whose heads in ``sink_heads`` attend (almost) only to the token ``magnet_token``; the rest uniformly.

    q is a constant bias on the lowest-frequency rotary channel (it barely rotates over 64 positions); k is
    non-zero only for ``magnet_token``, whose embedding alone has hidden dim 0 set.
    """
    model = tiny_model(
        "llama", attn_implementation="sdpa", layers=1, heads=4, kv_heads=2, head_dim=16, attention_bias=True
    )
    attn = model.model.layers[0].self_attn
    d, c = 16, 7  # channel 7 pairs with 15: the lowest RoPE frequency, 10000 ** (-14 / 16)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[magnet_token] = 0.0
        emb[magnet_token, 0] = 1.0
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        for h in sink_heads:
            attn.q_proj.bias[h * d + c] = strength
        for kv in range(2):
            attn.k_proj.weight[kv * d + c, 0] = 1.0
    return model


def test_uniform_attention_has_known_score_and_no_secondary_sink():
    model = attention_model(sink_heads=())
    ids = random_ids(1, 48, seed=2)[0]
    ids[ids == 5] = 6
    result = analyze(model, ids, num_tokens=None, min_distance=4, progress=False)
    expected = sum(1.0 / (i + 1) for i in range(1, 48)) / 47  # query i gives 1/(i+1) to token 0
    torch.testing.assert_close(result.sink_scores, torch.full((1, 4), expected, dtype=torch.float64), atol=1e-6, rtol=0)
    ratio = result.key_ratio[~result.key_ratio.isnan()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
    assert result.secondary_sinks == []


def test_attention_forced_to_first_token():
    model = attention_model(sink_heads=(0, 2))
    ids = random_ids(1, 64, seed=4)[0]
    ids[ids == 5] = 6
    ids[0] = 5
    result = analyze(model, ids, num_tokens=None, progress=False)
    assert result.sink_scores[0, 0] > 1 - 1e-4 and result.sink_scores[0, 2] > 1 - 1e-4
    uniform = sum(1.0 / (i + 1) for i in range(1, 64)) / 63
    torch.testing.assert_close(
        result.sink_scores[0, [1, 3]], torch.full((2,), uniform, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert result.is_sink.tolist() == [[True, False, True, False]]
    assert result.sink_heads() == [(0, 0), (0, 2)]
    assert result.sink_ratio == 0.5
    # with two initial sink tokens the score is still ~1 for the forced heads (token 0 is inside the sink set)
    two = analyze(model, ids, num_tokens=None, sink_tokens=2, progress=False)
    assert two.sink_scores[0, 0] > 1 - 1e-4


@pytest.mark.parametrize("delta, expect", [(-1e-3, True), (1e-3, False)])
def test_epsilon_threshold(delta, expect):
    model = attention_model(sink_heads=())
    ids = random_ids(1, 32, seed=5)[0]
    ids[ids == 5] = 6
    score = sum(1.0 / (i + 1) for i in range(1, 32)) / 31
    result = analyze(model, ids, num_tokens=None, epsilon=score + delta, progress=False)
    assert bool(result.is_sink.all()) is expect and bool(result.is_sink.any()) is expect
    assert result.sink_ratio == (1.0 if expect else 0.0)
    assert result.layer_sink_ratio.tolist() == [1.0 if expect else 0.0]


def test_secondary_sink_from_a_constructed_model():
    model = attention_model(sink_heads=(1, 2, 3), magnet_token=5)
    ids = random_ids(1, 64, seed=6)[0]
    ids[ids == 5] = 6
    ids[10] = 5
    result = analyze(model, ids, num_tokens=None, min_distance=8, progress=False)
    assert [s.token_index for s in result.secondary_sinks] == [10]
    sink = result.secondary_sinks[0]
    assert sink.heads == [(0, 1), (0, 2), (0, 3)] and sink.layers == [0] and sink.token_id == 5
    assert sink.max_received > 0.99 and sink.max_ratio > 20
    assert bool((result.secondary_mass[0, 1:] > 0.9).all()) and float(result.secondary_mass[0, 0]) < 0.1
    # the queries before token 10 spread uniformly, so the first-token score is small
    assert bool((result.sink_scores < 0.3).all())


def test_secondary_sinks_on_a_constructed_attention_pattern():
    """Heads 0-1 send half of every query's mass to token 20; head 2 looks at its neighbours; head 3 uniform."""
    length, d = 80, 8
    probs = torch.zeros(4, length, length, dtype=torch.float64)
    for i in range(length):
        uniform = torch.full((i + 1,), 1.0 / (i + 1), dtype=torch.float64)
        probs[3, i, : i + 1] = uniform
        lo = max(0, i - 2)
        probs[2, i, lo : i + 1] = 1.0 / (i + 1 - lo)
        for h in (0, 1):
            probs[h, i, : i + 1] = uniform if i < 20 else 0.5 * uniform
            if i >= 20:
                probs[h, i, 20] += 0.5
    acc = _Accumulator(length, sink_tokens=1, min_distance=d, block=16)
    for t0 in range(0, length, 16):
        acc.add(0, probs[:, t0 : t0 + 16].float(), t0)
    received, ratio = _key_statistics(acc.far_mass[0][None], 1, d)
    ids = torch.arange(length)
    found = _secondary_sinks(ratio, received, ids, [], factor=20.0, min_heads=2)
    assert [(s.token_index, s.heads) for s in found] == [(20, [(0, 0), (0, 1)])]
    assert not bool((ratio[0, 2] > 20).any())  # the local head flags nothing: near queries do not count
    assert found[0].max_received == pytest.approx(
        0.5 + 0.5 * float(torch.tensor([1.0 / (i + 1) for i in range(20 + d, length)]).mean()), rel=1e-4
    )
    assert _secondary_sinks(ratio, received, ids, [], factor=20.0, min_heads=3) == []


# ------------------------------------------------------------------------------------------ errors
class WordTokenizer:
    def __call__(self, text, add_special_tokens=True, return_attention_mask=False):
        return {"input_ids": [1 + (hash(w) % (VOCAB - 1)) for w in text.split()]}

    def decode(self, ids):
        return f"<{ids[0]}>"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epsilon=0.0), "epsilon=0.0"),
        (dict(epsilon=1.0), "epsilon=1.0"),
        (dict(epsilon=-0.2), "epsilon=-0.2"),
        (dict(epsilon=1.5), "epsilon=1.5"),
        (dict(num_tokens=1), "num_tokens=1"),
        (dict(num_tokens=0), "num_tokens=0"),
        (dict(num_tokens=500), "num_tokens=500"),
        (dict(sink_tokens=0), "sink_tokens=0"),
        (dict(sink_tokens=10, num_tokens=10), "sink_tokens=10"),
        (dict(text=""), "text=''"),
        (dict(text="   \n"), "text='   \\n'"),
        (dict(secondary_factor=1.0), "secondary_factor=1.0"),
        (dict(min_distance=0), "min_distance=0"),
    ],
)
def test_bad_input(kwargs, message):
    model = tiny_model("llama", attn_implementation="sdpa", layers=1)
    kwargs = {"text": "a b c d e f g h i j k l m n o p", "num_tokens": 12, **kwargs}
    with pytest.raises(ValueError, match=message.replace("\\", "\\\\").replace("[", "\\[")):
        analyze(model, WordTokenizer(), progress=False, **kwargs)
    assert model.config._attn_implementation == "sdpa"


def test_too_short_ids():
    model = tiny_model("llama", attn_implementation="sdpa", layers=1)
    with pytest.raises(ValueError, match="1 token"):
        analyze(model, torch.tensor([3]), num_tokens=None, progress=False)


def test_text_with_tokenizer_and_save(tmp_path):
    model = tiny_model("llama", attn_implementation="sdpa", layers=2)
    text = " ".join(f"w{i % 7}" for i in range(60))
    result = analyze(model, WordTokenizer(), text=text, num_tokens=50, output_dir=tmp_path, progress=False)
    assert result.num_tokens == 50 and len(result.token_texts) == 50
    rows = list(csv.DictReader((tmp_path / "sink_scores.csv").open()))
    assert len(rows) == 2 * 4 and set(rows[0]) == {"layer", "head", "sink_score", "is_sink"}
    assert float(rows[5]["sink_score"]) == pytest.approx(float(result.sink_scores[1, 1]), abs=1e-6)
    for name in ("secondary_sinks.csv", "layer_summary.csv", "summary.txt", "sink_heatmap.png", "sink_layers.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "sink heads:" in result.summary()


def test_cli_parser_and_command(tmp_path, capsys):
    """``add_analyze_parser`` + ``cmd_analyze`` on a tiny model saved with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = " ".join(f"w{i % 11}" for i in range(300))
    text_file = tmp_path / "words.txt"
    text_file.write_text(words)
    model_dir = tmp_path / "model"
    tiny_model("llama", attn_implementation="sdpa", layers=2).save_pretrained(model_dir)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([words], trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(model_dir)

    parser = argparse.ArgumentParser(prog="hf-sinks")
    add_analyze_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "analyze",
            "--model",
            str(model_dir),
            "--text-file",
            str(text_file),
            "--num-tokens",
            "64",
            "--epsilon",
            "0.2",
            "--output-dir",
            str(out),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert args.func is cmd_analyze
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "sink heads:" in printed and "wrote" in printed
    rows = list(csv.DictReader((out / "sink_scores.csv").open()))
    assert len(rows) == 2 * 4
    assert (out / "sink_heatmap.png").is_file() and (out / "sink_layers.png").is_file()

    from hf_sinks.cli import CLIError

    bad = parser.parse_args(["analyze", "--model", str(model_dir), "--epsilon", "1.5"])
    with pytest.raises(CLIError, match="--epsilon=1.5"):
        cmd_analyze(bad)


def test_attention_name_is_not_left_registered_as_model_default():
    model = tiny_model("llama", attn_implementation="eager", layers=1)
    analyze(model, random_ids(1, 8)[0], num_tokens=None, progress=False)
    assert model.config._attn_implementation == "eager" != ANALYSIS_ATTENTION


@pytest.mark.parametrize("arch, extra", [("mistral", {}), ("mistral", {"sliding_window": 8}), ("gpt_neox", {})])
def test_other_architectures_match_eager(arch, extra):
    """Mistral (also with its own sliding window, from the mask builder) and GPT-NeoX."""
    model = tiny_model(arch, attn_implementation="sdpa", layers=2, **extra)
    ids = random_ids(1, 30, seed=8)[0]
    attns, _ = eager_attentions(model, ids)
    result = analyze(model, ids, num_tokens=None, min_distance=3, progress=False, query_block=8)
    for layer, attn in enumerate(attns):
        scores, received, _ = reference_statistics(attn, 1, 3)
        torch.testing.assert_close(result.sink_scores[layer], scores.double(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.key_received[layer].double(), received, atol=1e-6, rtol=1e-4, equal_nan=True)
