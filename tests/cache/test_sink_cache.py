"""Tier 2: SinkCache bookkeeping against a plain list model of which tokens survive."""

import pytest
import torch

from hf_sinks import RotaryParams, SinkCache, SinkConfig
from hf_sinks.attention.reference import visible_indices

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
