"""Coverage of transformers' causal LMs (docs/models.md): each streams exactly against the fp64 per-layer spec, or
is refused with its specific reason.

For every architecture that streams, three independent checks on a tiny random model (2-3 layers, mixed layer types
where the architecture has them, ``initializer_range=0.15`` so a wrong sink rotation moves the logits visibly):

* **the rotary of every layer is the model's own**: keys and queries the model hands its attention at positions
  ``p + d`` equal ours shifted by ``d`` from ``p`` (:func:`hf_sinks.rope.shift_rotary` with the layer's parameters;
  unchanged for a layer without RoPE). This ties the spec to the model's own RoPE code, not to ours;
* **decode past capacity + a prompt longer than the cache + a left-padded batch**, through ``generate`` with a plain
  ``SinkCache`` (each layer's rule bound by the first sink attention call), against ``reference_logits``;
* **chunked prefill** longer than the cache through ``hf_sinks.apply`` (rules bound by the position hook).

Sliding layers get a window of 6 under a cache of 2 + 8 (native window), one model a window of 16 (sink rule).
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, random_ids
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import hf_sinks
from hf_sinks.cache import model_rules
from hf_sinks.compat import cache_kwargs
from hf_sinks.models import check_model, unsupported_reason
from hf_sinks.oracle import reference_logits, using_attention
from hf_sinks.rope import shift_rotary

S, W = 2, 8
TOL = 2e-4
SLIDING = "sliding_attention"
FULL = "full_attention"

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=64,
    max_position_embeddings=512,
    initializer_range=0.15,
    pad_token_id=0,
    # mixture-of-experts sizes
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)

#: The architectures that must stream (issue 14), with what their tiny config needs beyond COMMON.
STREAMING = {
    "llama": {},
    "mistral": {"sliding_window": 6},
    "mistral_wide": {"sliding_window": 16},  # a window wider than the cache: the sink + window rule
    "mixtral": {"sliding_window": 6},
    "qwen2": {"layer_types": [SLIDING, FULL], "sliding_window": 6, "use_sliding_window": True},
    "qwen2_moe": {},
    "qwen3": {"layer_types": [SLIDING, FULL], "sliding_window": 6, "use_sliding_window": True},
    "qwen3_moe": {},
    "gemma": {},
    "gemma2": {"layer_types": [SLIDING, FULL], "sliding_window": 6},
    "gemma3_text": {"layer_types": [SLIDING, SLIDING, FULL], "sliding_window": 6, "num_hidden_layers": 3},
    "phi3": {"partial_rotary_factor": 0.5},
    "olmo2": {},
    "granite": {},
    "starcoder2": {"sliding_window": 6},
    "cohere": {},
    "cohere2": {"layer_types": [SLIDING, FULL], "sliding_window": 6},
    "gpt_neox": {"num_key_value_heads": None},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "gpt_oss": {"layer_types": [SLIDING, FULL], "sliding_window": 6},
    "smollm3": {"no_rope_layers": [1, 0], "use_sliding_window": False},
}

#: Architectures refused, with the words their reason must contain.
REFUSED = {
    "gpt2": "no RoPE",
    "opt": "no RoPE",
    "bloom": "no RoPE",
    "deepseek_v3": "multi-head latent attention",
    "jamba": "layer types",
    "qwen3_next": "layer types",
    "mamba": "layer types",
    "llama4_text": "layer types",
}


def tiny_config(arch: str):
    model_type = "mistral" if arch == "mistral_wide" else arch
    extra = dict(STREAMING.get(arch, {}))
    defaults = CONFIG_MAPPING[model_type]().to_dict()
    kwargs = {k: v for k, v in COMMON.items() if k in defaults}
    if model_type == "falcon":
        kwargs.pop("num_key_value_heads", None)
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    for k, v in extra.items():
        if v is None:
            kwargs.pop(k, None)
    return CONFIG_MAPPING[model_type](**kwargs)


def build(arch: str, impl: str | None = None):
    torch.manual_seed(0)
    config = tiny_config(arch)
    cls = AutoModelForCausalLM._model_mapping[type(config)]
    stock = "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"
    spec = check_model(cls._from_config(config, attn_implementation=stock))  # cheap, tiny
    torch.manual_seed(0)
    if spec.route == "patch" or impl is None:
        model = cls._from_config(config, attn_implementation=stock).eval()
        return model
    return cls._from_config(config, attn_implementation=impl).eval()


# ------------------------------------------------------------------------------------ rotary of each layer
_CAPTURED: dict[int, list] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _CAPTURED.setdefault(module.layer_idx, []).append((query.detach().double(), key.detach().double()))
    kwargs.pop("s_aux", None)
    kwargs.pop("softcap", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("hf_sinks_capture", _capture)
AttentionMaskInterface.register("hf_sinks_capture", sdpa_mask)


@pytest.mark.parametrize("arch", sorted(STREAMING))
def test_each_layer_rotates_as_the_model_does(arch):
    model = build(arch)
    if check_model(model).route == "patch":
        pytest.skip("Falcon's patched attention is covered by tests/test_streaming_oracle.py (recompute oracle)")
    rules = model_rules(model, S, W)
    ids = random_ids(1, 12)
    shift = 7
    _CAPTURED.clear()
    with torch.no_grad(), using_attention(model, "hf_sinks_capture"):
        for start in (0, shift):
            model(input_ids=ids, position_ids=torch.arange(start, start + 12)[None], use_cache=False)
    assert sorted(_CAPTURED) == list(range(len(rules)))
    moved = 0
    for idx, ((q0, k0), (q1, k1)) in _CAPTURED.items():
        rotary = rules[idx].rotary
        delta = torch.full((1,), shift)
        torch.testing.assert_close(shift_rotary(k0, delta, rotary), k1, atol=TOL, rtol=1e-4, msg=f"layer {idx} keys")
        torch.testing.assert_close(shift_rotary(q0, delta, rotary), q1, atol=TOL, rtol=1e-4, msg=f"layer {idx} queries")
        moved += rotary is not None and not torch.allclose(k0, k1, atol=1e-3)
    assert moved, "no layer rotates: the check would not see a wrong rotation"


# ------------------------------------------------------------------------------------ streaming == spec
def _left_padded(lengths):
    rows = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    longest = max(lengths)
    prompt = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(prompt)
    for i, row in enumerate(rows):
        prompt[i, longest - len(row) :] = row
        mask[i, longest - len(row) :] = 1
    return rows, prompt, mask


@pytest.mark.parametrize("arch", sorted(STREAMING))
def test_generate_streams_exactly(arch):
    """Left-padded batch, one prompt longer than the cache, decoding past capacity: every row equals the spec."""
    from hf_sinks.api import default_attention

    stock = build(arch)
    impl = default_attention(stock)
    if check_model(stock).route == "patch":
        model = stock
        hf_sinks.apply(model, num_sink_tokens=S, window_length=W)
    else:
        model = build(arch, impl)
    rows, prompt, mask = _left_padded([13, 4])
    cache = hf_sinks.SinkCache(S, W)
    out = model.generate(
        prompt, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=10, min_new_tokens=10, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    logits = torch.stack(out.logits, dim=1)
    for i, row in enumerate(rows):
        seq = torch.cat([row, out.sequences[i, prompt.shape[1] :]])
        spec = reference_logits(model, seq[:-1], S, W)[len(row) - 1 :]
        torch.testing.assert_close(logits[i], spec, atol=TOL, rtol=0, msg=f"{arch} row {i}")
    # memory follows the layers: a sliding layer whose window fits holds only that window
    for idx, rule in enumerate(model_rules(model, S, W)):
        assert cache.layers[idx].keys.shape[2] == rule.capacity
        assert cache.layers[idx].rule.same_as(rule)


@pytest.mark.parametrize("arch", sorted(STREAMING))
def test_chunked_prefill_through_apply_streams_exactly(arch):
    model = build(arch)
    hf_sinks.apply(model, num_sink_tokens=S, window_length=W)
    ids = random_ids(1, 23, seed=3)
    cache = hf_sinks.SinkCache.from_model(model)
    logits = []
    with torch.no_grad():
        for a, b in ((0, 14), (14, 23)):
            logits.append(model(input_ids=ids[:, a:b], use_cache=True, **cache_kwargs(cache)).logits[0])
    spec = reference_logits(model, ids, S, W)
    torch.testing.assert_close(torch.cat(logits), spec, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "mixtral", "starcoder2"])
def test_all_sliding_model_streams_like_its_native_generation(arch):
    """Every layer slides with sw=6 <= S + W: the per-layer rule is the model's own generation (independent of the
    spec): same logits as the stock attention with a DynamicCache, while the cache holds 6 tokens per layer."""
    from transformers import DynamicCache

    stock = build(arch)
    model = build(arch, "sink_sdpa")
    prompt = random_ids(1, 5)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cache = hf_sinks.SinkCache(S, W)
    ours = torch.stack(model.generate(prompt, **cache_kwargs(cache), **kwargs).logits)
    native = torch.stack(stock.generate(prompt, **cache_kwargs(DynamicCache(config=stock.config)), **kwargs).logits)
    torch.testing.assert_close(ours, native, atol=TOL, rtol=0)
    assert all(layer.keys.shape[2] == 6 for layer in cache.layers)


def test_cache_bytes_follow_the_layers():
    from hf_sinks.eval.memory import cache_bytes, cache_layer_bytes

    model = build("gemma3_text", "sink_sdpa")  # sliding (window 6), sliding, global under a cache of 2 + 8
    cache = hf_sinks.SinkCache(S, W)
    model.generate(random_ids(1, 5), **cache_kwargs(cache), max_new_tokens=15, min_new_tokens=15, do_sample=False)
    per_layer = cache_layer_bytes(cache)
    kv = [2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers]
    assert [layer.keys.shape[2] for layer in cache.layers] == [6, 6, S + W]
    assert per_layer[0] == per_layer[1] < per_layer[2] and all(b >= k for b, k in zip(per_layer, kv))
    assert cache_bytes(cache) == sum(per_layer)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_with_its_reason(model_type):
    config = CONFIG_MAPPING[model_type]()
    reason = unsupported_reason(config)
    if reason is None:  # a feature only the model class shows (it bypasses AttentionInterface)
        cls = AutoModelForCausalLM._model_mapping[type(config)]
        assert not getattr(cls, "_supports_attention_backend", False)
        reason = "does not route its attention through AttentionInterface"
    assert REFUSED[model_type] in reason


def classify(model_type: str) -> str | None:
    """``None`` when the generic route takes ``model_type``, else the reason it is refused (no model built)."""
    config = CONFIG_MAPPING[model_type]()
    reason = unsupported_reason(config)
    if reason is not None:
        return reason
    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    import transformers

    cls = getattr(transformers, cls_name)
    if hf_sinks.MODEL_SPECS.get(model_type) is None and not getattr(cls, "_supports_attention_backend", False):
        return "does not route its attention through AttentionInterface"
    return None


def test_every_causal_lm_is_classified():
    """Every causal-LM type of the installed transformers is either routed or refused with a reason (cheap: configs
    only); the named ones land where they must."""
    outcome = {}
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            outcome[model_type] = classify(model_type)
        except Exception as error:  # noqa: BLE001 (a config that cannot even be built with its defaults)
            outcome[model_type] = f"config does not build: {type(error).__name__}"
    for arch in STREAMING:
        if arch in outcome:
            assert outcome[arch] is None, f"{arch}: {outcome[arch]}"
    for model_type, words in REFUSED.items():
        assert outcome[model_type] is not None and words in outcome[model_type], model_type
    assert all(reason is None or len(reason) > 20 for reason in outcome.values())


if __name__ == "__main__":  # the coverage table of docs/models.md: `python tests/test_model_coverage.py`
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            reason = classify(model_type)
        except Exception as error:  # noqa: BLE001
            reason = f"config does not build: {type(error).__name__}"
        proven = "proven" if model_type in STREAMING else "generic route"
        print(f"{model_type:32s} {proven if reason is None else 'refused: ' + reason}")
