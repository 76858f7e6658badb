"""Tier 2: SinkCache bookkeeping against a plain list model of which tokens survive; which batches a stock attention
may stream (rows_unpadded) and the stock route's check of the calling model's rules."""

import copy

import pytest
import torch
from helpers import greedy, random_ids, tiny_model

from hf_sinks import RotaryParams, SinkCache, SinkConfig
from hf_sinks.attention.reference import visible_indices
from hf_sinks.compat import cache_kwargs
from hf_sinks.oracle import reference_logits

ROTARY = RotaryParams(torch.tensor([1.0, 0.1]), rotary_dim=4)


def feed(cache, start, size, batch=2, heads=2):
    """Values encode the token index so we can read back which tokens the cache holds."""
    idx = torch.arange(start, start + size, dtype=torch.float32)
    values = idx.view(1, 1, size, 1).expand(batch, heads, size, 4).clone()
    keys = torch.randn(batch, heads, size, 4)
    cache.begin_forward(batch, size, None, keys.device)  # as the position hook does: no padding in these rows
    return cache.update(keys, values, 0)


@pytest.mark.parametrize("sinks,window", [(4, 6), (0, 5), (2, 1), (7, 3)])
@pytest.mark.parametrize("chunks", [[1] * 25, [3, 1, 9, 1, 1, 4, 6], [25]])
def test_holds_exactly_the_sinks_and_the_window(sinks, window, chunks):
    cache = SinkCache(sinks, window, rotary=ROTARY)
    start = 0
    for size in chunks:
        keys, values = feed(cache, start, size)
        assert keys.shape == values.shape[:-1] + (4,)
        layer = cache.layers[0]
        layer.commit()  # what a sink attention does after attending; a no-op after single-token updates
        start += size
        held = sorted(layer.values[0, 0, : layer.filled, 0].long().tolist())
        expected = [j for j in range(start) if j < sinks or (start - 1) - j < window]
        assert held == expected
        assert layer.keys.shape[2] == sinks + window  # allocated once, never grows
        assert cache.get_stored_length() <= sinks + window
        assert cache.get_seq_length() == start


def test_visible_set_after_update_is_the_rule():
    """After writing token i, the resident tokens are exactly visible_indices(i)."""
    cache = SinkCache(3, 4, rotary=ROTARY)
    for i in range(20):
        _, values = feed(cache, i, 1)
        assert sorted(values[0, 0, :, 0].long().tolist()) == visible_indices(i, 3, 4)


def test_mask_sizes_match_returned_lengths():
    cache = SinkCache(2, 5, rotary=ROTARY)
    start = 0
    for size in [4, 1, 1, 6, 1, 1, 1, 3]:
        kv_length, kv_offset = cache.get_mask_sizes(size, 0)
        keys, _ = feed(cache, start, size)
        assert keys.shape[2] == kv_length
        assert kv_offset + kv_length - size == start  # the new tokens sit at their absolute indices
        start += size


def test_batch_operations_move_every_row_state():
    cache = SinkCache(1, 3, rotary=ROTARY)
    for i in range(6):
        keys = torch.randn(3, 1, 1, 4)
        values = torch.full((3, 1, 1, 4), float(i)) + torch.arange(3.0).view(3, 1, 1, 1) * 100
        cache.begin_forward(3, 1, None, keys.device)
        cache.update(keys, values, 0)
    layer = cache.layers[0]
    before = layer.values.clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.values, before[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert layer.values.shape[0] == layer.real_idx.shape[0] == layer.sink_keys.shape[0] == 2
    cache.batch_repeat_interleave(2)
    assert layer.values.shape[0] == 4


def test_stock_attention_without_rotary_raises_clearly():
    cache = SinkCache(2, 3)  # no config, no rotary
    with pytest.raises(ValueError, match=r"rotary parameters.*from_model\(model\).*sink_sdpa"):
        for i in range(10):
            feed(cache, i, 1)


def test_cannot_be_cropped():
    cache = SinkCache(2, 3, rotary=ROTARY)
    feed(cache, 0, 2)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)


def test_constructors_and_validation():
    assert SinkCache.from_config(SinkConfig(1, 7)).capacity == 8
    assert SinkCache.from_config({"num_sink_tokens": 3, "window_length": 2}).num_sink_tokens == 3
    with pytest.raises(ValueError, match="window_length=0 is invalid"):
        SinkCache(4, 0)
    with pytest.raises(ValueError, match="num_sink_tokens.*-2"):
        SinkCache(-2, 10)
    assert "num_sink_tokens=4" in repr(SinkCache())


def test_reset_forgets_everything():
    cache = SinkCache(2, 3, rotary=ROTARY)
    for i in range(7):
        feed(cache, i, 1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.get_stored_length() == 0
    feed(cache, 0, 2)
    assert cache.get_seq_length() == 2


# ------------------------------------------------------------ rows a stock attention may stream (rows_unpadded)
def stock_feed(cache, keys, values):
    """An update as under a stock attention without hf_sinks.apply: nobody tells the cache the padding."""
    return cache.update(keys, values, 0)


def test_copies_of_one_row_stream_past_capacity_and_keep_the_proof():
    cache = SinkCache(1, 3, rotary=ROTARY)
    keys = torch.randn(1, 2, 5, 4).expand(3, -1, -1, -1)  # one prompt, repeat-interleaved as generate does
    stock_feed(cache, keys, keys + 1)
    assert cache.rows_unpadded
    for _ in range(6):  # beams diverge: every row its own tokens, past capacity
        stock_feed(cache, torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
        cache.reorder_cache(torch.tensor([2, 2, 0]))
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([0, 3, 5]))
    stock_feed(cache, torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    assert cache.rows_unpadded


def test_rows_that_differ_at_the_first_forward_are_refused_past_capacity():
    cache = SinkCache(1, 3, rotary=ROTARY)
    keys = torch.randn(1, 2, 3, 4).expand(2, -1, -1, -1).clone()
    keys[1, 0, 0, 0] += 1e-6  # one bit of difference: the rows may hold different padding
    stock_feed(cache, keys, keys)
    assert not cache.rows_unpadded
    cache.batch_select_indices(torch.tensor([1]))  # one row picked out of such a batch may still be padded
    with pytest.raises(ValueError, match=r"batch of 1 rows.*capacity \(4\).*differed in a multi-token forward"):
        for _ in range(3):
            stock_feed(cache, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    cache.reset()  # a new stream decides again
    stock_feed(cache, torch.randn(1, 2, 3, 4).expand(2, -1, -1, -1), torch.randn(1, 2, 3, 4).expand(2, -1, -1, -1))
    assert cache.rows_unpadded


def test_rows_that_differ_in_a_later_chunk_may_be_padded():
    """A chunked prefill of a padded batch can start with a chunk that is padding in every row: identical rows, then
    different ones. Only one-token forwards (generated tokens) may make the rows differ."""
    cache = SinkCache(1, 3, rotary=ROTARY)
    same = torch.randn(1, 2, 2, 4).expand(3, -1, -1, -1)
    stock_feed(cache, same, same)
    stock_feed(cache, torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))  # a decode step: still copies of one prompt
    assert cache.rows_unpadded
    stock_feed(cache, same, same)  # a later chunk, the same in every row (a new turn of a beam batch)
    assert cache.rows_unpadded
    stock_feed(cache, torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4))
    assert not cache.rows_unpadded


def test_rows_are_judged_at_every_layer():
    """Identical tokens but different masks differ from the second layer on: not copies of one row."""
    cache = SinkCache(1, 3, rotary=ROTARY)
    same = torch.randn(1, 2, 3, 4).expand(2, -1, -1, -1)
    cache.update(same, same, 0)
    cache.update(torch.randn(2, 2, 3, 4), same, 1)
    assert not cache.rows_unpadded


# --------------------------------------------------- the stock route checks the calling model's rotary and windows
def _other(config, **changes):
    other = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(other, name, value)
    return other


def _generate(model, cache, steps=12):
    return greedy(model, random_ids(1, 4), steps, **cache_kwargs(cache))


def test_stock_route_refuses_a_config_with_another_rope_theta():
    model = tiny_model("llama", "sdpa", layers=2)
    theta = model.config.rope_parameters["rope_theta"]
    other = _other(model.config, rope_parameters={**model.config.rope_parameters, "rope_theta": 3 * theta})
    expected = rf"rope_theta={3 * theta}.*model rotates layer 0 with .*rope_theta={theta}.*config=model.config"
    with pytest.raises(ValueError, match=expected):
        _generate(model, SinkCache(2, 5, config=other))
    with pytest.raises(ValueError, match=expected):
        _generate(model, SinkCache(2, 5, rotary=RotaryParams.from_config(other)))


def test_stock_route_refuses_a_config_with_another_sliding_window():
    model = tiny_model("mistral", "sdpa", layers=2)  # no sliding window
    with pytest.raises(ValueError, match=r"layer 0 has sliding_window=4.*MistralAttention.*sliding_window=None"):
        _generate(model, SinkCache(2, 5, config=_other(model.config, sliding_window=4)))


def test_stock_route_accepts_an_equal_config_and_streams_exactly():
    """The check compares values, not objects: a copy of the model's config streams and equals the fp64 spec."""
    sinks, window = 2, 5
    model = tiny_model("llama", "sdpa", layers=2)
    out = _generate(model, SinkCache(sinks, window, config=copy.deepcopy(model.config)))
    spec = reference_logits(model, out.sequences[0, :-1], sinks, window)[3:]
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], spec, atol=1e-4, rtol=0)
