"""The shared attention preamble (hf_sinks.attention.preamble): stock without the cache, specific refusals with it."""

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_sinks import DuoCache, H2OCache, HeadPattern
from hf_sinks.attention.preamble import default_scaling, refuse_dropout, refuse_padding, to_model_layout
from hf_sinks.duo.attention import duo_sdpa_attention_forward
from hf_sinks.h2o.attention import h2o_sdpa_attention_forward

MODULE = types.SimpleNamespace(is_causal=True, training=False, num_key_value_groups=2)


def _qkv(q_len=3):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 4, q_len, 8, generator=gen),
        torch.randn(1, 2, q_len, 8, generator=gen),
        torch.randn(1, 2, q_len, 8, generator=gen),
    )


def _padded_mask(q_len=3):
    """A dense bool mask whose first token is padding (it does not even see itself)."""
    mask = torch.ones(1, 1, q_len, q_len, dtype=torch.bool).tril()
    mask[..., 0] = False
    return mask


def test_helpers():
    q = torch.zeros(1, 2, 3, 16)
    assert default_scaling(q, None) == 16**-0.5 and default_scaling(q, 0.3) == 0.3
    assert to_model_layout(q).shape == (1, 3, 2, 16) and to_model_layout(q).is_contiguous()
    refuse_dropout(0.0, "X")
    refuse_padding(None, q, "X")
    with pytest.raises(ValueError, match=r"^X does not support attention dropout \(dropout=0.5\); do Y\.$"):
        refuse_dropout(0.5, "X", "do Y")
    with pytest.raises(ValueError, match=r"^X does not support padded batches"):
        refuse_padding(_padded_mask(), q, "X")


@pytest.mark.parametrize("attention", [h2o_sdpa_attention_forward, duo_sdpa_attention_forward])
def test_without_its_cache_it_is_stock_sdpa(attention):
    q, k, v = _qkv()
    expected, _ = sdpa_attention_forward(MODULE, q, k, v, None)
    out, weights = attention(MODULE, q, k, v, None)
    assert weights is None and torch.equal(out, expected)


def _h2o_keys():
    q, k, v = _qkv()
    keys, values = H2OCache(1, 2, 1).update(k, v, 0)
    return q, keys, values


def _duo_keys():
    q, k, v = _qkv()
    cache = DuoCache(HeadPattern(torch.tensor([[True, False]])), 1, 2)
    keys, values = cache.update(k, v, 0)
    return q, keys, values, cache.layers[0]


def test_h2o_refusals_name_the_cache_and_the_value():
    q, keys, values = _h2o_keys()
    with pytest.raises(ValueError, match=r"H2OCache does not support attention dropout \(dropout=0.1\)"):
        h2o_sdpa_attention_forward(MODULE, q, keys, values, None, dropout=0.1)
    q, keys, values = _h2o_keys()
    with pytest.raises(ValueError, match="H2OCache does not support padded batches"):
        h2o_sdpa_attention_forward(MODULE, q, keys, values, _padded_mask())


def test_duo_refusals_name_the_cache_and_forget_the_pending_chunk_on_padding():
    q, keys, values, layer = _duo_keys()
    with pytest.raises(ValueError, match=r"DuoCache does not support attention dropout \(dropout=0.2\)"):
        duo_sdpa_attention_forward(MODULE, q, keys, values, None, dropout=0.2)
    q, keys, values, layer = _duo_keys()
    with pytest.raises(ValueError, match="DuoCache does not support padded batches"):
        duo_sdpa_attention_forward(MODULE, q, keys, values, _padded_mask())
    assert layer.pending is None
