"""The lockstep decode path of ``SinkCache`` (rows at one count, no padding: slot, position and sink shift as Python
ints, bookkeeping written lazily) against the per-row path and the fp64 spec, in streams that switch between them."""

import pytest
import torch
from helpers import VOCAB, tiny_model

import hf_sinks
from hf_sinks.attention import functions
from hf_sinks.cache import SinkCacheLayer
from hf_sinks.compat import cache_kwargs
from hf_sinks.oracle import reference_logits

TOL = 1e-4
STATE = ("keys", "values", "sink_keys", "real_idx", "positions", "real_seen", "sink_shift")


def drive(model, cache, script, batch=2, seed=7):
    """Run ``script`` (forwards by hand) and return ``(records, per_row_tokens)``.

    Steps: ``("chunk", n)`` n tokens per row (n = 1: a decode step); ``("chunk", n, {row: pads})`` with left padding
    inside the chunk for some rows; ``("reorder", [rows])`` beam reorder; ``("positions", [offsets], n)`` n tokens
    per row with explicit ``position_ids`` (real index + offset per row). A record is ``(row tokens so far, logits of
    the row's last real token)``.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = [[] for _ in range(batch)]
    mask = torch.ones(batch, 0, dtype=torch.long)
    records = []
    with torch.inference_mode():
        for step in script:
            if step[0] == "reorder":
                idx = torch.tensor(step[1])
                cache.reorder_cache(idx)
                rows, mask = [list(rows[i]) for i in step[1]], mask[idx]
                continue
            n = step[2] if step[0] == "positions" else step[1]
            pads = step[2] if len(step) > 2 and step[0] == "chunk" else {}
            ids = torch.randint(1, VOCAB, (batch, n), generator=gen)
            new = torch.ones(batch, n, dtype=torch.long)
            for r, p in pads.items():
                new[r, :p] = 0
                ids[r, :p] = 0
            mask = torch.cat([mask, new], dim=-1)
            kwargs = {}
            if step[0] == "positions":
                kwargs["position_ids"] = torch.stack(
                    [len(rows[r]) + step[1][r] + torch.arange(n) for r in range(batch)]
                )
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(cache), **kwargs)
            for r in range(batch):
                rows[r] += [int(t) for t, m in zip(ids[r], new[r]) if m]
                records.append((list(rows[r]), out.logits[r, -1].clone()))
    return records, rows


def check_spec(model, records, sinks, window):
    for tokens, logits in records:
        spec = reference_logits(model, torch.tensor(tokens), sinks, window)[-1]
        torch.testing.assert_close(logits, spec, atol=TOL, rtol=0)


def both_paths(monkeypatch, make, script, **kw):
    """The same stream with the lockstep path on and off: logits and final cache state must be bit-identical."""
    results = []
    for fast in (True, False):
        monkeypatch.setattr(SinkCacheLayer, "lockstep_fast_path", fast)
        model, cache = make()
        records, _ = drive(model, cache, script, **kw)
        results.append((model, cache, records))
    (model, cache, fast), (_, slow_cache, slow) = results
    for (tokens_a, a), (tokens_b, b) in zip(fast, slow):
        assert tokens_a == tokens_b
        assert torch.equal(a, b)
    for mine, theirs in zip(cache.layers, slow_cache.layers):
        for name in STATE:
            assert torch.equal(getattr(mine, name), getattr(theirs, name)), name
        assert (mine.uniform, mine.filled, mine.seen) == (theirs.uniform, theirs.filled, theirs.seen)
    return model, fast


SCRIPT = (
    [("chunk", 5)]
    + [("chunk", 1)] * 14  # decode through more than one eviction cycle (S + W = 8)
    + [("chunk", 7)]
    + [("chunk", 1)] * 9  # a later turn (chunked prefill), then decode again
    + [("reorder", [1, 1])]
    + [("chunk", 1)] * 6  # beam reorder mid-stream: both rows continue row 1
    + [("chunk", 19)]
    + [("chunk", 1)] * 4  # a chunk longer than the cache
)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])  # gpt_neox: partial rotary (rotate_with path)
@pytest.mark.parametrize("sinks,window", [(2, 6), (0, 5), (3, 1)])
def test_lockstep_equals_per_row_path_and_spec(monkeypatch, arch, sinks, window):
    def make():
        model = tiny_model(arch, "sink_sdpa", layers=2)
        return model, hf_sinks.SinkCache(sinks, window)

    model, records = both_paths(monkeypatch, make, SCRIPT)
    check_spec(model, records, sinks, window)


def test_lockstep_then_padded_chunk_then_per_row(monkeypatch):
    """Left padding inside a later chunk leaves lockstep for good; the rest of the stream stays exact."""
    sinks, window = 2, 6

    def make():
        model = tiny_model("llama", "sink_sdpa", layers=2)
        hf_sinks.apply(model, num_sink_tokens=sinks, window_length=window)
        return model, hf_sinks.SinkCache.from_model(model)

    script = [("chunk", 4)] + [("chunk", 1)] * 10 + [("chunk", 6, {1: 3})] + [("chunk", 1)] * 12
    model, records = both_paths(monkeypatch, make, script)
    check_spec(model, records, sinks, window)


@pytest.mark.parametrize("offsets", [[5, 5], [0, 3]], ids=["same-offset", "per-row-offsets"])
def test_given_position_ids(monkeypatch, offsets):
    """position_ids offset from the real index: one offset for all rows stays on the lockstep path (the sinks'
    offset is one int), different offsets per row take the per-row path; both exact (RoPE is relative)."""
    sinks, window = 2, 5

    def make():
        model = tiny_model("llama", "sink_sdpa", layers=2)
        return model, hf_sinks.SinkCache(sinks, window)

    script = [("positions", offsets, 3)] + [("positions", offsets, 1)] * 14
    model, records = both_paths(monkeypatch, make, script)
    check_spec(model, records, sinks, window)


def test_position_hook_rebases_in_lockstep(monkeypatch):
    """hf_sinks.apply re-bases positions every ~S + W tokens: the lockstep path follows the base."""
    sinks, window = 2, 4

    def make():
        model = tiny_model("llama", "sink_sdpa", layers=2)
        hf_sinks.apply(model, num_sink_tokens=sinks, window_length=window)
        return model, hf_sinks.SinkCache.from_model(model)

    model, records = both_paths(monkeypatch, make, [("chunk", 3)] + [("chunk", 1)] * 30)
    check_spec(model, records, sinks, window)


def test_lockstep_decode_takes_the_fast_path(monkeypatch):
    """In lockstep no decode step goes through the per-row prepare_decode; after left padding every step does."""
    calls = []
    real = functions.prepare_decode
    monkeypatch.setattr(functions, "prepare_decode", lambda *a: calls.append(1) or real(*a))
    model = tiny_model("llama", "sink_sdpa", layers=2)
    cache = hf_sinks.SinkCache(2, 6)
    drive(model, cache, [("chunk", 5)] + [("chunk", 1)] * 12)
    assert calls == [] and all(layer.uniform == 17 for layer in cache.layers)
    drive(model, cache, [("chunk", 3, {0: 1})] + [("chunk", 1)] * 2)
    assert len(calls) == 2 * 2 and all(layer.uniform is None for layer in cache.layers)


def test_stock_attention_lockstep_equals_spec(monkeypatch):
    """Under a stock attention the cache shifts the sinks itself, through the same lockstep path."""
    sinks, window = 2, 6

    def make():
        model = tiny_model("llama", "sdpa", layers=2)
        hf_sinks.apply(model, num_sink_tokens=sinks, window_length=window)  # tells the cache there is no padding
        model.set_attn_implementation("sdpa")
        return model, hf_sinks.SinkCache.from_model(model)

    script = [("chunk", 6)] + [("chunk", 1)] * 20 + [("reorder", [0, 0])] + [("chunk", 1)] * 5
    model, records = both_paths(monkeypatch, make, script, batch=2)
    check_spec(model, records, sinks, window)


def test_bookkeeping_is_written_when_read():
    """The recorded real_idx / positions / real_seen / sink_shift are exact whenever someone reads them."""
    sinks, window = 2, 5
    model = tiny_model("llama", "sink_sdpa", layers=1)
    cache = hf_sinks.SinkCache(sinks, window)
    drive(model, cache, [("chunk", 2)] + [("chunk", 1)] * 9)  # 11 real tokens: sinks 0, 1; window 6..10
    layer = cache.layers[0]
    assert layer._lazy_slots  # recorded, not yet written
    expected = torch.tensor([0, 1, 7, 8, 9, 10, 6])  # slot of real r >= 2: 2 + (r - 2) % 5
    assert torch.equal(layer.real_idx, expected.expand(2, -1))
    assert torch.equal(layer.positions, expected.expand(2, -1))
    assert torch.equal(layer.real_seen, torch.tensor([11, 11]))
    assert torch.equal(layer.sink_shift, torch.tensor([10 - 6, 10 - 6]))  # query at 10 sees itself at S + W - 1
    assert not layer._lazy_slots
