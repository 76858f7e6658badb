"""DuoCache / duo_sdpa / HeadPattern / head identification (hf_sinks.duo).

The reference is written here: one full-sequence forward (no cache, absolute positions) whose attention applies,
per KV head, causal attention (retrieval heads) or the sink + window rule ``j <= i and (j < S or i - j < W)``
(streaming heads) through an explicit boolean mask, in fp64.
"""

import random

import pytest
import torch
from helpers import passkey_bpe_tokenizer, random_ids, tiny_model
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.masking_utils import sdpa_mask

import hf_sinks
from hf_sinks import duo
from hf_sinks.attention import use_attention
from hf_sinks.compat import cache_kwargs
from hf_sinks.duo import DuoCache, HeadPattern
from hf_sinks.duo import eval as duo_eval
from hf_sinks.eval import streaming_perplexity
from hf_sinks.eval.memory import cache_bytes
from hf_sinks.rope import RotaryParams

duo.register()

S, W = 3, 5
_REF: list = []  # (retrieval [L, KVH], S, W) of the running reference forward
REF_NAME = "duo_test_reference"


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    retrieval, sinks, window = _REF[-1]
    t, heads = query.shape[2], query.shape[1]
    groups = heads // key.shape[1]
    k = key.double().repeat_interleave(groups, 1)
    v = value.double().repeat_interleave(groups, 1)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None]
    causal = j <= i
    rule = causal & ((j < sinks) | (i - j < window))
    head_is_retrieval = retrieval[module.layer_idx].repeat_interleave(groups)  # [H]
    mask = torch.where(head_is_retrieval[:, None, None], causal, rule)  # [H, T, T]
    scores = (query.double() @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REF_NAME, _reference_attention)
AttentionMaskInterface.register(REF_NAME, sdpa_mask)


@torch.no_grad()
def reference_logits(model, ids, pattern, sinks=S, window=W):
    _REF.append((pattern.retrieval, sinks, window))
    try:
        with use_attention(model, REF_NAME):
            return model(input_ids=ids, use_cache=False).logits
    finally:
        _REF.pop()


@torch.no_grad()
def streamed_logits(model, ids, cache, chunks):
    """Feed ``ids`` in chunks of the given sizes (then token by token) through ``cache``; all logits."""
    out, pos = [], 0
    for size in chunks:
        out.append(model(input_ids=ids[:, pos : pos + size], **cache_kwargs(cache), use_cache=True).logits)
        pos += size
    while pos < ids.shape[1]:
        out.append(model(input_ids=ids[:, pos : pos + 1], **cache_kwargs(cache), use_cache=True).logits)
        pos += 1
    return torch.cat(out, dim=1)


def mixed_pattern(model, seed=0):
    layers, kv = duo.pattern._kv_shape(model.config)
    gen = torch.Generator().manual_seed(seed)
    retrieval = torch.rand(layers, kv, generator=gen) < 0.5
    retrieval[0, 0], retrieval[-1, -1] = True, False  # both kinds present
    return HeadPattern(retrieval)


ARCHS = [("llama", {}), ("gpt_neox", {"kv_heads": 4})]


# ------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("arch,kw", ARCHS)
def test_all_retrieval_generate_equals_dynamic_cache(arch, kw):
    model = tiny_model(arch, attn_implementation="duo_sdpa", **kw)
    prompt = random_ids(2, 9)
    common = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    duo_out = model.generate(prompt, **cache_kwargs(DuoCache(HeadPattern.full(model.config), S, W)), **common)
    with use_attention(model, "sdpa"):
        dense = model.generate(prompt, **cache_kwargs(DynamicCache()), **common)
    assert torch.equal(duo_out.sequences, dense.sequences)
    torch.testing.assert_close(torch.stack(duo_out.logits), torch.stack(dense.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,kw", ARCHS)
@pytest.mark.parametrize("chunks", [[], [2, 13], [25]], ids=["decode", "chunks", "one_chunk"])
def test_all_streaming_equals_rule_reference(arch, kw, chunks, monkeypatch):
    monkeypatch.setattr(duo.cache, "QUERY_BLOCK", 4)  # several query blocks per chunk
    model = tiny_model(arch, attn_implementation="duo_sdpa", **kw)
    ids = random_ids(1, 32)
    pattern = HeadPattern.streaming(model.config)
    got = streamed_logits(model, ids, DuoCache(pattern, S, W), chunks)
    ref = reference_logits(model, ids, pattern)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # the reference must not be trivially dense: past capacity it differs from full attention
    with use_attention(model, "sdpa"):
        dense = model(input_ids=ids).logits
    assert (dense[:, S + W :] - ref[:, S + W :]).abs().max() > 1e-3


def test_all_streaming_equals_the_per_head_reference_and_a_foreign_rotary_is_refused():
    """An all-streaming DuoCache decodes what the per-head rule's fp64 reference gives (its streaming heads keep the
    keys' original rotation). A SinkCache handed a rotary the model does not use (zero frequencies, to imitate that
    original rotation) is refused under a stock attention: the cache compares it with the calling module's config."""
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = random_ids(1, 30)
    pattern = HeadPattern.streaming(model.config)
    with use_attention(model, "duo_sdpa"):
        got = streamed_logits(model, ids, DuoCache(pattern, S, W), [])
    torch.testing.assert_close(got, reference_logits(model, ids, pattern), atol=1e-5, rtol=0)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    no_rotation = RotaryParams(inv_freq=torch.zeros(head_dim // 2), rotary_dim=head_dim)
    with pytest.raises(ValueError, match="rotary parameters"):
        streamed_logits(model, ids, hf_sinks.SinkCache(S, W, rotary=no_rotation), [])


@pytest.mark.parametrize("arch,kw", ARCHS)
@pytest.mark.parametrize("chunks", [[], [4, 7, 7, 7], [28]], ids=["decode", "chunked_prefill", "one_chunk"])
def test_mixed_pattern_equals_per_head_reference(arch, kw, chunks, monkeypatch):
    monkeypatch.setattr(duo.cache, "QUERY_BLOCK", 8)
    model = tiny_model(arch, attn_implementation="duo_sdpa", layers=3, **kw)
    ids = random_ids(1, 40)  # prompt of 25-28 tokens > S + W, then decoding past capacity
    pattern = mixed_pattern(model)
    got = streamed_logits(model, ids, DuoCache(pattern, S, W), chunks)
    ref = reference_logits(model, ids, pattern)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # and differs from both all-retrieval and all-streaming (the pattern matters, head by head)
    for other in (HeadPattern.full(model.config), HeadPattern.streaming(model.config)):
        assert (reference_logits(model, ids, other) - ref).abs().max() > 1e-4


def test_batch_rows_are_independent():
    model = tiny_model("llama", attn_implementation="duo_sdpa")
    ids = random_ids(2, 24)
    pattern = mixed_pattern(model)
    both = streamed_logits(model, ids, DuoCache(pattern, S, W), [10])
    for row in range(2):
        one = streamed_logits(model, ids[row : row + 1], DuoCache(pattern, S, W), [10])
        torch.testing.assert_close(both[row : row + 1], one, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("chunks", [[], [40, 17]], ids=["decode", "chunks"])
def test_stored_bytes_exact(chunks):
    model = tiny_model("llama", attn_implementation="duo_sdpa", layers=2, heads=4, kv_heads=2, head_dim=16)
    pattern = HeadPattern(torch.tensor([[True, False], [False, False]]))  # f = 3/4 streaming
    n, batch = 60, 2
    ids = random_ids(batch, n)
    cache = DuoCache(pattern, S, W)
    streamed_logits(model, ids, cache, chunks)
    with use_attention(model, "sdpa"):
        dense = DynamicCache()
        model(input_ids=ids, **cache_kwargs(dense), use_cache=True)
    per_token_head = batch * 16 * 2 * 4  # keys + values, fp32
    expected = per_token_head * (1 * n + 3 * (S + W))
    assert cache.stored_bytes() == expected
    assert cache_bytes(cache) == expected  # the generic meter sees exactly the KV, nothing over-allocated
    assert cache.get_stored_lengths(0) == (n, S + W) and cache.get_stored_lengths(1) == (0, S + W)
    f = pattern.streaming_fraction
    dense_bytes = cache_bytes(dense)
    assert dense_bytes == per_token_head * 4 * n
    assert expected == pytest.approx((1 - f) * dense_bytes + f * dense_bytes * (S + W) / n)


# ------------------------------------------------------------------------------------------------ pattern
def test_pattern_from_scores_sparsity_and_threshold():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.2]])
    half = HeadPattern.from_scores(scores, sparsity=0.5)
    assert half.retrieval.tolist() == [[True, False, True], [False, True, False]]
    assert half.streaming_fraction == 0.5 and half.metadata["sparsity"] == 0.5
    assert HeadPattern.from_scores(scores, sparsity=0.0).retrieval.all()
    assert not HeadPattern.from_scores(scores, sparsity=1.0).retrieval.any()
    assert HeadPattern.from_scores(scores, threshold=0.5).retrieval.tolist() == [
        [True, False, True],
        [False, True, False],
    ]
    for bad in (
        dict(),
        dict(sparsity=0.5, threshold=0.5),
        dict(sparsity=1.5),
        dict(sparsity=-0.1),
        dict(threshold=float("nan")),
    ):
        with pytest.raises(ValueError):
            HeadPattern.from_scores(scores, **bad)
    with pytest.raises(ValueError, match="finite"):
        HeadPattern.from_scores(torch.tensor([[0.1, float("nan")]]), sparsity=0.5)
    with pytest.raises(ValueError, match="num_layers"):
        HeadPattern.from_scores(torch.ones(4), sparsity=0.5)


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_pattern_save_load_round_trip(tmp_path, suffix):
    model = tiny_model("llama", attn_implementation="duo_sdpa")
    scores = torch.rand(2, 2)
    pattern = HeadPattern.from_scores(scores, sparsity=0.5, metadata={"source": "test", "steps": 3})
    path = pattern.save(tmp_path / f"pattern{suffix}")
    loaded = HeadPattern.load(path, config=model.config)
    assert torch.equal(loaded.retrieval, pattern.retrieval)
    torch.testing.assert_close(loaded.scores, pattern.scores, atol=1e-6, rtol=0)
    assert loaded.metadata == pattern.metadata
    bare = HeadPattern(torch.tensor([[1, 0], [0, 1]]))
    again = HeadPattern.load(bare.save(tmp_path / f"bare{suffix}"))
    assert again.scores is None and torch.equal(again.retrieval, bare.retrieval)


def test_pattern_validation_errors(tmp_path):
    model = tiny_model("llama", attn_implementation="duo_sdpa")  # 2 layers x 2 KV heads
    with pytest.raises(ValueError, match="2 layers x 2 KV heads"):
        HeadPattern(torch.ones(3, 2, dtype=torch.bool)).validate(model.config)
    with pytest.raises(ValueError, match="2 layers x 2 KV heads"):
        DuoCache(HeadPattern(torch.ones(2, 4, dtype=torch.bool)), S, W, config=model.config)
    with pytest.raises(ValueError, match="boolean"):
        HeadPattern(torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="boolean"):
        HeadPattern(torch.full((2, 2), 2))
    with pytest.raises(ValueError, match="non-empty"):
        HeadPattern(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must match"):
        HeadPattern(torch.ones(2, 2, dtype=torch.bool), scores=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\.npy"):
        HeadPattern.full(model.config).save(tmp_path / "p.npy")
    (tmp_path / "x.json").write_text('{"retrieval": [[1]]}')
    with pytest.raises(ValueError, match="Not a saved HeadPattern"):
        HeadPattern.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="window_length"):
        DuoCache(HeadPattern.full(model.config), S, 0)
    with pytest.raises(ValueError, match="HeadPattern"):
        DuoCache(torch.ones(2, 2, dtype=torch.bool), S, W)
    # the cache also checks the KV heads it actually receives
    wrong = HeadPattern(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="3"):
        model(input_ids=random_ids(1, 4), **cache_kwargs(DuoCache(wrong, S, W)), use_cache=True)


def test_stock_attention_is_refused():
    model = tiny_model("llama", attn_implementation="sdpa")
    cache = DuoCache(HeadPattern.streaming(model.config), S, W)
    model(input_ids=random_ids(1, 4), **cache_kwargs(cache), use_cache=True)
    with pytest.raises(ValueError, match="duo_sdpa"):
        model(input_ids=random_ids(1, 1), **cache_kwargs(cache), use_cache=True)


def test_duo_sdpa_without_duo_cache_is_stock_sdpa():
    model = tiny_model("llama", attn_implementation="duo_sdpa")
    ids = random_ids(1, 12)
    got = model(input_ids=ids).logits
    with use_attention(model, "sdpa"):
        torch.testing.assert_close(got, model(input_ids=ids).logits, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- identification
def test_gate_attention_limits():
    """alpha = 1 is full attention, alpha = 0 the streaming rule (the per-head reference)."""
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = random_ids(1, 24)
    for value, pattern in ((1.0, HeadPattern.full(model.config)), (0.0, HeadPattern.streaming(model.config))):
        alpha = torch.full((2, 2), value)
        with torch.no_grad(), duo.gated_attention(model, alpha, S, W):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, reference_logits(model, ids, pattern), atol=1e-5, rtol=0)


def test_passkey_examples():
    rng = random.Random(0)
    ex = duo.make_passkey_example(50, rng, vocab_size=96, key_length=4)
    assert ex.input_ids.shape == ex.answer_mask.shape and int(ex.answer_mask.sum()) == 4
    assert ex.answer_mask[-4:].all()
    key = ex.input_ids[-4:].tolist()
    text = ex.input_ids.tolist()
    assert any(text[i : i + 6] == [1] + key + [1] for i in range(len(text) - 10))  # the needle is in the haystack
    with pytest.raises(ValueError, match="vocab_size"):
        duo.make_passkey_example(50, rng)


def _train(model, reg_weight, steps=6, initial=0.5):
    return duo.identify_heads(
        model,
        num_steps=steps,
        lr=0.05,
        reg_weight=reg_weight,
        num_sink_tokens=2,
        window_length=4,
        context_length=(24, 32),
        initial_value=initial,
        key_length=3,
        seed=0,
        progress=False,
    )


def test_identify_heads_trains_only_the_gates():
    model = tiny_model("llama", attn_implementation="sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _train(model, reg_weight=0.0)
    assert not torch.equal(result.alpha, torch.full((2, 2), 0.5))  # the gates moved
    assert ((result.alpha >= 0) & (result.alpha <= 1)).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # frozen
    assert len(result.history) == 6 and all(h["distill"] >= 0 for h in result.history)
    assert result.history[0]["distill"] > 0  # the streaming path differs at these lengths
    assert result.pattern.scores is not None and result.pattern.streaming_fraction == 0.5
    assert model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad for p in model.parameters())  # restored after training


def test_identify_heads_l1_pushes_alpha_down():
    model = tiny_model("llama", attn_implementation="sdpa")
    free = _train(model, reg_weight=0.0).alpha
    sparse = _train(model, reg_weight=5.0).alpha
    assert sparse.mean() < free.mean() - 0.05
    assert sparse.mean() < 0.5  # below its initial value
    floor = _train(model, reg_weight=5.0, initial=0.05).alpha
    assert floor.min() == 0 and (floor >= 0).all()  # clamped to [0, 1] after every step


# ---------------------------------------------------------------------------------------------- evaluation
def test_duo_perplexity_matches_reference_for_any_chunk_size():
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = random_ids(1, 30)[0]
    pattern = mixed_pattern(model)
    ref = reference_logits(model, ids[None, :-1], pattern)[0]
    expected = torch.nn.functional.cross_entropy(ref, ids[1:], reduction="none")
    for chunk in (1, 7, 64):
        result = streaming_perplexity(model, ids, chunk_size=chunk, progress=False, cache=duo.DuoCache(pattern, S, W))
        torch.testing.assert_close(result.nll, expected, atol=1e-5, rtol=0)
        assert result.mode == "duo" and result.extra["streaming_fraction"] == pattern.streaming_fraction
        assert int(result.cache_bytes[-1]) > 0
    assert model.config._attn_implementation == "sdpa"


def test_attention_mass_scores():
    model = tiny_model("llama", attn_implementation="sdpa")
    scores = duo.attention_mass_scores(model, random_ids(1, 24)[0], S, W)
    assert scores.shape == (2, 2) and ((scores > 0) & (scores < 1)).all()
    # a wider window drops fewer keys: less mass outside it, head by head
    wider = duo.attention_mass_scores(model, random_ids(1, 24)[0], S, W + 4)
    assert (wider < scores).all()
    with pytest.raises(ValueError, match="num_sink_tokens"):
        duo.attention_mass_scores(model, random_ids(1, 8)[0], S, W)


def test_pattern_from_duo_attention_tsv(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t1.3\n")
    (tmp_path / "config.json").write_text('{"sink_size": 64, "recent_size": 256, "lr": 0.02}')
    pattern = HeadPattern.from_duo_attention(tmp_path, sparsity=0.5)
    assert pattern.retrieval.tolist() == [[True, False], [False, True]]
    assert pattern.scores[1, 1] == 1.0  # clipped to [0, 1] as the DuoAttention loader does
    assert pattern.metadata["sink_size"] == 64 and pattern.metadata["recent_size"] == 256
    assert (
        HeadPattern.from_duo_attention(
            tmp_path / "full_attention_heads.tsv", sparsity=None, threshold=0.5
        ).retrieval.sum()
        == 2
    )
    (tmp_path / "bad.tsv").write_text("0.9\tx\n")
    with pytest.raises(ValueError, match="table of numbers"):
        HeadPattern.from_duo_attention(tmp_path / "bad.tsv")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained offline on the passkey texts (as tests/eval/test_passkey.py does)."""
    return passkey_bpe_tokenizer()


def test_duo_passkey_all_retrieval_equals_dense(bpe_tokenizer):
    from hf_sinks.eval.passkey import passkey_accuracy

    model = tiny_model("llama", attn_implementation="sdpa", vocab_size=320)
    grid = dict(context_lengths=(120,), depths=(0.0, 1.0), trials=1, chunk_size=32, max_new_tokens=3)
    dense = passkey_accuracy(model, bpe_tokenizer, mode="dense", progress=False, **grid)
    full = duo_eval.duo_passkey_accuracy(model, bpe_tokenizer, HeadPattern.full(model.config), S, W, **grid)
    assert [r["answers"] for r in full] == [r["answers"] for r in dense]
    assert full[0]["mode"] == "duo" and full[0]["label"].startswith("duo 0% streaming")


def test_text_passkey_example(bpe_tokenizer):
    ex = duo.make_passkey_example(150, random.Random(1), tokenizer=bpe_tokenizer, key_length=5)
    text = bpe_tokenizer.decode(ex.input_ids)
    answer = bpe_tokenizer.decode(ex.input_ids[ex.answer_mask]).strip()
    key = answer.rstrip(".")
    assert len(key) == 5 and key.isdigit() and f"The pass key is {key}." in text
    assert text.rstrip().endswith(f"The pass key is {answer}") and abs(len(ex.input_ids) - 150) <= 25


def test_plot_head_pattern(tmp_path):
    pytest.importorskip("matplotlib")
    pattern = HeadPattern.from_scores(torch.rand(4, 3), sparsity=0.5)
    path = duo_eval.plot_head_pattern(pattern, tmp_path / "pattern.png")
    assert path.stat().st_size > 1000


def test_attention_mass_scores_at_chosen_queries():
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = random_ids(1, 24)[0]
    every = duo.attention_mass_scores(model, ids, S, W)
    explicit = duo.attention_mass_scores(model, ids, S, W, query_positions=torch.arange(S + W, 24))
    torch.testing.assert_close(explicit, every)
    early = duo.attention_mass_scores(model, ids, S, W, query_positions=torch.arange(0, S + W))
    assert (early == 0).all()  # nothing is dropped before the window fills
    with pytest.raises(ValueError, match="query_positions"):
        duo.attention_mass_scores(model, ids, S, W, query_positions=torch.tensor([24]))


def test_passkey_retrieval_scores_token_level():
    model = tiny_model("llama", attn_implementation="sdpa")
    scores = duo.passkey_retrieval_scores(model, None, S, W, context_length=40, num_examples=2, key_length=3)
    assert scores.shape == (2, 2) and ((scores > 0) & (scores < 1)).all()
    pattern = HeadPattern.from_scores(scores, sparsity=0.5)
    assert pattern.streaming_fraction == 0.5


def test_beam_search_all_retrieval_equals_dynamic_cache():
    model = tiny_model("llama", attn_implementation="duo_sdpa")
    prompt = random_ids(1, 6)
    common = dict(max_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=2)
    got = model.generate(prompt, **cache_kwargs(DuoCache(HeadPattern.full(model.config), S, W)), **common)
    with use_attention(model, "sdpa"):
        dense = model.generate(prompt, **cache_kwargs(DynamicCache()), **common)
    assert torch.equal(got, dense)
