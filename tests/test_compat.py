"""Whatever transformers release is installed (CI runs the floor and the newest): the cache keyword, the mask objects,
no deprecation from hf_sinks, and the defects that used to pass silently (each test failed before its fix)."""

import logging
import warnings

import pytest
import torch
from helpers import assert_rows_match_spec, greedy, padded_batch, random_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import hf_sinks
from hf_sinks.attention import masks
from hf_sinks.compat import CACHE_KWARG, cache_kwargs, output_cache
from hf_sinks.eval.memory import cache_bytes
from hf_sinks.oracle import reference_logits

TOL = 1e-4


# ------------------------------------------------------------------------------------------ the cache keyword
def test_cache_keyword_is_the_one_models_take():
    model = tiny_model("llama", "sink_sdpa")
    cache = hf_sinks.SinkCache(2, 5)
    with torch.no_grad():
        out = model(random_ids(1, 9), use_cache=True, **cache_kwargs(cache))
    assert output_cache(out) is cache and cache.get_seq_length() == 9  # the model used it (not swallowed by **kwargs)
    assert CACHE_KWARG in ("cache", "past_key_values")


def _deprecations(records):
    return [str(r.message) for r in records if issubclass(r.category, (FutureWarning, DeprecationWarning))]


def _clear_warning_once():
    # transformers logs the `past_key_values` deprecation once per process: forget it so this test sees it again
    cached = getattr(logging.Logger, "warning_once", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def test_streaming_generate_warns_nothing(caplog):
    """``generate`` through hf_sinks (apply, its own cache, a user cache) raises no deprecation and logs none."""
    model = tiny_model("llama", "sdpa")
    hf_sinks.apply(model, num_sink_tokens=2, window_length=6)
    _clear_warning_once()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        out = greedy(model, random_ids(1, 5), 12)
        greedy(model, random_ids(1, 5), 4, **cache_kwargs(hf_sinks.SinkCache.from_model(model)))
        with torch.no_grad():
            model(random_ids(1, 3), use_cache=True)
    assert isinstance(output_cache(out), hf_sinks.SinkCache)
    assert _deprecations(records) == []
    assert not [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


# ------------------------------------------------------------------------------------------------ mask objects
# (not sink_flex: transformers 5.23 itself cannot precompute a flex mask for a static cache, stock flex included)
@pytest.mark.parametrize("impl", ["sink_sdpa", "sink_eager"])
def test_sink_masks_are_what_transformers_accepts(impl):
    """A precomputed mask (static cache) goes through transformers' own pre-processing on every release."""
    model = tiny_model("llama", impl)
    hf_sinks.apply(model, num_sink_tokens=2, window_length=6, attn_implementation=impl)
    out = model.generate(
        random_ids(1, 4), max_new_tokens=3, cache_implementation="static", return_dict_in_generate=True
    )
    assert isinstance(output_cache(out), StaticCache)
    rows, ids, mask = padded_batch([9, 4])
    built = masks.sink_sdpa_mask(batch_size=2, q_length=9, kv_length=9, attention_mask=mask.bool())
    assert isinstance(built, torch.Tensor) and built.ndim == 4  # a plain tensor, nothing imitating one
    torch.testing.assert_close(masks.new_token_validity(built, 9), mask.bool())


def test_compact_mask_for_huge_prompts_is_exact(monkeypatch):
    """Above DENSE_MASK_LIMIT the mask is the key padding only; streaming and the stock fallback stay exact."""
    monkeypatch.setattr(masks, "DENSE_MASK_LIMIT", 0)  # every multi-token mask compact
    sinks, window = 2, 5
    model = tiny_model("llama", "sink_sdpa", layers=2)
    rows, ids, mask = padded_batch([15, 6])
    out = greedy(model, ids, 10, attention_mask=mask, **cache_kwargs(hf_sinks.SinkCache(sinks, window)))
    assert_rows_match_spec(model, rows, out, ids.shape[1], sinks, window)
    # no SinkCache: the stock path builds the dense mask on demand, as transformers would have
    dense = greedy(model, ids, 4, attention_mask=mask, **cache_kwargs(DynamicCache(config=model.config)))
    monkeypatch.undo()
    stock = tiny_model("llama", "sdpa", layers=2)
    expected = greedy(stock, ids, 4, attention_mask=mask, **cache_kwargs(DynamicCache(config=stock.config)))
    torch.testing.assert_close(torch.stack(dense.logits), torch.stack(expected.logits), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- padding under stock attention
def _stock_padded_stream(model, cache):
    rows, ids, mask = padded_batch([10, 4])
    return greedy(model, ids, 30, attention_mask=mask, **cache_kwargs(cache))


def test_stock_attention_refuses_padded_batch_past_capacity_without_apply():
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match=r"batch of 2 rows.*capacity \(16\).*hf_sinks.apply\(model\)"):
        _stock_padded_stream(model, hf_sinks.SinkCache(4, 12, config=model.config))


def test_stock_attention_after_apply_refuses_padded_batch():
    model = tiny_model("llama", "sdpa")
    hf_sinks.apply(model, num_sink_tokens=4, window_length=12)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="left-padded batch.*sink_sdpa"):
        _stock_padded_stream(model, hf_sinks.SinkCache(4, 12, config=model.config))


def test_stock_attention_streams_an_unpadded_batch_with_apply():
    sinks, window = 2, 6
    model = tiny_model("llama", "sdpa")
    hf_sinks.apply(model, num_sink_tokens=sinks, window_length=window)
    model.set_attn_implementation("sdpa")
    ids = random_ids(2, 5)
    out = greedy(model, ids, 20)
    assert_rows_match_spec(model, list(ids), out, 5, sinks, window)


# ---------------------------------------------------------------------------------------------------- apply
def test_apply_validates_before_removing_the_previous_setup():
    model = tiny_model("llama", "sdpa")
    first = hf_sinks.apply(model, num_sink_tokens=4, window_length=12)
    for bad in (dict(num_sink_tokens=-1), dict(window_length=0), dict(attn_implementation="sdpa")):
        with pytest.raises(ValueError):
            hf_sinks.apply(model, **bad)
        assert model._hf_sinks_handle is first and model.config._attn_implementation == "sink_sdpa"
    out = greedy(model, random_ids(1, 4), 3)
    assert isinstance(output_cache(out), hf_sinks.SinkCache) and output_cache(out).capacity == 16


# -------------------------------------------------------------------------------------------- rotary mismatch
def _other_theta_config(model):
    config = tiny_config("llama")
    config.rope_parameters = {**dict(model.config.rope_parameters), "rope_theta": 500.0}
    return config


@pytest.mark.parametrize("impl", ["sink_sdpa", "sdpa"])
def test_cache_with_other_rotary_parameters_is_refused(impl):
    model = tiny_model("llama", "sdpa")
    hf_sinks.apply(model, num_sink_tokens=4, window_length=12)
    if impl == "sdpa":
        model.set_attn_implementation("sdpa")
    cache = hf_sinks.SinkCache(4, 12, config=_other_theta_config(model))
    theta = model.config.rope_parameters["rope_theta"]
    with pytest.raises(ValueError, match=rf"rope_theta=500.0.*rope_theta={theta}"):
        greedy(model, random_ids(1, 5), 3, **cache_kwargs(cache))


def test_sink_attention_without_apply_refuses_other_rotary_parameters():
    model = tiny_model("llama", "sink_sdpa")
    cache = hf_sinks.SinkCache(4, 12, config=_other_theta_config(model))
    with pytest.raises(ValueError, match="rope_theta=500.0"):
        greedy(model, random_ids(1, 5), 3, **cache_kwargs(cache))


# -------------------------------------------------------------- attention_sinks' hand-written loop, no cache given
@pytest.mark.parametrize("route", ["apply", "auto"])
def test_forward_loop_without_a_cache_streams_in_bounded_memory(route, tmp_path):
    sinks, window = 2, 6
    if route == "apply":
        model = tiny_model("llama", "sdpa")
        hf_sinks.apply(model, num_sink_tokens=sinks, window_length=window)
    else:
        tiny_model("llama", "sdpa").save_pretrained(tmp_path)
        model = hf_sinks.AutoModelForCausalLM.from_pretrained(
            tmp_path, attention_sink_size=sinks, attention_sink_window_size=window
        ).eval()
    ids = random_ids(1, 4 * (sinks + window))
    pkv, logits, sizes = None, [], []
    with torch.no_grad():
        for t in range(ids.shape[1]):  # attention_sinks' benchmark loop, word for word (but the keyword)
            out = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(pkv))
            pkv = output_cache(out)
            logits.append(out.logits[:, -1])
            sizes.append(cache_bytes(pkv))
    assert isinstance(pkv, hf_sinks.SinkCache) and pkv.get_stored_length() == sinks + window
    assert len(set(sizes[sinks + window :])) == 1  # constant once full
    spec = reference_logits(model, ids[0], sinks, window)
    torch.testing.assert_close(torch.cat(logits), spec, atol=TOL, rtol=0)


def test_training_forward_keeps_full_attention():
    model = tiny_model("llama", "sdpa")
    hf_sinks.apply(model, num_sink_tokens=2, window_length=4)
    model.train()
    out = model(random_ids(1, 12), labels=random_ids(1, 12))
    assert not isinstance(output_cache(out), hf_sinks.SinkCache)


# ----------------------------------------------------------------------------------------------------- falcon
@pytest.mark.parametrize("arch", ["falcon", "falcon_new"])
def test_falcon_loads_with_a_sink_attention_and_streams(arch, tmp_path):
    sinks, window = 2, 6
    tiny_model(arch, "sdpa").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sink_sdpa").eval()
    assert model.config._attn_implementation == "sink_sdpa"
    out = greedy(model, random_ids(1, 5), 20, **cache_kwargs(hf_sinks.SinkCache(sinks, window)))
    spec = reference_logits(model, out.sequences[0, :-1], sinks, window)[4:]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], spec, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["sink_sdpa", "sink_eager"])
def test_alibi_falcon_is_refused_at_load(name):
    config = tiny_config("falcon", alibi=True)
    with pytest.raises(ValueError, match="alibi=True"):
        AutoModelForCausalLM.from_config(config, attn_implementation=name)


def test_alibi_falcon_is_refused_wherever_a_sink_attention_meets_it():
    """Where Falcon calls the interface (5.25+) its ALiBi bias hides in the dense mask, which a sink attention with a
    SinkCache does not read: switching after loading and the first forward refuse it as well as apply does."""
    from hf_sinks.attention import use_attention
    from hf_sinks.models import get_spec

    model = AutoModelForCausalLM.from_config(tiny_config("falcon", alibi=True), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="alibi=True"):
        hf_sinks.apply(model)
    with pytest.raises(ValueError, match="alibi=True"):
        get_spec(model.config)
    if hf_sinks.MODEL_SPECS["falcon"].route == "patch":
        return  # 5.23: Falcon reads the name only once patched, and the patch refuses ALiBi (apply above)
    with pytest.raises(ValueError, match="alibi=True"):
        model.set_attn_implementation("sink_sdpa")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="alibi=True"), torch.no_grad(), use_attention(model, "sink_sdpa"):
        model(random_ids(1, 5))


# ------------------------------------------------- pyproject's filters: deprecations blamed on hf_sinks are errors
def _warn_as_libraries_do(category):
    warnings.warn("deprecated", category, stacklevel=2)  # blames its caller, as transformers' deprecation helpers do


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
@pytest.mark.parametrize("module", ["hf_sinks", "hf_sinks.api", "hf_sinks.cli.generate", "examples.streaming_generate"])
@pytest.mark.parametrize("raised_by", ["own code", "a library blaming it"])
def test_pyproject_turns_deprecations_from_hf_sinks_into_errors(request, module, category, raised_by):
    """The filters' module field is a regex matched against the module a warning is attributed to (``__name__`` of
    the frame its stacklevel picks): submodules match, and so does a library's warning that blames hf_sinks code."""
    if not request.config.pluginmanager.has_plugin("warnings"):
        pytest.skip("pytest's warnings plugin (which applies pyproject's filters) is disabled")
    source = "warn(category)" if raised_by == "a library blaming it" else "warnings.warn('deprecated', category)"
    frame_globals = {"__name__": module, "warn": _warn_as_libraries_do, "warnings": warnings, "category": category}
    with pytest.raises(category):
        exec(compile(source, f"<{module}>", "exec"), frame_globals)
