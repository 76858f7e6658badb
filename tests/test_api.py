"""hf_sinks.apply / AutoModelForCausalLM: config flags, save/load, removal, PEFT, generate creating its own cache."""

import pytest
import torch
from helpers import assert_rows_match_spec, padded_batch, random_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import hf_sinks
from hf_sinks.compat import output_cache

ARCHS = ["llama", "mistral", "gpt_neox", "falcon", "falcon_new"]
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "falcon_new": ["query_key_value"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_config_flag_switches_streaming_on_and_generate_brings_its_cache(arch, tmp_path):
    config = tiny_config(arch)
    config.attention_sinks = hf_sinks.SinkConfig(num_sink_tokens=2, window_length=7).to_dict()
    tiny_model(arch, "sdpa").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, config=config)
    handle = hf_sinks.apply(model)
    assert handle.num_attention_modules == config.num_hidden_layers
    rows, ids, mask = padded_batch([12, 5])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=15,
        min_new_tokens=15,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert isinstance(output_cache(out), hf_sinks.SinkCache)
    assert output_cache(out).get_stored_length() == 9
    assert_rows_match_spec(model, rows, out, ids.shape[1], 2, 7)


def test_flag_round_trips_through_save_pretrained(tmp_path):
    model = tiny_model("llama", "sdpa")
    hf_sinks.apply(model, num_sink_tokens=3, window_length=11)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.attention_sinks == {"num_sink_tokens": 3, "window_length": 11, "position_mode": "cache"}
    assert reloaded.config._attn_implementation != "sink_sdpa"  # from_pretrained alone changes nothing
    streaming = hf_sinks.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert streaming._hf_sinks_handle.sink_config == hf_sinks.SinkConfig(3, 11)
    assert streaming.config._attn_implementation == "sink_sdpa"
    override = hf_sinks.AutoModelForCausalLM.from_pretrained(
        tmp_path, attention_sink_size=1, attention_sink_window_size=5
    )
    assert override._hf_sinks_handle.sink_config == hf_sinks.SinkConfig(1, 5)


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_context_manager_restores_and_models_stay_independent(arch):
    model, other = tiny_model(arch, "sdpa"), tiny_model(arch, "sdpa", seed=1)
    prompt = random_ids(1, 30)
    with torch.no_grad():
        before, other_before = model(prompt).logits, other(prompt).logits
    with hf_sinks.apply(model, num_sink_tokens=2, window_length=6):
        streamed = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        assert isinstance(output_cache(streamed), hf_sinks.SinkCache)
        with torch.no_grad():
            assert torch.equal(other(prompt).logits, other_before)
    assert "generate" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, before)


def test_generate_keeps_a_user_cache_choice():
    model = tiny_model("llama", "sdpa")
    hf_sinks.apply(model, num_sink_tokens=2, window_length=6)
    out = model.generate(
        random_ids(1, 4), max_new_tokens=3, use_cache=True, cache_implementation="static", return_dict_in_generate=True
    )
    assert not isinstance(output_cache(out), hf_sinks.SinkCache)


@pytest.mark.parametrize("arch", ARCHS)
def test_streams_after_get_peft_model_with_lora(arch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch, "sdpa")
    hf_sinks.apply(model, num_sink_tokens=2, window_length=7)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS[arch], init_lora_weights=False))
    peft_model.eval()
    rows, ids, mask = padded_batch([14, 6], seed=40)
    out = peft_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert isinstance(output_cache(out), hf_sinks.SinkCache)
    assert_rows_match_spec(peft_model.base_model.model, rows, out, ids.shape[1], 2, 7)


# ------------------------------------------------------------------- a deprecated cache keyword blames the caller
def _deprecations_blamed_on(records, path):
    return [r for r in records if issubclass(r.category, (FutureWarning, DeprecationWarning)) and r.filename == path]


def test_a_deprecated_cache_keyword_is_blamed_on_the_callers_line():
    """``past_key_values=`` after apply: any deprecation points at the user's call, never inside hf_sinks.

    Where ``cache`` is the keyword (5.24+), transformers' own ``FutureWarning`` blames the frame that called
    ``generate``: that was hf_sinks' wrapper (hf_sinks/api.py) until the wrapper renamed the keyword itself and warned
    at the caller's line. The forward's warning stays transformers' own (raised where it is without hf_sinks).
    """
    import os
    import warnings

    from hf_sinks.compat import DEPRECATED_CACHE_KWARGS

    package = os.path.dirname(hf_sinks.__file__) + os.sep
    model = tiny_model("llama", "sdpa")
    handle = hf_sinks.apply(model, num_sink_tokens=2, window_length=6)
    ids = random_ids(1, 5)
    cache, other = handle.new_cache(), handle.new_cache()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(ids, past_key_values=handle.new_cache(), use_cache=True)
        out = model.generate(
            ids, past_key_values=cache, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
        if DEPRECATED_CACHE_KWARGS:  # both keywords: the current one wins, as in transformers
            both = model.generate(
                ids, past_key_values=None, cache=other, max_new_tokens=2, do_sample=False, return_dict_in_generate=True
            )
            assert output_cache(both) is other
    assert output_cache(out) is cache and cache.get_seq_length() > 5
    deprecations = [r for r in records if issubclass(r.category, (FutureWarning, DeprecationWarning))]
    assert [f"{r.filename}:{r.lineno}" for r in deprecations if r.filename.startswith(package)] == []
    mine = _deprecations_blamed_on(records, __file__)
    assert len(mine) == (2 if DEPRECATED_CACHE_KWARGS else 0), [str(r.message) for r in deprecations]
    assert all("past_key_values" in str(r.message) for r in mine)
