"""What the H2O and Duo cache layers share through hf_sinks.cache_layers.RowStateLayer: reset, crop, pending."""

import pytest
import torch

from hf_sinks import DuoCache, H2OCache, HeadPattern


def _h2o():
    return H2OCache(1, 2, 1)


def _duo():
    return DuoCache(HeadPattern(torch.tensor([[True, False]])), 1, 2)


def _kv(q_len=3, batch=1):
    return torch.randn(batch, 2, q_len, 8), torch.randn(batch, 2, q_len, 8)


@pytest.mark.parametrize("make", [_h2o, _duo], ids=["h2o", "duo"])
def test_reset_forgets_every_token_and_the_cache_is_reusable(make):
    cache = make()
    cache.update(*_kv(), 0)
    layer = cache.layers[0]
    assert layer.is_initialized and layer.get_seq_length() == 3 and layer.pending is not None
    cache.reset()
    assert not layer.is_initialized and layer.get_seq_length() == 0 and layer.pending is None
    assert all(getattr(layer, name) is None for name in layer._ROW_STATE)
    keys, _ = cache.update(*_kv(2, batch=2), 0)  # a new batch size after the reset
    assert layer.is_initialized and layer.get_seq_length() == 2 and keys.shape[0] == 2


@pytest.mark.parametrize(
    "make,text",
    [
        (_h2o, "H2OCache evicts tokens; it cannot be cropped (assisted decoding is unsupported)."),
        (_duo, "DuoCache evicts streaming-head tokens; it cannot be cropped (assisted decoding is unsupported)."),
    ],
    ids=["h2o", "duo"],
)
def test_crop_is_refused_by_cache_and_layer(make, text):
    cache = make()
    with pytest.raises(NotImplementedError) as error:
        cache.crop(1)
    assert str(error.value) == text
    cache.update(*_kv(), 0)
    with pytest.raises(NotImplementedError) as error:
        cache.layers[0].crop(1)
    assert str(error.value) == text


@pytest.mark.parametrize(
    "make,text",
    [
        (
            _h2o,
            "H2OCache needs attn_implementation='h2o_sdpa': the previous forward's attention did not accumulate "
            "scores (a stock attention cannot). Call hf_sinks.h2o.register() and load the model with "
            "attn_implementation='h2o_sdpa' (or model.set_attn_implementation('h2o_sdpa')). If the previous forward "
            "failed instead, call cache.reset().",
        ),
        (
            _duo,
            "DuoCache needs attn_implementation='duo_sdpa': the previous forward's attention did not consume the "
            "cache (a stock attention cannot attend heads over keys of different lengths). Call "
            "hf_sinks.duo.register() and load the model with attn_implementation='duo_sdpa' "
            "(or model.set_attn_implementation('duo_sdpa')). If the previous forward failed instead, call "
            "cache.reset().",
        ),
    ],
    ids=["h2o", "duo"],
)
def test_an_update_left_pending_by_a_stock_attention_is_refused(make, text):
    cache = make()
    cache.update(*_kv(), 0)  # no attention consumed it
    with pytest.raises(ValueError) as error:
        cache.update(*_kv(1), 0)
    assert str(error.value) == text
