import pytest
import torch
from helpers import tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_sinks.rope import RotaryParams, apply_rotary, shift_rotary


def test_matches_transformers_rotation():
    model = tiny_model("llama", "sdpa")
    rotary = RotaryParams.from_model(model)
    x = torch.randn(2, 4, 7, 16)
    positions = torch.tensor([[0, 1, 5, 9, 30, 31, 200]] * 2)
    cos, sin = model.model.rotary_emb(x, positions)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(apply_rotary(x, positions[:, None, :], rotary), expected, atol=1e-5, rtol=0)


def test_from_config_equals_model_buffer():
    for kwargs in ({}, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}):
        model = tiny_model("llama", "sdpa", **kwargs)
        torch.testing.assert_close(
            RotaryParams.from_config(model.config).inv_freq, RotaryParams.from_model(model).inv_freq
        )


def test_partial_rotary_leaves_the_rest_untouched():
    rotary = RotaryParams(torch.tensor([1.0, 0.1]), rotary_dim=4)
    x = torch.randn(1, 1, 3, 10, dtype=torch.float64)
    y = shift_rotary(x, torch.tensor([3, -2, 7]), rotary)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])


def test_shifts_compose_exactly_even_at_huge_positions():
    """Angles are formed in fp64, so moving a key by 10**6 and back returns it (fp32 angles would be ~0.03 rad off)."""
    rotary = RotaryParams.from_config(tiny_model("llama", "sdpa").config)
    x = torch.randn(1, 2, 5, 16)
    far = shift_rotary(x, torch.tensor(10**6 + 3), rotary)
    back = shift_rotary(far, torch.tensor(-(10**6)), rotary)
    torch.testing.assert_close(back, shift_rotary(x, torch.tensor(3), rotary), atol=2e-6, rtol=0)
    fp32_angle = (torch.tensor(10**6 + 3, dtype=torch.float32) * rotary.inv_freq[1]).double()
    assert abs(fp32_angle.item() - (10**6 + 3) * rotary.inv_freq[1].double().item()) > 1e-3  # what we avoid


def test_dynamic_rope_is_refused():
    model = tiny_model("llama", "sdpa", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        RotaryParams.from_model(model)


def test_rotate_half_convention_reads_pairing_and_direction():
    """Halves or neighbouring pairs, turning by +angle (transformers) or -angle (NanoChat's ``cat((x2, -x1))``)."""
    from hf_sinks.rope import rotate_half, rotate_half_convention, rotate_pairs

    assert rotate_half_convention(rotate_half) == (False, 1)
    assert rotate_half_convention(rotate_pairs) == (True, 1)
    assert rotate_half_convention(lambda x: -rotate_half(x)) == (False, -1)
    assert rotate_half_convention(lambda x: -rotate_pairs(x)) == (True, -1)
    with pytest.raises(ValueError, match=r"unknown rotate_half convention"):
        rotate_half_convention(lambda x: x)


def test_a_model_turning_backwards_gets_negated_frequencies():
    """A rotation by -angle is the standard rotation with negated frequencies: shifting a key rotated at position p
    by d with those frequencies gives the key the reversed convention rotates at p + d."""
    from hf_sinks.rope import RotaryParams, rotate_half, shift_rotary

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).double() / 8))
    x = torch.randn(3, 8, dtype=torch.float64)

    def backwards(v, p):  # cat((x2, -x1)) * sin: NanoChat's apply_rotary_pos_emb
        angles = torch.cat([p * inv_freq, p * inv_freq])
        return v * angles.cos() + (-rotate_half(v)) * angles.sin()

    rotary = RotaryParams(-inv_freq.float(), 8)
    moved = shift_rotary(backwards(x, 5.0), torch.full((3,), 7), rotary)
    torch.testing.assert_close(moved, backwards(x, 12.0), atol=1e-6, rtol=0)
    wrong = shift_rotary(backwards(x, 5.0), torch.full((3,), 7), RotaryParams(inv_freq.float(), 8))
    assert not torch.allclose(wrong, backwards(x, 12.0), atol=1e-3)
