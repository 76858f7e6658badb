"""hf_sinks.attention.use_attention / routed_through_interface: switch for a block, restore afterwards."""

import pytest
from helpers import tiny_model

from hf_sinks.attention import routed_through_interface, use_attention


def test_use_attention_switches_and_restores():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with use_attention(model, "eager"):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError), use_attention(model, "eager", route=True):
        raise RuntimeError("restored even on errors")
    assert model.config._attn_implementation == before


def test_route_patches_falcon_only_for_the_block():
    """Patched for the block where Falcon bypasses the interface; never where it calls it (5.25+)."""
    import hf_sinks.patches.falcon as falcon
    from hf_sinks.models import get_spec

    model = tiny_model("falcon", attn_implementation="sdpa")  # not patched: stock Falcon
    patch_route = get_spec(model.config).route == "patch"
    assert falcon.route() == get_spec(model.config).route
    assert not falcon.is_patched(model)
    with use_attention(model, "sink_sdpa", route=True):
        assert falcon.is_patched(model) is patch_route and model.config._attn_implementation == "sink_sdpa"
    assert not falcon.is_patched(model)
    with routed_through_interface(tiny_model("llama")):  # routed through the interface already: nothing to do
        pass
