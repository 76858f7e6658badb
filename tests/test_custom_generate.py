"""transformers' ``custom_generate`` route: hf_sinks' drop-in for ``transformers-community/sink_cache``, offline."""

import inspect
import os
import pathlib

import pytest
import tomllib
import torch
from helpers import random_ids, tiny_model
from transformers import GenerationMixin

import hf_sinks
from hf_sinks.compat import cache_kwargs, output_cache
from hf_sinks.oracle import reference_logits

# The route (transformers' generate loading custom_generate/generate.py from a repo or folder), detected from what
# the installed release has: `generate(custom_generate=...)` and `load_custom_generate`.
HAS_ROUTE = (
    hasattr(GenerationMixin, "load_custom_generate")
    and "custom_generate" in inspect.signature(GenerationMixin.generate).parameters
)
pytestmark = pytest.mark.skipif(
    not HAS_ROUTE, reason="this transformers has no custom_generate route (GenerationMixin.load_custom_generate)"
)

ROUTE = dict(custom_generate=hf_sinks.custom_generate_path(), trust_remote_code=True)
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


def snapshot(model):
    """What a call must leave as it was: attention, instance attributes, config flag, hooks, outputs."""
    with torch.no_grad():
        logits = model(random_ids(1, 12, seed=5)).logits
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return (
        model.config._attn_implementation,
        sorted(vars(model)),
        getattr(model.config, "attention_sinks", None),
        hooks,
        logits,
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[:4] == before[:4]
    assert torch.equal(after[4], before[4])


@pytest.mark.parametrize(
    "arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("llama", "sink_sdpa"), ("falcon", "sdpa")]
)
def test_streams_past_capacity_matches_the_spec_and_restores_the_model(arch, attn):
    sinks, window, prompt = 2, 6, 10  # prompt alone exceeds the capacity of 8; 20 more tokens stream on
    model = tiny_model(arch, attn)
    before = snapshot(model)
    out = model.generate(
        random_ids(1, prompt),
        **ROUTE,
        window_length=sinks + window,
        num_sink_tokens=sinks,
        max_new_tokens=20,
        min_new_tokens=20,
        **GREEDY,
    )
    cache = output_cache(out)
    assert isinstance(cache, hf_sinks.SinkCache)
    assert (cache.num_sink_tokens, cache.window_length) == (sinks, window)
    assert cache.get_stored_length() == sinks + window  # bounded: 30 tokens seen, 8 kept per layer
    assert all(layer.keys.shape[-2] == sinks + window for layer in cache.layers)
    spec = reference_logits(model, out.sequences[0, :-1], sinks, window)[prompt - 1 :]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], spec, atol=1e-4, rtol=0)
    assert_unchanged(model, before)


def test_left_padded_batch_matches_the_spec():
    sinks, window = 2, 5
    model = tiny_model("llama", "sdpa")
    rows = [random_ids(1, n, seed=30 + n)[0] for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row) :], mask[i, 9 - len(row) :] = row, 1
    out = model.generate(
        ids,
        attention_mask=mask,
        **ROUTE,
        window_length=sinks + window,
        num_sink_tokens=sinks,
        max_new_tokens=12,
        min_new_tokens=12,
        **GREEDY,
    )
    logits = torch.stack(out.logits, 1)
    for i, row in enumerate(rows):
        seq = torch.cat([row, out.sequences[i, 9:]])
        spec = reference_logits(model, seq[:-1], sinks, window)[len(row) - 1 :]
        torch.testing.assert_close(logits[i], spec, atol=1e-4, rtol=0, msg=f"row {i}")


def test_defaults_are_the_hub_repos():
    out = tiny_model("llama", "sdpa").generate(random_ids(1, 5), **ROUTE, max_new_tokens=2, **GREEDY)
    cache = output_cache(out)
    assert (cache.num_sink_tokens, cache.capacity) == (4, 256)  # the Hub's window_length counts the sinks


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (0, ValueError, r"window_length=0 is invalid: must be an int >= 1.*custom_generate \(hf_sinks\)"),
        (-3, ValueError, r"window_length=-3 is invalid"),
        (2.5, TypeError, r"window_length=2.5 is invalid: must be an int >= 1, not float"),
        ("64", TypeError, r"window_length='64' is invalid"),
        (True, TypeError, r"window_length=True is invalid"),
        (2**25, ValueError, r"too large"),
        (2, ValueError, r"window_length=2 must be larger than num_sink_tokens=2"),
    ],
)
def test_bad_window_length_is_refused_clearly_and_the_model_is_untouched(bad, error, match):
    model = tiny_model("llama", "sdpa")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        model.generate(random_ids(1, 5), **ROUTE, window_length=bad, num_sink_tokens=2, max_new_tokens=2)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_sink_tokens=-1), r"num_sink_tokens=-1 is invalid"),
        (dict(cache_implementation="static"), r"cache_implementation='static' is not supported"),
        (dict(use_cache=False), r"use_cache=False"),
        (dict(prompt_lookup_num_tokens=3), r"prompt_lookup_num_tokens=3 is not supported: assisted generation"),
    ],
)
def test_other_bad_arguments_are_refused_before_the_model_is_touched(kwargs, match):
    model = tiny_model("llama", "sdpa")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.generate(random_ids(1, 5), **ROUTE, **{"window_length": 8, **kwargs}, max_new_tokens=2)
    assert_unchanged(model, before)


def test_a_cache_passed_in_is_refused():
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match=r"brings its own SinkCache; do not pass"):
        model.generate(
            random_ids(1, 5), **ROUTE, window_length=8, max_new_tokens=2, **cache_kwargs(hf_sinks.SinkCache(2, 4))
        )


def test_the_model_is_restored_when_generation_raises():
    model = tiny_model("llama", "sdpa")
    before = snapshot(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(random_ids(1, 5), **ROUTE, window_length=4, num_sink_tokens=1, max_new_tokens=-1)
    assert_unchanged(model, before)


def test_a_streaming_model_keeps_its_setup_and_streams_with_the_requested_sizes():
    model = tiny_model("llama", "sdpa")
    handle = hf_sinks.apply(model, num_sink_tokens=3, window_length=9)
    before = snapshot(model)
    out = model.generate(
        random_ids(1, 8), **ROUTE, window_length=6, num_sink_tokens=1, max_new_tokens=12, min_new_tokens=12, **GREEDY
    )
    assert output_cache(out).get_stored_length() == 6
    spec = reference_logits(model, out.sequences[0, :-1], 1, 5)[7:]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], spec, atol=1e-4, rtol=0)
    assert model._hf_sinks_handle is handle
    assert_unchanged(model, before)
    handle.remove()


def test_a_local_folder_still_needs_trust_remote_code():
    """transformers treats custom_generate/generate.py of a local folder as remote code (an explicit opt-in)."""
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        model.generate(
            random_ids(1, 5),
            custom_generate=hf_sinks.custom_generate_path(),
            trust_remote_code=False,
            window_length=8,
            max_new_tokens=2,
        )


def test_the_folder_has_the_hub_layout_and_ships_as_package_data():
    folder = pathlib.Path(hf_sinks.custom_generate_path())
    assert folder.is_dir() and (folder / "custom_generate" / "generate.py").is_file()
    shipped = sorted(
        p.relative_to(folder.parent).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert {
        "custom_generate_repo/README.md",
        "custom_generate_repo/custom_generate/generate.py",
        "custom_generate_repo/custom_generate/requirements.txt",
    } <= set(shipped)
    root = pathlib.Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hf_sinks"]
    for path in shipped:  # every file of the folder is installed with the wheel
        assert any(pathlib.PurePosixPath(path).match(p) for p in patterns), path
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: the route is exercised offline
