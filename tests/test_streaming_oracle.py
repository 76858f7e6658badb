"""The heart of the suite: streaming inside ``generate`` equals the oracles (docs/design.md §3), token by token.

* one-layer models: the recompute oracle (fresh forward over the visible tokens, positions 0..len-1);
* deeper models: a full-sequence forward where every attention layer is the fp64 spec (``reference_logits``).
"""

import pytest
import torch
from helpers import padded_batch, random_ids, tiny_model

import hf_sinks
from hf_sinks.attention import use_attention
from hf_sinks.compat import cache_kwargs
from hf_sinks.oracle import recompute_logits, reference_logits

TOL = 1e-4
SINK_IMPLS = ["sink_sdpa", "sink_eager", "sink_flex"]


def stream(model, prompt, cache, new_tokens, **kwargs):
    out = model.generate(
        prompt,
        **cache_kwargs(cache),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=kwargs.pop("do_sample", False),
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out, torch.stack(out.logits, dim=1)  # [B, steps, V]


# S, W, prompt length: below, at and above capacity
SIZES = [
    pytest.param(4, 12, 6, id="S4W12-prompt-below"),
    pytest.param(4, 12, 16, id="S4W12-prompt-at-capacity"),
    pytest.param(4, 12, 37, id="S4W12-prompt-above"),
    pytest.param(1, 7, 3, id="S1W7-odd"),
    pytest.param(0, 9, 20, id="S0-window-only"),
]


ARCHS = ["llama", "mistral", "gpt_neox", "falcon", "falcon_new", "falcon_mha"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", SINK_IMPLS + ["sdpa", "eager"])
@pytest.mark.parametrize("sinks,window,prompt_len", SIZES)
def test_one_layer_matches_recompute_oracle(arch, impl, sinks, window, prompt_len):
    if impl in ("sdpa", "eager") and prompt_len > sinks + window:
        pytest.skip("stock attentions cannot mask a prompt longer than the cache (needs a sink_* attention)")
    model = tiny_model(arch, impl, layers=1)
    prompt = random_ids(1, prompt_len)
    cache = hf_sinks.SinkCache(sinks, window, config=model.config)
    out, logits = stream(model, prompt, cache, 3 * (sinks + window))
    oracle = recompute_logits(model, out.sequences[0, :-1], sinks, window, start=prompt_len - 1)
    torch.testing.assert_close(logits[0], oracle, atol=TOL, rtol=0)
    assert cache.get_stored_length() == min(sinks + window, out.sequences.shape[1] - 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", SINK_IMPLS + ["sdpa"])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [pytest.param(4, 2, 16, id="gqa2"), pytest.param(4, 1, 8, id="mqa"), pytest.param(3, 3, 10, id="mha-odd")],
)
def test_deep_model_matches_spec(arch, impl, heads, kv_heads, head_dim):
    if arch in ("gpt_neox", "falcon_mha") and kv_heads != heads:
        pytest.skip("this architecture has no grouped-query attention")
    sinks, window, prompt_len = 3, 10, 5 if impl == "sdpa" else 29
    model = tiny_model(arch, impl, layers=3, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    prompt = random_ids(1, prompt_len)
    cache = hf_sinks.SinkCache(sinks, window, config=model.config)
    out, logits = stream(model, prompt, cache, 40)
    spec = reference_logits(model, out.sequences[0, :-1], sinks, window)[prompt_len - 1 :]
    torch.testing.assert_close(logits[0], spec, atol=TOL, rtol=0)


def test_spec_coincides_with_recompute_only_for_one_layer():
    """Documents why deep models are checked against the spec model, not the recompute oracle."""
    ids = random_ids(1, 30)[0]
    one = tiny_model("llama", "sdpa", layers=1)
    torch.testing.assert_close(
        reference_logits(one, ids, 2, 8)[10:], recompute_logits(one, ids, 2, 8, start=10), atol=TOL, rtol=0
    )
    deep = tiny_model("llama", "sdpa", layers=2)
    gap = (reference_logits(deep, ids, 2, 8)[10:] - recompute_logits(deep, ids, 2, 8, start=10)).abs().max()
    assert gap > 1e-3  # StreamingLLM's cached states are not recomputed (paper Fig. 1 (c) vs (d))


@pytest.mark.parametrize("impl", SINK_IMPLS + ["sdpa", "eager"])
def test_below_capacity_identical_to_dynamic_cache(impl):
    model = tiny_model("llama", impl, layers=2)
    prompt = random_ids(2, 7)
    _, sink_logits = stream(model, prompt, hf_sinks.SinkCache(4, 60), 20)
    # torch's compiled CPU flex is wrong at head_dim <= 16 (Inductor bug), so flex is held against sdpa
    with use_attention(model, "sdpa" if impl == "sink_flex" else impl):
        _, dense_logits = stream(model, prompt, None, 20)
    torch.testing.assert_close(sink_logits, dense_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "falcon_new"])
@pytest.mark.parametrize("impl", SINK_IMPLS)
@pytest.mark.parametrize("prompt_lens", [pytest.param((5, 9, 2), id="below"), pytest.param((30, 17, 8), id="above")])
def test_left_padded_batch_equals_each_row(arch, impl, prompt_lens):
    sinks, window = 2, 9
    model = tiny_model(arch, impl, layers=2)
    longest = max(prompt_lens)
    rows = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(prompt_lens)]
    prompt = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(prompt)
    for i, row in enumerate(rows):
        prompt[i, longest - len(row) :] = row
        mask[i, longest - len(row) :] = 1
    cache = hf_sinks.SinkCache(sinks, window)
    out, logits = stream(model, prompt, cache, 25, attention_mask=mask)
    for i, row in enumerate(rows):
        seq = torch.cat([row, out.sequences[i, longest:]])
        spec = reference_logits(model, seq[:-1], sinks, window)[len(row) - 1 :]
        torch.testing.assert_close(logits[i], spec, atol=TOL, rtol=0, msg=f"row {i}")
    assert cache.get_stored_length() <= sinks + window


def test_sampling_matches_spec():
    sinks, window = 4, 8
    model = tiny_model("mistral", "sink_sdpa", layers=2)
    torch.manual_seed(123)
    out, logits = stream(model, random_ids(1, 6), hf_sinks.SinkCache(sinks, window), 30, do_sample=True, top_k=0)
    spec = reference_logits(model, out.sequences[0, :-1], sinks, window)[5:]
    torch.testing.assert_close(logits[0], spec, atol=TOL, rtol=0)


def test_beam_search_scores_match_spec():
    sinks, window, prompt_len = 2, 6, 4
    model = tiny_model("llama", "sink_sdpa", layers=2)
    out = model.generate(
        random_ids(1, prompt_len),
        **cache_kwargs(hf_sinks.SinkCache(sinks, window)),
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=14,
        min_new_tokens=14,
        length_penalty=0.0,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for seq, score in zip(out.sequences, out.sequences_scores):
        logprobs = torch.log_softmax(reference_logits(model, seq[:-1], sinks, window), dim=-1)
        expected = logprobs[prompt_len - 1 :].gather(-1, seq[prompt_len:, None]).sum()
        torch.testing.assert_close(score, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("impl", SINK_IMPLS)
def test_multi_turn_reuses_cache(impl):
    sinks, window = 3, 10
    model = tiny_model("llama", impl, layers=2)
    cache = hf_sinks.SinkCache(sinks, window)
    first, _ = stream(model, random_ids(1, 8), cache, 12)
    user = random_ids(1, 9, seed=5)
    conversation = torch.cat([first.sequences, user], dim=-1)
    second, logits = stream(model, conversation, cache, 12)
    assert cache.get_seq_length() == second.sequences.shape[1] - 1
    spec = reference_logits(model, second.sequences[0, :-1], sinks, window)[conversation.shape[1] - 1 :]
    torch.testing.assert_close(logits[0], spec, atol=TOL, rtol=0)


@pytest.mark.parametrize("sliding_window", [6, 30])
def test_mistral_sliding_window_follows_the_per_layer_rule(sliding_window):
    """docs/design.md §2.3: sw <= S + W attends natively (its window, no sinks) and keeps only that window;
    sw > S + W follows the sink + window rule."""
    sinks, window = 4, 12
    model = tiny_model("mistral", "sink_sdpa", layers=2, sliding_window=sliding_window)
    cache = hf_sinks.SinkCache(sinks, window)
    out, logits = stream(model, random_ids(1, 20), cache, 30)
    spec = reference_logits(model, out.sequences[0, :-1], sinks, window)[19:]
    torch.testing.assert_close(logits[0], spec, atol=TOL, rtol=0)
    held = sliding_window if sliding_window <= sinks + window else sinks + window
    assert all(layer.keys.shape[2] == held for layer in cache.layers)
    assert cache.get_stored_length() == held
    if sliding_window <= sinks + window:  # natively: the sinks are not seen, so the old global rule differs
        model.config.sliding_window = None
        old = reference_logits(model, out.sequences[0, :-1], sinks, window)[19:]
        assert (old - spec).abs().max() > 1e-2


def test_long_prompt_is_processed_in_bounded_blocks(monkeypatch):
    import hf_sinks.attention.functions as functions

    monkeypatch.setattr(functions, "QUERY_BLOCK", 8)
    key_lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, *args, **kwargs):
        key_lengths.append(k.shape[2])
        return sdpa(q, k, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    sinks, window = 2, 6
    model = tiny_model("llama", "sink_sdpa", layers=2)
    prompt = random_ids(1, 90)
    with torch.no_grad():
        logits = model(prompt, **cache_kwargs(hf_sinks.SinkCache(sinks, window))).logits[0]
    monkeypatch.undo()
    torch.testing.assert_close(logits, reference_logits(model, prompt, sinks, window), atol=TOL, rtol=0)
    assert key_lengths and max(key_lengths) <= sinks + 2 * window + 8  # never the whole 90-token prompt


@pytest.mark.parametrize("impl", ["sink_sdpa", "sdpa"])
def test_position_hook_keeps_positions_bounded_and_exact(impl):
    """With ``hf_sinks.apply`` positions never exceed 2 (S + W): no fp32 angle loss at any stream length."""
    sinks, window = 2, 6
    model = tiny_model("llama", "sdpa", layers=2)
    handle = hf_sinks.apply(model, num_sink_tokens=sinks, window_length=window)
    if impl == "sdpa":
        model.set_attn_implementation("sdpa")
    positions = []
    spy = model.model.register_forward_pre_hook(
        lambda m, a, kw: positions.append(int(kw["position_ids"].max())), with_kwargs=True
    )
    cache = hf_sinks.SinkCache.from_model(model)
    out, logits = stream(model, random_ids(1, 5), cache, 120)
    spy.remove()
    assert max(positions) < 2 * (sinks + window)
    spec = reference_logits(model, out.sequences[0, :-1], sinks, window)[4:]
    torch.testing.assert_close(logits[0], spec, atol=TOL, rtol=0)
    handle.remove()


def test_stock_attention_refuses_left_padded_batch():
    model = tiny_model("llama", "sdpa", layers=1)
    hf_sinks.apply(model, num_sink_tokens=2, window_length=7)
    model.set_attn_implementation("sdpa")
    prompt = random_ids(2, 6)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="left-padded batch.*sink_sdpa"):
        model.generate(
            prompt, attention_mask=mask, **cache_kwargs(hf_sinks.SinkCache.from_model(model)), max_new_tokens=3
        )


# ------------------------------------------------------- one prompt, several rows, stock attention (no apply)
# generate repeat_interleaves one prompt into num_beams / num_return_sequences rows before the first forward; the
# cache proves those rows unpadded (bit-identical at the first forward, SinkCache.rows_unpadded) and streams them
# under a stock attention past capacity, exactly.
ONE_PROMPT = dict(sinks=2, window=5, prompt_len=4, steps=16)  # capacity 7, 20 tokens per row


def oracle_next_logits(model, seq, sinks, window, layers):
    """The oracle's logits for the token after ``seq``: recompute for one layer, the fp64 spec model deeper."""
    if layers == 1:
        return recompute_logits(model, seq, sinks, window, start=len(seq) - 1)[-1]
    return reference_logits(model, seq, sinks, window)[-1]


def oracle_beam_search(model, prompt, beams, steps, sinks, window, layers, banned):
    """Beam search (no length penalty, ``banned`` tokens at -inf as min_new_tokens does) over the oracle's
    log-probabilities: the ``beams`` best ``(score, tokens)`` after ``steps`` tokens, best first."""
    running = [(0.0, prompt.tolist())]
    for _ in range(steps):
        candidates = []
        for score, seq in running:
            logits = oracle_next_logits(model, torch.tensor(seq), sinks, window, layers).double()
            logprobs = torch.log_softmax(logits, dim=-1)
            logprobs[banned] = float("-inf")
            top = torch.topk(logprobs, beams)
            candidates += [(score + v, seq + [t]) for v, t in zip(top.values.tolist(), top.indices.tolist())]
        running = sorted(candidates, key=lambda c: -c[0])[:beams]
    return running


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("num_return", [3, 2])
def test_stock_beam_search_from_one_prompt_matches_oracle(layers, num_return):
    sinks, window, prompt_len, steps = ONE_PROMPT.values()
    model = tiny_model("llama", "sdpa", layers=layers)
    prompt = random_ids(1, prompt_len)
    cache = hf_sinks.SinkCache(sinks, window, config=model.config)
    beams = dict(num_beams=3, num_return_sequences=num_return, length_penalty=0.0, output_scores=True)
    out, logits = stream(model, prompt, cache, steps, **beams)
    assert cache.rows_unpadded and cache.get_stored_length() == sinks + window
    eos = model.generation_config.eos_token_id
    banned = [eos] if isinstance(eos, int) else list(eos or [])
    expected = oracle_beam_search(model, prompt[0], 3, steps, sinks, window, layers, banned)[:num_return]
    assert out.sequences.tolist() == [seq for _, seq in expected]
    torch.testing.assert_close(
        out.sequences_scores.double(), torch.tensor([s for s, _ in expected], dtype=torch.float64), atol=1e-4, rtol=0
    )
    for i, seq in enumerate(out.sequences):  # every step of every returned beam, along the rows it lived in
        rows = out.beam_indices[i, :steps]
        for t in range(steps):
            want = oracle_next_logits(model, seq[: prompt_len + t], sinks, window, layers)
            torch.testing.assert_close(logits[rows[t], t], want, atol=TOL, rtol=0, msg=f"beam {i} step {t}")


@pytest.mark.parametrize("layers", [1, 3])
def test_stock_sampled_sequences_from_one_prompt_match_oracle(layers):
    sinks, window, prompt_len, steps = ONE_PROMPT.values()
    model = tiny_model("llama", "sdpa", layers=layers)
    cache = hf_sinks.SinkCache(sinks, window, config=model.config)
    torch.manual_seed(5)
    sampled = dict(do_sample=True, top_k=0, num_return_sequences=3)
    out, logits = stream(model, random_ids(1, prompt_len), cache, steps, **sampled)
    assert len({tuple(seq) for seq in out.sequences.tolist()}) == 3  # the rows really diverged
    for i, seq in enumerate(out.sequences):
        if layers == 1:
            want = recompute_logits(model, seq[:-1], sinks, window, start=prompt_len - 1)
        else:
            want = reference_logits(model, seq[:-1], sinks, window)[prompt_len - 1 :]
        torch.testing.assert_close(logits[i], want, atol=TOL, rtol=0, msg=f"row {i}")


def test_stock_attention_refuses_left_padded_rows_without_apply():
    """Rows that differ at their first forward may be padded; nobody told a stock attention's cache, so refuse."""
    model = tiny_model("llama", "sdpa", layers=2)
    rows, ids, mask = padded_batch([10, 4])
    with pytest.raises(ValueError, match=r"batch of 2 rows.*padding would become the rows' sinks.*hf_sinks.apply"):
        stream(model, ids, hf_sinks.SinkCache(2, 5, config=model.config), 12, attention_mask=mask)
    # the same rows unpadded are refused too: the cache cannot tell them from padded ones (SinkCache.rows_unpadded)
    with pytest.raises(ValueError, match=r"batch of 2 rows.*differed in a multi-token forward"):
        stream(model, random_ids(2, 6), hf_sinks.SinkCache(2, 5, config=model.config), 12)
