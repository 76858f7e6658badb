"""H2OCache + h2o_sdpa against a naive reference that keeps the full attention matrix of every layer (fp64)."""

import math

import pytest
import torch
from helpers import random_ids, tiny_model
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from hf_sinks.attention import use_attention
from hf_sinks.attention.reference import visible_indices
from hf_sinks.compat import cache_kwargs
from hf_sinks.eval import streaming_perplexity
from hf_sinks.h2o import H2O_ATTENTION, H2OCache, register
from hf_sinks.oracle import reference_logits
from hf_sinks.rope import RotaryParams, apply_rotary, shift_rotary

register()

# ------------------------------------------------------------------------------------ naive reference
_REF = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """H2O written the obvious way: the full attention matrix A (fp64), kept sets as Python sets per KV head, and
    a token's score = the column sum of A over the rows seen so far (it receives nothing once evicted)."""
    s, w, heavy = _REF["args"]
    mode, rotary = _REF.get("positions", ("original", None))
    capacity = s + w + heavy
    _, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = scaling if scaling is not None else dim**-0.5
    q, k, v = query[0].double(), key[0].double(), value[0].double()
    if mode == "cache":  # undo the model's rotation at 0..T-1; each query re-positions its visible set below
        q = shift_rotary(q, -torch.arange(length), rotary)
        k = shift_rotary(k, -torch.arange(length), rotary)
    attn = torch.zeros(heads, length, length, dtype=torch.float64)
    held = [set() for _ in range(kv_heads)]
    kept_after = []  # step t -> per KV head, sorted kept indices after t's eviction
    visible_at = []  # step t -> per KV head, sorted indices query t saw
    for t in range(length):
        visible_at.append([])
        for kvh in range(kv_heads):
            visible = sorted(held[kvh] | {t})
            visible_at[-1].append(visible)
            for h in range(kvh * groups, (kvh + 1) * groups):
                if mode == "cache":  # keys at 0..m-1 in text order, the query at m-1
                    m = len(visible)
                    qt = apply_rotary(q[h, t][None], torch.tensor([m - 1]), rotary)[0]
                    kv = apply_rotary(k[kvh, visible], torch.arange(m), rotary)
                    logits = torch.stack([qt @ kv[r] for r in range(m)]) * scaling
                else:
                    logits = torch.stack([q[h, t] @ k[kvh, j] for j in visible]) * scaling
                attn[h, t, visible] = logits.softmax(-1)
            held[kvh] = set(visible)
            if len(held[kvh]) == capacity:
                column = attn[kvh * groups : (kvh + 1) * groups, : t + 1].sum((0, 1))
                candidates = [j for j in held[kvh] if j >= s and (t + 1) - j >= w]
                held[kvh].remove(min(candidates, key=lambda j: (float(column[j]), j)))
        kept_after.append([sorted(x) for x in held])
    _REF["kept"].append(kept_after)
    _REF["visible"].append(visible_at)
    _REF["keys"].append(key[0].clone())
    v_full = v.repeat_interleave(groups, dim=0)
    return (attn @ v_full).to(query.dtype)[None].transpose(1, 2).contiguous(), None


AttentionInterface.register("h2o_test_reference", _reference_attention)
AttentionMaskInterface.register("h2o_test_reference", sdpa_mask)


def reference(model, ids, s, w, heavy, positions="original"):
    """Logits ``[T, V]`` plus, per layer, the kept sets after each step and the rotated keys (original positions)."""
    _REF.update(args=(s, w, heavy), kept=[], visible=[], keys=[], positions=(positions, RotaryParams.from_model(model)))
    with use_attention(model, "h2o_test_reference"), torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0]
    return logits, _REF["kept"], _REF["visible"], _REF["keys"]


def stream(model, ids, cache, chunk, record=False):
    """Feed ``ids`` through ``model`` with ``cache``; logits ``[T, V]`` and (``record``) kept sets after each step."""
    logits, kept = [], []
    with use_attention(model, H2O_ATTENTION), torch.no_grad():
        for b in range(0, ids.numel(), chunk):
            out = model(input_ids=ids[None, b : b + chunk], **cache_kwargs(cache), use_cache=True)
            logits.append(out.logits[0])
            if record:
                kept.append([cache.kept_token_indices(layer_idx)[0].tolist() for layer_idx in range(len(cache.layers))])
    return torch.cat(logits), kept


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("s, w, heavy", [(2, 4, 5), (1, 3, 8), (0, 5, 3), (4, 2, 2)])
def test_token_by_token_matches_reference(s, w, heavy):
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 40, seed=s + w)[0]
    ref_logits, ref_kept, _, _ = reference(model, ids, s, w, heavy)
    cache = H2OCache(s, w, heavy)
    logits, kept = stream(model, ids, cache, chunk=1, record=True)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    for t in range(ids.numel()):
        for layer in range(2):
            assert kept[t][layer] == ref_kept[layer][t], (t, layer)
    assert cache.get_seq_length() == 40 and cache.get_stored_length(0) == s + w + heavy - 1


def test_heads_evict_independently():
    model = tiny_model("llama", attn_implementation="sdpa", layers=1, heads=4, kv_heads=2)
    with torch.no_grad():  # peaky, content-dependent attention (a random tiny model attends almost uniformly)
        model.model.layers[0].self_attn.q_proj.weight.mul_(30)
        model.model.layers[0].self_attn.k_proj.weight.mul_(30)
    ids = random_ids(1, 48, seed=7)[0]
    cache = H2OCache(1, 4, 6)
    stream(model, ids, cache, chunk=1)
    kept = cache.kept_token_indices(0)[0]
    assert kept.shape == (2, 10) and not torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("chunk", [3, 16, 64])
def test_chunks_match_reference(chunk, monkeypatch):
    import hf_sinks.h2o.cache as h2o

    monkeypatch.setattr(h2o, "QUERY_BLOCK", 7)  # several query blocks inside a chunk
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 64, seed=3)[0]
    ref_logits, ref_kept, _, _ = reference(model, ids, 2, 5, 6)
    cache = H2OCache(2, 5, 6)
    logits, _ = stream(model, ids, cache, chunk=chunk)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    for layer in range(2):
        assert cache.kept_token_indices(layer)[0].tolist() == ref_kept[layer][-1]


def test_mixed_chunks_and_decode_steps():
    """Multi-turn pattern: prompt chunk, decode steps, another chunk, more steps; kept sets and logits as reference."""
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 60, seed=13)[0]
    ref_logits, ref_kept, _, _ = reference(model, ids, 1, 4, 6)
    cache = H2OCache(1, 4, 6)
    logits, bounds = [], [0, 17, 18, 19, 20, 21, 22, 31, 32, 33, 34, 45, 46, 60]
    with use_attention(model, H2O_ATTENTION), torch.no_grad():
        for b0, b1 in zip(bounds, bounds[1:]):
            logits.append(model(input_ids=ids[None, b0:b1], **cache_kwargs(cache)).logits[0])
            for layer in range(2):
                assert cache.kept_token_indices(layer)[0].tolist() == ref_kept[layer][b1 - 1], (b1, layer)
    torch.testing.assert_close(torch.cat(logits), ref_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 8])
def test_kept_keys_stay_at_their_original_positions(chunk):
    """The positions contract: a kept key is exactly the model's key of that token rotated at its original index."""
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 50, seed=11)[0]
    _, _, _, ref_keys = reference(model, ids, 2, 4, 5)
    cache = H2OCache(2, 4, 5)
    stream(model, ids, cache, chunk=chunk)
    for layer in range(2):
        index, keys, _, _ = cache.layers[layer].kept_states()
        index, keys = index[0], keys[0]  # [KVH, n], [KVH, n, D]
        assert int(index.max()) == 49 and int(index.min()) == 0
        expected = torch.stack([ref_keys[layer][kvh, index[kvh]] for kvh in range(index.shape[0])])
        torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)


def _visibility_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """docs/design.md §2.1 visibility (hf_sinks.attention.reference.visible_indices) at absolute positions."""
    s, w = _REF["args"][:2]
    length = query.shape[2]
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        mask[i, visible_indices(i, s, w)] = True
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("h2o_test_visibility", _visibility_attention)
AttentionMaskInterface.register("h2o_test_visibility", sdpa_mask)


@pytest.mark.parametrize("s, w, chunk", [(2, 6, 1), (4, 5, 9), (0, 7, 4)])
def test_heavy_budget_zero_is_the_sink_window_rule(s, w, chunk):
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 36, seed=w)[0]
    cache = H2OCache(s, w, 0)
    logits, kept = stream(model, ids, cache, chunk=chunk, record=True)
    # which tokens are held: exactly the next query's sinks + window (the query itself excluded)
    for step, end in enumerate(range(chunk, 36 + chunk, chunk)):
        t = min(end, 36) - 1
        expected = [j for j in list(visible_indices(t + 1, s, w)) if j <= t]
        for layer in range(2):
            assert kept[step][layer] == [expected, expected], (t, layer)
    _REF["args"] = (s, w, 0)
    with use_attention(model, "h2o_test_visibility"), torch.no_grad():
        want = model(input_ids=ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-4)


def test_no_eviction_below_capacity_equals_dense():
    model = tiny_model("llama", attn_implementation="sdpa", layers=2)
    ids = random_ids(1, 20)[0]
    with torch.no_grad():
        dense = model(input_ids=ids[None]).logits[0]
    logits, _ = stream(model, ids, H2OCache(2, 8, 10), chunk=6)
    torch.testing.assert_close(logits, dense, atol=2e-5, rtol=1e-4)


def test_batch_rows_are_independent():
    model = tiny_model("llama", attn_implementation="sdpa", layers=2)
    ids = random_ids(2, 30, seed=5)
    cache = H2OCache(1, 4, 4)
    with use_attention(model, H2O_ATTENTION), torch.no_grad():
        both = torch.cat([model(input_ids=ids[:, b : b + 5], **cache_kwargs(cache)).logits for b in range(0, 30, 5)], 1)
    for row in range(2):
        alone, _ = stream(model, ids[row], H2OCache(1, 4, 4), chunk=5)
        torch.testing.assert_close(both[row], alone, atol=2e-5, rtol=1e-4)


def test_generate():
    """Greedy generate with an H2OCache picks, at every step, the argmax of the reference logits."""
    model = tiny_model("llama", attn_implementation=H2O_ATTENTION, layers=2)
    cache = H2OCache(2, 4, 4)
    out = model.generate(
        random_ids(1, 12), **cache_kwargs(cache), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
    )
    assert out.shape == (1, 32)
    assert cache.get_seq_length() == 31 and cache.get_stored_length() == 9
    ref_logits, _, _, _ = reference(model, out[0], 2, 4, 4)
    ref_logits[:, model.generation_config.eos_token_id] = -math.inf  # min_new_tokens suppresses EOS
    assert ref_logits[11:-1].argmax(-1).tolist() == out[0, 12:].tolist()


def test_stock_attention_is_refused():
    model = tiny_model("llama", attn_implementation="sdpa", layers=1)
    cache = H2OCache(1, 4, 4)
    with torch.no_grad():
        model(input_ids=random_ids(1, 5), **cache_kwargs(cache))
        with pytest.raises(ValueError, match="attn_implementation='h2o_sdpa'"):
            model(input_ids=random_ids(1, 1), **cache_kwargs(cache))


def test_without_cache_is_stock_sdpa():
    model = tiny_model("llama", attn_implementation="sdpa", layers=2)
    ids = random_ids(1, 16)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with use_attention(model, H2O_ATTENTION):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_sink_tokens=-1), "num_sink_tokens=-1"),
        (dict(window_length=0), "window_length=0"),
        (dict(heavy_budget=-3), "heavy_budget=-3"),
        (dict(heavy_budget=2.5), "heavy_budget=2.5"),
        (dict(window_length=True), "window_length=True"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        H2OCache(**kwargs)


def test_h2o_perplexity_matches_reference():
    model = tiny_model("llama", attn_implementation="sdpa", layers=2)
    ids = random_ids(1, 40, seed=9)[0]
    ref_logits, _, _, _ = reference(model, ids, 2, 4, 6)
    nll = torch.nn.functional.cross_entropy(ref_logits[:-1].float(), ids[1:], reduction="none")
    one = streaming_perplexity(model, ids, chunk_size=1, progress=False, cache=H2OCache(2, 4, 6))
    many = streaming_perplexity(model, ids, chunk_size=16, progress=False, cache=H2OCache(2, 4, 6))
    torch.testing.assert_close(one.nll, nll, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(many.nll, nll, atol=1e-4, rtol=1e-4)
    assert one.perplexity == pytest.approx(math.exp(float(nll.double().mean())), rel=1e-4)
    assert one.mode == "h2o" and one.extra == {"heavy_budget": 6, "positions": "original"} and one.peak_cache_bytes > 0
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="heavy_budget=-1"):
        streaming_perplexity(model, ids, progress=False, cache=H2OCache(2, 4, -1))


def test_beam_search_reorders_rows():
    """Beam search reorders/repeats the cache rows; every beam still holds S + W + H - 1 tokens per KV head."""
    model = tiny_model("llama", attn_implementation=H2O_ATTENTION, layers=2)
    cache = H2OCache(1, 3, 3)
    out = model.generate(
        random_ids(1, 10),
        **cache_kwargs(cache),
        max_new_tokens=8,
        min_new_tokens=8,
        num_beams=2,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (1, 18)
    assert cache.kept_token_indices(0).shape[:1] == (2,) and cache.get_stored_length() == 6


@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("arch", ["mistral", "gpt_neox"])  # gpt_neox: partial rotary, no GQA
def test_other_architectures_match_reference(arch, positions):
    model = tiny_model(arch, attn_implementation="sdpa", layers=2)
    ids = random_ids(1, 40, seed=17)[0]
    ref_logits, ref_kept, _, _ = reference(model, ids, 2, 4, 5, positions=positions)
    cache = H2OCache(2, 4, 5, positions=positions)
    logits, _ = stream(model, ids, cache, chunk=6)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert cache.kept_token_indices(1)[0].tolist() == ref_kept[1][-1]


# ------------------------------------------------------------------------------- positions="cache"
@pytest.mark.parametrize("s, w, heavy, chunk", [(2, 4, 5, 1), (1, 3, 6, 5), (0, 5, 3, 16), (4, 2, 2, 1)])
def test_cache_positions_match_reference(s, w, heavy, chunk, monkeypatch):
    import hf_sinks.h2o.cache as h2o

    monkeypatch.setattr(h2o, "QUERY_BLOCK", 6)
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 44, seed=s + 3 * w)[0]
    ref_logits, ref_kept, _, _ = reference(model, ids, s, w, heavy, positions="cache")
    cache = H2OCache(s, w, heavy, positions="cache")
    logits, kept = stream(model, ids, cache, chunk=chunk, record=True)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    ends = [min(e, 44) for e in range(chunk, 44 + chunk, chunk)]
    for step, end in enumerate(ends):
        for layer in range(2):
            assert kept[step][layer] == ref_kept[layer][end - 1], (end, layer)
    assert not torch.allclose(logits, reference(model, ids, s, w, heavy)[0], atol=1e-3)  # the two modes differ


@pytest.mark.parametrize("chunk", [1, 7])
def test_cache_positions_without_heavy_hitters_are_the_sink_spec(chunk):
    """heavy_budget=0, positions='cache' is docs/design.md §2.1-2.2: the fp64 spec (oracle.reference_logits)."""
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 40, seed=21)[0]
    logits, _ = stream(model, ids, H2OCache(3, 6, 0, positions="cache"), chunk=chunk)
    torch.testing.assert_close(logits, reference_logits(model, ids, 3, 6).float(), atol=2e-5, rtol=1e-4)


def test_cache_positions_mixed_steps():
    model = tiny_model("llama", attn_implementation="sdpa", layers=2, heads=4, kv_heads=2)
    ids = random_ids(1, 50, seed=23)[0]
    ref_logits, ref_kept, _, _ = reference(model, ids, 2, 3, 5, positions="cache")
    cache = H2OCache(2, 3, 5, positions="cache")
    bounds, logits = [0, 12, 13, 14, 15, 16, 17, 18, 29, 30, 31, 40, 41, 50], []
    with use_attention(model, H2O_ATTENTION), torch.no_grad():
        for b0, b1 in zip(bounds, bounds[1:]):
            logits.append(model(input_ids=ids[None, b0:b1], **cache_kwargs(cache)).logits[0])
            assert cache.kept_token_indices(1)[0].tolist() == ref_kept[1][b1 - 1], b1
    torch.testing.assert_close(torch.cat(logits), ref_logits, atol=2e-5, rtol=1e-4)


def test_bad_positions_mode():
    with pytest.raises(ValueError, match="positions='relative'"):
        H2OCache(positions="relative")
