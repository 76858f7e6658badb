"""``StaticSinkCache``: the compile-friendly sink cache equals the fp64 spec forward, eager and compiled.

Compiled tests (CPU, inductor) compile twice in all: once through transformers' own ``generate`` compile path (with
``hf_sinks.apply``), once as ``torch.compile(model.forward, fullgraph=True)`` of a hand-written decode loop (stock
``"sdpa"``, no ``apply``). Both run past capacity through several eviction cycles, batch rows in lockstep, and
check that no step recompiled. Everything else runs the same tensor-only decode step eagerly.
"""

import pytest
import torch
from helpers import random_ids, tiny_model

import hf_sinks
from hf_sinks import StaticSinkCache
from hf_sinks.compat import cache_kwargs, output_cache
from hf_sinks.oracle import reference_logits
from hf_sinks.validation import SinkTypeError

TOL = 1e-4


def spec_rows(model, sequences: torch.Tensor, sinks: int, window: int, start: int) -> torch.Tensor:
    """``[B, T - start, V]`` spec logits of every row from index ``start`` on."""
    return torch.stack([reference_logits(model, row, sinks, window)[start:] for row in sequences])


def decode_loop(step, cache, ids: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
    """Feed ``ids[:, start:stop]`` one token at a time through ``step``; returns the last logits of each step."""
    logits = []
    for t in range(start, stop):
        out = step(input_ids=ids[:, t : t + 1], use_cache=True, **cache_kwargs(cache))
        logits.append(out.logits[:, -1])
    return logits


def generate_logits(model, prompt, cache, new_tokens, **kwargs):
    out = model.generate(
        prompt,
        **cache_kwargs(cache),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


# ------------------------------------------------------------------------------------------ compiled
def _graphs_compiled() -> int:
    """Dynamo graphs compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_generate_with_apply_matches_spec():
    """transformers' own compile path (compile_config; on CUDA it is taken automatically), hf_sinks.apply, batch 2."""
    from transformers import CompileConfig

    sinks, window, prompt_len, new = 2, 6, 5, 30  # capacity 8: 35 tokens, four eviction cycles of the window
    model = tiny_model("llama", "sink_sdpa")
    hf_sinks.apply(model, sinks, window)
    prompt = random_ids(2, prompt_len)
    torch._dynamo.reset()
    before = _graphs_compiled()
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told so
    cache = StaticSinkCache.from_model(model)
    sequences, logits = generate_logits(model, prompt, cache, new, compile_config=config)
    assert _graphs_compiled() - before == 1, "the decode step was not compiled once and for all"
    spec = spec_rows(model, sequences[:, :-1], sinks, window, prompt_len - 1)
    torch.testing.assert_close(logits, spec, atol=TOL, rtol=0)
    assert int(cache.get_seq_length()) == prompt_len + new - 1


def test_compiled_fullgraph_step_without_apply_multi_turn():
    """torch.compile(model.forward, fullgraph=True), no hook: decode past capacity, an eager second turn longer than
    the cache (re-derives the bookkeeping from the device counters once), decode again; rows in lockstep."""
    sinks, window = 3, 5
    model = tiny_model("llama", "sink_sdpa")
    ids = random_ids(2, 45)
    cache = StaticSinkCache(sinks, window, config=model.config)
    torch._dynamo.reset()
    before = _graphs_compiled()
    step = torch.compile(model.forward, fullgraph=True)
    with torch.no_grad():
        first = model(input_ids=ids[:, :6], use_cache=True, **cache_kwargs(cache)).logits[:, -1:]
        turn1 = decode_loop(step, cache, ids, 6, 20)
        second = model(input_ids=ids[:, 20:29], use_cache=True, **cache_kwargs(cache)).logits
        turn2 = decode_loop(step, cache, ids, 29, 44)
    assert _graphs_compiled() - before == 1, "the decode step was not compiled once and for all"
    logits = torch.cat([first, torch.stack(turn1, 1), second, torch.stack(turn2, 1)], dim=1)
    spec = spec_rows(model, ids[:, :44], sinks, window, 5)
    torch.testing.assert_close(logits, spec, atol=TOL, rtol=0)


# -------------------------------------------------------------------------------------------- eager
@pytest.mark.parametrize(
    "arch,impl,kwargs",
    [
        pytest.param("llama", "sink_sdpa", dict(heads=4, kv_heads=2), id="llama-gqa-sink_sdpa"),
        pytest.param("llama", "sdpa", dict(heads=4, kv_heads=1, head_dim=8), id="llama-mqa-sdpa"),
        pytest.param("gpt_neox", "sink_eager", dict(heads=3, kv_heads=3, head_dim=10), id="neox-partial-rotary"),
        pytest.param("mistral", "sink_sdpa", dict(), id="mistral"),
    ],
)
def test_eager_generate_matches_spec(arch, impl, kwargs):
    """The tensor-only decode step run eagerly inside generate (which builds the static-cache masks), batch 2."""
    sinks, window = 3, 7
    prompt_len = 14 if impl.startswith("sink") else 6  # a stock attention cannot mask a prompt past capacity
    model = tiny_model(arch, impl, layers=2, **kwargs)
    prompt = random_ids(2, prompt_len)
    cache = StaticSinkCache(sinks, window, config=model.config)
    sequences, logits = generate_logits(model, prompt, cache, 25)
    spec = spec_rows(model, sequences[:, :-1], sinks, window, prompt_len - 1)
    torch.testing.assert_close(logits, spec, atol=TOL, rtol=0)
    assert cache.get_stored_length() == sinks + window


@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_eager_loop_with_apply_multi_turn_and_rebase(sinks):
    """apply's hook: a long second turn re-bases positions (eager) and decode continues from the new base."""
    window = 6
    model = tiny_model("llama", "sink_sdpa")
    hf_sinks.apply(model, sinks, window)
    ids = random_ids(1, 70)
    cache = StaticSinkCache.from_model(model)
    with torch.no_grad():
        parts = [model(input_ids=ids[:, :9], use_cache=True, **cache_kwargs(cache)).logits[:, 8:]]
        parts += [torch.stack(decode_loop(model, cache, ids, 9, 20), 1)]
        parts += [model(input_ids=ids[:, 20:50], use_cache=True, **cache_kwargs(cache)).logits]
        assert int(cache.layers[0].base) > 0  # the chunk re-based the window
        parts += [torch.stack(decode_loop(model, cache, ids, 50, 69), 1)]
    spec = spec_rows(model, ids[:, :69], sinks, window, 8)
    torch.testing.assert_close(torch.cat(parts, 1), spec, atol=TOL, rtol=0)


def test_from_sink_cache_continues_exactly():
    sinks, window = 2, 5
    model = tiny_model("llama", "sink_sdpa")
    ids = random_ids(2, 40)
    eager = hf_sinks.SinkCache(sinks, window, config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :17], use_cache=True, **cache_kwargs(eager))
        static = StaticSinkCache.from_sink_cache(eager)
        logits = torch.stack(decode_loop(model, static, ids, 17, 39), 1)
    spec = spec_rows(model, ids[:, :39], sinks, window, 17)
    torch.testing.assert_close(logits, spec, atol=TOL, rtol=0)
    assert static.layers[0].count.item() == 39


def test_buffers_keep_their_addresses():
    """Compiled graphs (and CUDA graphs) hold the buffers: decode, a chunk, beam reorder and reset write in place."""
    model = tiny_model("llama", "sink_sdpa")
    ids = random_ids(2, 30)
    cache = StaticSinkCache(2, 4, config=model.config)
    cache.early_initialization(2, 2, 16, torch.float32, torch.device("cpu"))
    layer = cache.layers[1]
    pointers = [t.data_ptr() for t in (layer.keys, layer.values, layer.sink_keys, layer.count, layer.base)]
    with torch.no_grad():
        model(input_ids=ids[:, :3], use_cache=True, **cache_kwargs(cache))
        decode_loop(model, cache, ids, 3, 12)
        model(input_ids=ids[:, 12:20], use_cache=True, **cache_kwargs(cache))
        cache.reorder_cache(torch.tensor([1, 0]))
        decode_loop(model, cache, ids.flip(0), 20, 24)
        cache.reset()
    assert [t.data_ptr() for t in (layer.keys, layer.values, layer.sink_keys, layer.count, layer.base)] == pointers
    assert int(cache.get_seq_length()) == 0 and cache.is_compileable


# ------------------------------------------------------------------------------------------- refusals
def test_padded_batch_is_refused():
    model = tiny_model("llama", "sink_sdpa")
    hf_sinks.apply(model, 2, 6)
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="left padding"):
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(StaticSinkCache.from_model(model)))


def test_padded_batch_is_refused_without_hook():
    model = tiny_model("llama", "sink_sdpa")
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="left padding"):
        model(
            input_ids=ids,
            attention_mask=mask,
            use_cache=True,
            **cache_kwargs(StaticSinkCache(2, 6, config=model.config)),
        )


def test_needs_config_or_rotary():
    with pytest.raises(SinkTypeError, match="config=model.config"):
        StaticSinkCache(4, 12)


def test_batch_size_is_fixed():
    model = tiny_model("llama", "sink_sdpa")
    cache = StaticSinkCache(2, 6, config=model.config)
    with torch.no_grad():
        out = model(input_ids=random_ids(2, 5), use_cache=True, **cache_kwargs(cache))
        assert output_cache(out) is cache
        with pytest.raises(ValueError, match="batch"):
            model(input_ids=random_ids(3, 1), use_cache=True, **cache_kwargs(cache))
