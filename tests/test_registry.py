"""Registration, the stock fallback, supported model types, and apply()/remove()."""

import pytest
import torch
from helpers import random_ids, tiny_config, tiny_model
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, DynamicCache

import hf_sinks
from hf_sinks.attention import ATTENTION_IMPLEMENTATIONS
from hf_sinks.compat import cache_kwargs

NAMES = sorted(ATTENTION_IMPLEMENTATIONS)


def test_every_name_is_in_both_registries_and_register_is_idempotent():
    hf_sinks.register()
    hf_sinks.register()
    for name in NAMES:
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("name", NAMES)
def test_from_pretrained_accepts_the_names(tmp_path, name):
    tiny_model("llama", "sdpa").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name)
    assert model.config._attn_implementation == name


@pytest.mark.parametrize("name,stock", [("sink_sdpa", "sdpa"), ("sink_eager", "eager")])
@pytest.mark.parametrize("arch,extra", [("llama", {}), ("mistral", {"sliding_window": 5})])
def test_without_sink_cache_they_are_exactly_the_stock_attention(name, stock, arch, extra):
    prompt = random_ids(2, 9)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    outs = []
    for impl in (name, stock):
        model = tiny_model(arch, impl, **extra)
        out = model.generate(
            prompt,
            attention_mask=mask,
            **cache_kwargs(DynamicCache(config=model.config)),
            max_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        outs.append(torch.stack(out.logits))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_unsupported_model_is_refused_with_its_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sink_sdpa")
    with pytest.raises(ValueError, match=r"model_type='gpt2': no RoPE"):
        model(random_ids(1, 4) % 64)
    with pytest.raises(ValueError, match=r"model_type='gpt2': no RoPE"):
        hf_sinks.apply(model)


def test_every_registry_exception_is_tested_and_documented():
    """MODEL_SPECS holds only exceptions to the generic route: each is in the coverage test and in the docs table;
    the README names the count of architectures that stream."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    coverage = (root / "tests" / "test_model_coverage.py").read_text()
    readme = (root / "README.md").read_text()
    models_page = (root / "docs" / "models.md").read_text()
    for model_type, spec in hf_sinks.MODEL_SPECS.items():
        assert spec.route in ("interface", "patch", "refused")
        assert f'"{model_type}"' in coverage or model_type == "cohere2_moe", f"{model_type} not in the coverage test"
        assert f"`{model_type}`" in models_page, f"no docs/models.md row for {model_type}"
    import re

    import transformers
    from test_model_coverage import ALIASES, STREAMING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    proven = {model_type for model_type in STREAMING if model_type not in ALIASES}
    for model_type in proven:
        assert f"`{model_type}`" in models_page, f"no docs/models.md entry for proven {model_type}"
    found = re.search(r"\*\*(\d+) of (\d+) causal-LM architectures stream exactly\*\* \(transformers ([\d.]+)", readme)
    assert found, "README's Supported models sentence is missing"
    assert int(found[1]) == len(proven), f"README says {found[1]} proven, the coverage test proves {len(proven)}"
    assert f"**{len(proven)} of {found[2]}" in models_page
    if transformers.__version__ == found[3]:  # the totals are those of the documented transformers
        assert int(found[2]) == len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_apply_and_remove_restore_the_model_exactly():
    model = tiny_model("llama", "sdpa")
    prompt = random_ids(1, 12)
    with torch.no_grad():
        before = model(prompt).logits
    handle = hf_sinks.apply(model, num_sink_tokens=2, window_length=6)
    assert model.config._attn_implementation == "sink_sdpa"
    assert model.config.attention_sinks == {"num_sink_tokens": 2, "window_length": 6, "position_mode": "cache"}
    hf_sinks.apply(model, window_length=8)  # idempotent: replaces, never stacks hooks
    assert len(model.model._forward_pre_hooks) == 1
    model.generate(prompt, **cache_kwargs(hf_sinks.SinkCache.from_model(model)), max_new_tokens=12)
    model._hf_sinks_handle.remove()
    handle.remove()
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "attention_sinks")
    assert len(model.model._forward_pre_hooks) == 0
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, before)


def test_apply_refuses_a_non_sink_attention():
    with pytest.raises(ValueError, match="'sdpa' is not a sink attention.*sink_eager"):
        hf_sinks.apply(tiny_model("llama", "sdpa"), attn_implementation="sdpa")


def test_sink_cache_from_model_reads_the_config_flag():
    config = tiny_config("llama")
    config.attention_sinks = {"num_sink_tokens": 1, "window_length": 5}
    model = AutoModelForCausalLM.from_config(config)
    cache = hf_sinks.SinkCache.from_model(model)
    assert (cache.num_sink_tokens, cache.window_length) == (1, 5)


def test_falcon_alibi_is_refused_clearly():
    config = tiny_config("falcon_mha", alibi=True)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="alibi=True is not supported.*Rotary Falcons"):
        hf_sinks.apply(model)


def _falcon_calls_the_interface() -> bool:
    """Whether *stock* Falcon calls ``AttentionInterface``, observed from outside: a spy registered under a fresh name
    runs only if the unpatched ``FalconAttention.forward`` looks its attention up there."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import eager_mask

    from hf_sinks.attention import use_attention

    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hf_sinks_falcon_spy", spy)
    AttentionMaskInterface.register("hf_sinks_falcon_spy", eager_mask)  # additive: 5.23's eager core adds it
    model = tiny_model("falcon", "sdpa")
    with torch.no_grad(), use_attention(model, "hf_sinks_falcon_spy"):
        model(random_ids(1, 6))
    return bool(calls)


def test_falcon_route_follows_what_its_attention_calls():
    """The route is the right one for this release: the interface where stock Falcon calls it (no patch at all), the
    per-instance patch where it does not; and the release's own signs agree (5.23: ``alibi`` argument and
    ``FALCON_ATTENTION_CLASSES``; 5.25: neither)."""
    import inspect

    from transformers.models.falcon import modeling_falcon
    from transformers.models.falcon.modeling_falcon import FalconAttention

    calls = _falcon_calls_the_interface()
    spec = hf_sinks.MODEL_SPECS["falcon"]
    assert spec.route == ("interface" if calls else "patch"), spec
    assert calls == ("alibi" not in inspect.signature(FalconAttention.forward).parameters)
    assert calls == (not hasattr(modeling_falcon, "FALCON_ATTENTION_CLASSES"))
    model = tiny_model("falcon", "sdpa")
    handle = hf_sinks.apply(model, num_sink_tokens=2, window_length=5)
    attentions = [m for m in model.modules() if isinstance(m, FalconAttention)]
    assert handle.num_attention_modules == len(attentions) == model.config.num_hidden_layers
    assert all(("forward" in vars(m)) is not calls for m in attentions), "an instance forward on the wrong route"
    assert model.config._attn_implementation == "sink_sdpa"
    handle.remove()


def test_falcon_apply_is_per_instance_and_removable():
    from transformers.models.falcon.modeling_falcon import FalconAttention

    model, other = tiny_model("falcon", "sdpa"), tiny_model("falcon", "sdpa", seed=1)
    prompt = random_ids(1, 10)
    with torch.no_grad():
        before = model(prompt).logits
    handle = hf_sinks.apply(model, num_sink_tokens=2, window_length=5)
    attentions = [m for m in model.modules() if isinstance(m, FalconAttention)]
    patched = hf_sinks.MODEL_SPECS["falcon"].route == "patch"
    assert all(("forward" in vars(m)) is patched for m in attentions)
    assert other.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) for m in other.modules() if isinstance(m, FalconAttention))
    handle.remove()
    assert not any("forward" in vars(m) for m in attentions)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, before)
