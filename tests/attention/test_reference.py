"""Tier 0: the spec itself, in fp64, against plain causal attention (transformers' own eager math)."""

import types

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from hf_sinks.attention.reference import reference_sink_attention, visible_indices
from hf_sinks.rope import RotaryParams, apply_rotary

ROTARY = RotaryParams(1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)), rotary_dim=16)


def test_visibility_rule():
    for i in range(12):
        for s, w in [(0, 1), (2, 3), (4, 5), (3, 20)]:
            expected = [j for j in range(i + 1) if j < s or i - j < w]
            assert visible_indices(i, s, w) == expected
    assert visible_indices(10, 2, 3) == [0, 1, 8, 9, 10]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_equals_causal_attention_when_nothing_is_evicted(heads, kv_heads):
    length = 13
    q = torch.randn(2, heads, length, 16, dtype=torch.float64)
    k = torch.randn(2, kv_heads, length, 16, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, 16, dtype=torch.float64)
    positions = torch.arange(length)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    causal = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    expected, _ = eager_attention_forward(
        module, apply_rotary(q, positions, ROTARY), apply_rotary(k, positions, ROTARY), v, causal, scaling=0.25
    )
    for sinks, window in [(0, length), (4, length - 4), (2, 40)]:
        out = reference_sink_attention(q, k, v, sinks, window, ROTARY, scaling=0.25)
        # transformers' eager softmax runs in fp32, hence 1e-6
        torch.testing.assert_close(out.transpose(1, 2), expected, atol=1e-6, rtol=0)


def test_evicted_query_sees_sinks_then_window_at_positions_from_zero():
    """Query 9 with S=2, W=3 attends to tokens [0, 1, 7, 8, 9] placed at positions 0..4."""
    q = torch.randn(1, 1, 10, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 10, 16, dtype=torch.float64)
    v = torch.randn(1, 1, 10, 16, dtype=torch.float64)
    out = reference_sink_attention(q, k, v, 2, 3, ROTARY)[0, 0, 9]
    idx = torch.tensor([0, 1, 7, 8, 9])
    pos = torch.arange(5)
    scores = apply_rotary(q[0, 0, 9:10], pos[-1:], ROTARY) @ apply_rotary(k[0, 0, idx], pos, ROTARY).T / 4
    torch.testing.assert_close(out, (torch.softmax(scores, -1) @ v[0, 0, idx])[0], atol=1e-12, rtol=0)


def test_sink_logits_equal_gpt_oss_eager_attention():
    """Learned sink logits (gpt-oss): the spec's extra softmax column == transformers' GptOss eager attention, output
    and gradients, in fp64, where the spec is plain causal attention (no eviction)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    heads, kv_heads, length = 4, 2, 11
    q = torch.randn(2, heads, length, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, length, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, length, 16, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(heads, dtype=torch.float64, requires_grad=True)
    do = torch.randn(2, heads, length, 16, dtype=torch.float64)
    positions = torch.arange(length)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, sinks=sinks)
    causal = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    expected, _ = gpt_oss_eager(
        module, apply_rotary(q, positions, ROTARY), apply_rotary(k, positions, ROTARY), v, causal, scaling=0.25
    )
    expected = expected.transpose(1, 2)
    out = reference_sink_attention(q, k, v, 2, length, ROTARY, scaling=0.25, sink_logits=sinks)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    grads = torch.autograd.grad((out * do).sum(), (q, k, v, sinks))
    expected_grads = torch.autograd.grad((expected * do).sum(), (q, k, v, sinks))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
