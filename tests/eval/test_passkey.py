"""hf_sinks.eval.passkey: prompt construction, scoring (with a fake model), both modes end to end on a tiny model."""

import importlib.util
import random

import pytest
import torch
from helpers import tiny_model

from hf_sinks.compat import cache_from_kwargs
from hf_sinks.eval.passkey import (
    FILLER,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    first_number,
    is_correct,
    make_passkey_prompt,
    passkey_accuracy,
    plot_passkey,
    random_key,
)

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer():
    """A real byte-level BPE tokenizer, trained offline on the prompt texts (digits stay single bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([INSTRUCTION, FILLER * 3, NEEDLE.format(key="12345"), QUESTION], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# ----------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("length", [200, 333, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_has_the_target_length_and_the_key_at_the_depth(tokenizer, length, depth):
    p = make_passkey_prompt(tokenizer, length, depth, "73012")
    ids = p.input_ids.tolist()
    assert len(ids) == length
    needle = tokenizer(NEEDLE.format(key="73012"), add_special_tokens=False).input_ids
    assert ids[p.needle_start : p.needle_start + len(needle)] == needle and p.needle_length == len(needle)
    assert tokenizer.decode(ids).count("73012") == 2  # the key appears only in the needle
    head = len(tokenizer(INSTRUCTION, add_special_tokens=False).input_ids)
    question = len(tokenizer(QUESTION, add_special_tokens=False).input_ids)
    filler = length - head - len(needle) - question
    assert p.needle_start - head == round(depth * filler)  # share of the filler before the needle
    assert tokenizer.decode(ids).endswith(QUESTION) and tokenizer.decode(ids).startswith(INSTRUCTION)
    assert p.depth == pytest.approx(p.needle_start / length)


def test_prompt_shorter_than_its_fixed_parts_has_no_filler(tokenizer):
    p = make_passkey_prompt(tokenizer, 5, 0.5, 42)
    assert tokenizer.decode(p.input_ids.tolist()) == INSTRUCTION + NEEDLE.format(key=42) + QUESTION


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"depth": 1.5}, r"depth=1.5"),
        ({"depth": -0.1}, r"depth=-0.1"),
        ({"context_length": 0}, r"context_length=0"),
        ({"key": "12a"}, r"key='12a'"),
    ],
)
def test_bad_prompt_arguments(tokenizer, kwargs, match):
    args = {"context_length": 100, "depth": 0.5, "key": "123", **kwargs}
    with pytest.raises(ValueError, match=match):
        make_passkey_prompt(tokenizer, **args)


# ----------------------------------------------------------------------------------------------- scoring
def test_scoring_takes_the_first_number():
    assert first_number(" 12345. Remember") == "12345" and first_number("no digits") is None
    assert is_correct(" 12345.", "12345") and is_correct("12345 is the pass key", 12345)
    assert not is_correct(" 1234.", "12345") and not is_correct(" 123456", "12345")
    assert not is_correct(" the key is 99 or 12345", "12345") and not is_correct("", "12345")


class KeyReader(torch.nn.Module):
    """A fake LM: reads the key from the prompt and then 'writes' it, or a wrong number when ``wrong(key)``."""

    def __init__(self, tokenizer, wrong):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.wrong = tokenizer, wrong
        self.question = tokenizer(QUESTION, add_special_tokens=False).input_ids
        self.seen, self.pending, self.cache = [], [], None

    def forward(self, input_ids, use_cache=True, logits_to_keep=0, **kwargs):
        cache = cache_from_kwargs(kwargs)
        if cache is not self.cache:  # a new prompt
            self.cache, self.seen, self.pending = cache, [], []
        self.seen += input_ids[0].tolist()
        if self.seen[-len(self.question) :] == self.question and not self.pending:
            key = first_number(self.tokenizer.decode(self.seen).split("pass key is", 1)[1])
            answer = str(int(key) + 1) if self.wrong(key) else key
            self.pending = self.tokenizer(f" {answer}. Remember it.", add_special_tokens=False).input_ids
        token = self.pending.pop(0) if self.pending else 0
        logits = torch.zeros(1, input_ids.shape[1], VOCAB)
        logits[0, -1, token] = 1.0
        return type("Out", (), {"logits": logits})()


def test_accuracy_counts_correct_and_wrong_answers(tokenizer):
    wrong = lambda key: int(key) % 3 == 0  # noqa: E731
    lengths, depths, trials = (200, 300), (0.0, 0.5, 1.0), 4
    rows = passkey_accuracy(
        KeyReader(tokenizer, wrong),
        tokenizer,
        lengths,
        depths,
        trials,
        mode="dense",
        max_new_tokens=8,
        seed=7,
        progress=False,
    )
    assert [(r["context_length"], r["depth"]) for r in rows] == [(n, d) for n in lengths for d in depths]
    total_wrong = 0
    for r in rows:
        keys = [random_key(random.Random(f"7-{r['context_length']}-{r['depth']}-{t}"), 5) for t in range(trials)]
        expected = sum(not wrong(k) for k in keys)
        total_wrong += trials - expected
        assert r["correct"] == expected and r["accuracy"] == expected / trials
        assert r["trials"] == trials and r["prompt_tokens"] == r["context_length"] and r["mode"] == "dense"
        assert all(f"{k}->" in r["answers"] for k in keys)
    assert 0 < total_wrong < trials * len(rows)  # both outcomes are exercised


class PromptRecorder(KeyReader):
    """A :class:`KeyReader` that also keeps every prompt it was given (everything before the first decode step)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, lambda key: False)
        self.prompts = []

    def forward(self, input_ids, use_cache=True, logits_to_keep=0, **kwargs):
        if cache_from_kwargs(kwargs) is not self.cache:  # a new prompt (KeyReader resets its state too)
            self.prompts.append([])
            self.pending = []
        if not self.pending:  # still reading the prompt
            self.prompts[-1] += input_ids[0].tolist()
        return super().forward(input_ids, use_cache, logits_to_keep, **kwargs)


def test_prefix_ids_are_prepended_to_the_same_prompts(tokenizer):
    prefix = [VOCAB - 1, VOCAB - 2]  # merged tokens, no digits in them
    assert first_number(tokenizer.decode(prefix)) is None
    grid = dict(context_lengths=(200, 300), depths=(0.0, 1.0), trials=2, chunk_size=64, seed=3, progress=False)
    plain_model, prefixed_model = PromptRecorder(tokenizer), PromptRecorder(tokenizer)
    plain = passkey_accuracy(plain_model, tokenizer, mode="dense", **grid)
    prefixed = passkey_accuracy(prefixed_model, tokenizer, mode="dense", prefix_ids=prefix, **grid)
    assert len(prefixed_model.prompts) == len(plain_model.prompts) == 8
    for with_prefix, without in zip(prefixed_model.prompts, plain_model.prompts):
        assert with_prefix == prefix + without  # the prefix comes first, then the very same prompt (same key)
    for r, q in zip(prefixed, plain):
        assert r["context_length"] == q["context_length"] and r["depth"] == q["depth"]
        assert r["prompt_tokens"] == q["prompt_tokens"] + 2 == r["context_length"] + 2  # not counted in the length
        assert r["answers"] == q["answers"] and r["correct"] == q["correct"] == r["trials"] == 2
        start = round(q["needle_depth"] * q["prompt_tokens"])  # needle start in the plain prompt
        assert r["needle_depth"] == pytest.approx((start + 2) / r["prompt_tokens"], abs=1e-4)
    assert prefixed[1]["needle_depth"] != plain[1]["needle_depth"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "window"}, r"mode 'window'.*dense, sink"),
        ({"trials": 0}, r"trials=0"),
        ({"chunk_size": 0}, r"chunk_size=0"),
        ({"window_length": 0}, r"window_length=0"),
        ({"context_lengths": ()}, r"must not be empty"),
    ],
)
def test_bad_accuracy_arguments(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        passkey_accuracy(KeyReader(tokenizer, lambda k: False), tokenizer, **{"progress": False, **kwargs})


# ------------------------------------------------------------------------------------ end to end, tiny model
def test_both_modes_end_to_end_and_sink_without_eviction_equals_dense(tokenizer):
    model = tiny_model("llama", vocab_size=VOCAB)
    grid = dict(
        context_lengths=(160, 220), depths=(0.0, 1.0), trials=1, chunk_size=32, max_new_tokens=3, progress=False
    )
    dense = passkey_accuracy(model, tokenizer, mode="dense", **grid)
    roomy = passkey_accuracy(model, tokenizer, mode="sink", num_sink_tokens=2, window_length=400, **grid)
    tight = passkey_accuracy(model, tokenizer, mode="sink", num_sink_tokens=2, window_length=16, **grid)
    assert [r["answers"] for r in roomy] == [r["answers"] for r in dense]  # nothing evicted: the same computation
    for r in tight:
        assert r["label"] == "sink 2+16" and r["num_sink_tokens"] == 2 and r["window_length"] == 16
        assert 0.0 <= r["accuracy"] <= 1.0
    assert model.config._attn_implementation == "sink_sdpa"
    # a prefix (e.g. a sink token) kept as the only sink, nothing evicted: the same computation as dense with it
    prefixed = [
        passkey_accuracy(model, tokenizer, mode=mode, num_sink_tokens=1, window_length=400, prefix_ids=[7], **grid)
        for mode in ("dense", "sink")
    ]
    assert [r["answers"] for r in prefixed[0]] == [r["answers"] for r in prefixed[1]]
    assert [r["prompt_tokens"] for r in prefixed[1]] == [161, 161, 221, 221]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_passkey(tmp_path):
    rows = [
        {"label": label, "context_length": n, "correct": c, "trials": 2}
        for label, acc in (("dense", (2, 2, 1)), ("sink 4+1020", (2, 1, 0)))
        for n, c in zip((512, 1024, 2048), acc)
    ]
    path = plot_passkey(rows, tmp_path / "passkey.png", title="t")
    assert path.stat().st_size > 1000


# ------------------------------------------------------------------------------------ h2o and duo modes, tiny model
def _record_caches(model):
    """Record ``(cache class, attention implementation)`` at every forward of ``model``."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((type(cache_from_kwargs(kwargs)).__name__, module.config._attn_implementation))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_h2o_and_duo_modes_use_their_cache_and_attention(tokenizer):
    from hf_sinks.duo import HeadPattern

    model = tiny_model("llama", attn_implementation="sdpa", vocab_size=VOCAB)
    seen = _record_caches(model)
    grid = dict(context_lengths=(160,), depths=(0.5,), trials=1, chunk_size=32, max_new_tokens=3, progress=False)
    h2o = passkey_accuracy(model, tokenizer, mode="h2o", num_sink_tokens=2, window_length=16, heavy_budget=8, **grid)
    assert set(seen) == {("H2OCache", "h2o_sdpa")} and len(seen) == 5 + 2  # 5 prefill chunks + 2 decode steps
    assert model.config._attn_implementation == "sdpa"  # restored
    seen.clear()
    pattern = HeadPattern.streaming(model.config)
    duo = passkey_accuracy(model, tokenizer, mode="duo", num_sink_tokens=2, window_length=16, pattern=pattern, **grid)
    assert set(seen) == {("DuoCache", "duo_sdpa")} and model.config._attn_implementation == "sdpa"
    seen.clear()
    dense = passkey_accuracy(model, tokenizer, mode="dense", **grid)
    assert set(seen) == {("DynamicCache", "sdpa")}
    assert h2o[0]["label"] == "h2o 2+16+8" and h2o[0]["heavy_budget"] == 8 and h2o[0]["mode"] == "h2o"
    assert (
        duo[0]["label"] == "duo 100% streaming 2+16"
        and duo[0]["heavy_budget"] is None
        and dense[0]["heavy_budget"] is None
    )
    # bounded caches hold fewer bytes at the end of the prompt than the dense one
    assert 0 < h2o[0]["kv_bytes"] < dense[0]["kv_bytes"] and 0 < duo[0]["kv_bytes"] < dense[0]["kv_bytes"]


def test_roomy_h2o_and_all_retrieval_duo_give_the_dense_answers(tokenizer):
    from hf_sinks.duo import HeadPattern

    model = tiny_model("llama", attn_implementation="sdpa", vocab_size=VOCAB)
    grid = dict(
        context_lengths=(160, 220), depths=(0.0, 1.0), trials=1, chunk_size=32, max_new_tokens=4, progress=False
    )
    dense = passkey_accuracy(model, tokenizer, mode="dense", **grid)
    assert len({r["answers"].split("->")[1] for r in dense}) > 1  # the answers depend on the prompt
    full = passkey_accuracy(
        model, tokenizer, mode="duo", num_sink_tokens=2, window_length=8, pattern=HeadPattern.full(model.config), **grid
    )
    roomy = passkey_accuracy(
        model, tokenizer, mode="h2o", num_sink_tokens=2, window_length=200, heavy_budget=30, **grid
    )
    assert [r["answers"] for r in full] == [r["answers"] for r in dense]  # every head keeps everything
    assert [r["answers"] for r in roomy] == [r["answers"] for r in dense]  # S + W + H >= prompt + answer: no eviction
    streaming = passkey_accuracy(
        model,
        tokenizer,
        mode="duo",
        num_sink_tokens=2,
        window_length=8,
        pattern=HeadPattern.streaming(model.config),
        **grid,
    )
    assert all(s["kv_bytes"] < f["kv_bytes"] for s, f in zip(streaming, full))


def test_duo_passkey_accuracy_is_the_duo_mode(tokenizer):
    from hf_sinks.duo import HeadPattern
    from hf_sinks.duo.eval import duo_passkey_accuracy

    model = tiny_model("llama", attn_implementation="sdpa", vocab_size=VOCAB)
    pattern = HeadPattern.from_scores(torch.rand(2, 2), sparsity=0.5)
    grid = dict(context_lengths=(120,), depths=(0.0, 1.0), trials=1, chunk_size=32, max_new_tokens=3)
    wrapped = duo_passkey_accuracy(model, tokenizer, pattern, 2, 16, **grid)
    direct = passkey_accuracy(
        model, tokenizer, mode="duo", num_sink_tokens=2, window_length=16, pattern=pattern, progress=False, **grid
    )
    assert wrapped == direct


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "duo"}, r"mode 'duo' needs pattern"),
        ({"mode": "h2o"}, r"mode 'h2o' needs heavy_budget"),
        ({"mode": "h2o", "heavy_budget": -1}, r"mode 'h2o' needs heavy_budget.*-1"),
        ({"mode": "sink", "heavy_budget": 4}, r"heavy_budget=4 is only used by mode 'h2o'"),
        ({"mode": "dense", "pattern": "full"}, r"pattern is only used by mode 'duo'"),
        ({"mode": "duo", "pattern": "wrong shape"}, r"KV heads|layers"),
    ],
)
def test_bad_cache_arguments(tokenizer, kwargs, match):
    from hf_sinks.duo import HeadPattern

    model = tiny_model("llama", attn_implementation="sdpa", vocab_size=VOCAB)
    if kwargs.get("pattern") == "full":
        kwargs["pattern"] = HeadPattern.full(model.config)
    elif kwargs.get("pattern") == "wrong shape":
        kwargs["pattern"] = HeadPattern(torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=match):
        passkey_accuracy(model, tokenizer, context_lengths=(100,), depths=(0.5,), trials=1, progress=False, **kwargs)
