"""Tier 1: each registered sink attention + SinkCache, called exactly as a model calls them, vs the fp64 spec.

A stream of raw q/k/v is fed in chunks; like a model, the "layer" rotates q/k at absolute positions, updates the
cache, then calls the attention function. The outputs of all chunks must equal ``reference_sink_attention``.
"""

import types

import pytest
import torch
from helpers import sink_mask

from hf_sinks import SinkCache
from hf_sinks.attention import functions
from hf_sinks.attention.reference import reference_sink_attention
from hf_sinks.rope import RotaryParams, apply_rotary

MODULE = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
KERNELS = {
    "sink_sdpa": functions.sink_sdpa_attention_forward,
    "sink_eager": functions.sink_eager_attention_forward,
}


def rotary_for(head_dim, rotary_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    return RotaryParams(inv_freq.float(), rotary_dim)


def run_stream(attention, q, k, v, sinks, window, chunks, rotary, pads=None, block=None):
    """Feed [B, H, T, D] raw q/k/v through SinkCache + attention in the given chunk sizes; return [B, H, T, D]."""
    batch, _, length, _ = q.shape
    pads = pads or [0] * batch
    cache = SinkCache(sinks, window, rotary=rotary)
    # positions as generate makes them: the row's real-token index (padding gets 0)
    real = torch.arange(length)[None] - torch.tensor(pads)[:, None]
    valid = real >= 0
    positions = real.clamp(min=0)
    outs, start = [], 0
    for size in chunks:
        sl = slice(start, start + size)
        pos = positions[:, sl]
        qr = apply_rotary(q[:, :, sl], pos[:, None], rotary)
        kr = apply_rotary(k[:, :, sl], pos[:, None], rotary)
        keys, values = cache.update(kr, v[:, :, sl], 0)
        mask = sink_mask(valid[:, : start + size], size)
        out, _ = attention(MODULE, qr, keys, values, mask, scaling=0.3, position_ids=pos)
        outs.append(out.transpose(1, 2))
        start += size
    assert cache.get_stored_length() <= sinks + window
    return torch.cat(outs, dim=2)


CASES = [
    pytest.param(4, 6, [1] * 20, id="decode"),
    pytest.param(4, 6, [20], id="one-long-prompt"),
    pytest.param(4, 6, [3, 1, 7, 1, 1, 5, 2], id="mixed-chunks"),
    pytest.param(2, 5, [7, 13], id="prompt-then-chunk-past-capacity"),
    pytest.param(0, 4, [6, 1, 1, 9], id="window-only"),
    pytest.param(3, 1, [5, 1, 1, 4], id="window-of-one"),
    pytest.param(6, 20, [1, 2], id="T-smaller-than-S"),
    pytest.param(4, 8, [12, 1, 1], id="T-equals-capacity-then-more"),
]


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("sinks,window,chunks", CASES)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rotary_dim",
    [
        pytest.param(4, 2, 16, 16, id="gqa2"),
        pytest.param(4, 1, 12, 12, id="mqa-d12"),
        pytest.param(2, 2, 20, 8, id="partial-rotary"),
    ],
)
def test_matches_spec(name, sinks, window, chunks, heads, kv_heads, head_dim, rotary_dim):
    torch.manual_seed(0)
    length = sum(chunks)
    q = torch.randn(2, heads, length, head_dim, dtype=torch.float64)
    k = torch.randn(2, kv_heads, length, head_dim, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, head_dim, dtype=torch.float64)
    rotary = rotary_for(head_dim, rotary_dim)
    out = run_stream(KERNELS[name], q, k, v, sinks, window, chunks, rotary)
    expected = reference_sink_attention(q, k, v, sinks, window, rotary, scaling=0.3)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize(
    "chunks", [pytest.param([14, 1, 1, 1, 6], id="padded-prompt"), pytest.param([5, 9, 1, 1], id="padded-split")]
)
def test_left_padding_rows_match_their_own_stream(name, chunks):
    torch.manual_seed(1)
    sinks, window, length, pads = 3, 5, sum(chunks), [0, 4, 9]
    q = torch.randn(3, 2, length, 16, dtype=torch.float64)
    k = torch.randn(3, 2, length, 16, dtype=torch.float64)
    v = torch.randn(3, 2, length, 16, dtype=torch.float64)
    rotary = rotary_for(16, 16)
    out = run_stream(KERNELS[name], q, k, v, sinks, window, chunks, rotary, pads=pads)
    for row, pad in enumerate(pads):
        expected = reference_sink_attention(
            q[row : row + 1, :, pad:],
            k[row : row + 1, :, pad:],
            v[row : row + 1, :, pad:],
            sinks,
            window,
            rotary,
            scaling=0.3,
        )
        torch.testing.assert_close(out[row : row + 1, :, pad:], expected, atol=1e-10, rtol=0)


def test_blocks_of_a_long_chunk(monkeypatch):
    monkeypatch.setattr(functions, "QUERY_BLOCK", 4)
    torch.manual_seed(2)
    q = torch.randn(1, 2, 41, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 41, 16, dtype=torch.float64)
    v = torch.randn(1, 2, 41, 16, dtype=torch.float64)
    rotary = rotary_for(16, 16)
    out = run_stream(functions.sink_eager_attention_forward, q, k, v, 2, 5, [3, 38], rotary)
    torch.testing.assert_close(out, reference_sink_attention(q, k, v, 2, 5, rotary, scaling=0.3), atol=1e-10, rtol=0)


def test_flex_matches_spec():
    torch.manual_seed(3)
    q = torch.randn(1, 4, 19, 32)
    k = torch.randn(1, 2, 19, 32)
    v = torch.randn(1, 2, 19, 32)
    rotary = rotary_for(32, 32)
    out = run_stream(functions.sink_flex_attention_forward, q, k, v, 2, 6, [9, 1, 1, 8], rotary)
    expected = reference_sink_attention(q.double(), k.double(), v.double(), 2, 6, rotary, scaling=0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_eager_returns_attention_weights_on_request():
    torch.manual_seed(4)
    rotary = rotary_for(16, 16)
    cache = SinkCache(2, 4, rotary=rotary)
    k = torch.randn(1, 1, 9, 16)
    keys, values = cache.update(k, k.clone(), 0)
    out, weights = functions.sink_eager_attention_forward(
        MODULE, torch.randn(1, 2, 9, 16), keys, values, None, position_ids=torch.arange(9)[None], output_attentions=True
    )
    assert weights.shape == (1, 2, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 9))
    assert (weights[0, :, 8, 2:5] == 0).all()  # tokens 2..4 are out of query 8's window and are not sinks


# ----------------------------------------------------------------- learned per-head sink logits (gpt-oss style)
def _module_with_sink_logits(heads, seed=7):
    logits = torch.linspace(-1.5, 1.0, heads, dtype=torch.float64).requires_grad_(True)
    return types.SimpleNamespace(config=MODULE.config, sink_logits=logits), logits


@pytest.mark.parametrize("name", sorted(KERNELS) + ["sink_triton"])
@pytest.mark.parametrize("sinks,window,chunks", [CASES[0], CASES[2], CASES[3], CASES[6]])
def test_learned_sink_logits_stream_like_the_spec(name, sinks, window, chunks):
    """``module.sink_logits`` joins every softmax, decode and chunks, forward and gradients (q, k, v, logits)."""
    from hf_sinks.attention.triton import sink_triton_attention_forward

    attention = {**KERNELS, "sink_triton": sink_triton_attention_forward}[name]
    torch.manual_seed(5)
    length = sum(chunks)
    q, k, v = (torch.randn(2, h, length, 16, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    module, logits = _module_with_sink_logits(4)
    rotary = rotary_for(16, 16)
    grad_out = torch.randn(2, 4, length, 16, dtype=torch.float64)

    def stream(q, k, v):
        cache = SinkCache(sinks, window, rotary=rotary)
        outs, start = [], 0
        for size in chunks:
            sl = slice(start, start + size)
            pos = torch.arange(start, start + size)[None].expand(2, -1)
            keys, values = cache.update(apply_rotary(k[:, :, sl], pos[:, None], rotary), v[:, :, sl], 0)
            mask = sink_mask(torch.ones(2, start + size, dtype=torch.bool), size)
            out, _ = attention(
                module,
                apply_rotary(q[:, :, sl], pos[:, None], rotary),
                keys,
                values,
                mask,
                scaling=0.3,
                position_ids=pos,
            )
            outs.append(out.transpose(1, 2))
            start += size
        return torch.cat(outs, dim=2)

    out = stream(q, k, v)
    expected = reference_sink_attention(q, k, v, sinks, window, rotary, scaling=0.3, sink_logits=logits)
    without = reference_sink_attention(q, k, v, sinks, window, rotary, scaling=0.3)
    assert not torch.allclose(expected, without, atol=1e-3)  # the logits matter in this case
    tol = dict(atol=1e-10, rtol=0) if name != "sink_triton" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    if name == "sink_triton":
        return  # its saved cache views change under later steps; kernel gradients: tests/kernels
    got = torch.autograd.grad((out * grad_out).sum(), [q, k, v, logits])
    want = torch.autograd.grad((expected * grad_out).sum(), [q, k, v, logits])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_learned_sink_logits_without_a_cache(name):
    """No SinkCache: causal attention over everything plus the sink-logit term (the spec with a window >= T)."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, h, 9, 8, dtype=torch.float64) for h in (4, 2, 2))
    module, logits = _module_with_sink_logits(4)
    out, _ = KERNELS[name](module, q, k, v, None, scaling=0.3)  # None: causal, as transformers passes it
    expected = reference_sink_attention(q, k, v, 0, 9, None, scaling=0.3, sink_logits=logits.detach())
    torch.testing.assert_close(out.transpose(1, 2), expected, atol=1e-10, rtol=0)


def test_sink_flex_refuses_learned_sink_logits():
    module, _ = _module_with_sink_logits(2)
    q = k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="sink_flex does not support"):
        functions.sink_flex_attention_forward(module, q, k, v, None)
