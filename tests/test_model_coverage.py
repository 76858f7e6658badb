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
from helpers import VOCAB, random_ids
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import hf_sinks
from hf_sinks.attention import use_attention
from hf_sinks.attention.masks import sink_sdpa_mask
from hf_sinks.cache import model_rules
from hf_sinks.compat import cache_kwargs
from hf_sinks.models import VERIFIED_MODEL_TYPES, check_model, feature_reason, unsupported_reason
from hf_sinks.oracle import reference_logits
from hf_sinks.rope import shift_rotary

S, W = 2, 8
TOL = 2e-4
SLIDING = "sliding_attention"
FULL = "full_attention"

#: Sizes every tiny config gets, wherever the config class has the field (a list field: every entry).
SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "ffn_hidden_size": 64,
    "num_attention_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "initializer_range": 0.15,
    "sliding_window": 6,  # sliding layers: a window of 6 under a cache of 2 + 8 (the native-window rule)
    # mixture-of-experts
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "num_dense_layers": 1,
    "first_k_dense_replace": 1,
    # per-layer inputs (Gemma 3n / 4)
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB,
    "laurel_rank": 8,
}
MAX_LAYERS = 4


def _shrink(fields: dict) -> dict:
    """A tiny copy of a config's fields: the sizes of :data:`SIZES`, and 2-4 layers chosen so that every distinct
    combination of the per-layer lists (``layer_types``, ``mlp_layer_types``, ``no_rope_layers``, ...) keeps one
    layer (a hybrid model stays hybrid). Sub-configs (``text_config``, ...) are shrunk the same way."""
    fields = dict(fields)
    for key, value in fields.items():
        if key.endswith("_config") and isinstance(value, dict):
            fields[key] = _shrink(value)
    n = fields.get("num_hidden_layers")
    if isinstance(n, int) and n > 1:
        per_layer = [k for k, v in fields.items() if isinstance(v, list) and len(v) == n]
        seen, chosen = set(), []
        for i in range(n):
            signature = tuple(str(fields[k][i]) for k in per_layer)
            if signature not in seen:
                seen.add(signature)
                chosen.append(i)
        chosen = chosen[:MAX_LAYERS]
        chosen += [i for i in range(n) if i not in chosen][: max(0, 2 - len(chosen))]
        chosen.sort()
        for key in per_layer:
            fields[key] = [fields[key][i] for i in chosen]
        layer_dict = fields.get("per_layer_config")
        if isinstance(layer_dict, dict):  # {"05": {...}}: per-layer overrides by index
            fields["per_layer_config"] = {
                f"{j:02d}": layer_dict[k] for j, i in enumerate(chosen) for k in layer_dict if int(k) == i
            }
        fields["num_hidden_layers"] = len(chosen)
    heads = fields.get("num_attention_heads")
    for key, size in SIZES.items():
        if fields.get(key) is not None or (key == "head_dim" and key in fields):  # head_dim=None: derived later
            fields[key] = [size] * len(fields[key]) if isinstance(fields[key], list) else size
    if "num_key_value_heads" in fields:  # keep multi-head models multi-head (None: as many as heads), GQA models GQA
        kv = fields["num_key_value_heads"]
        fields["num_key_value_heads"] = SIZES["num_attention_heads"] if kv in (None, heads) else 2
    for key, token in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if fields.get(key) is not None:
            fields[key] = token
    return fields


#: The architectures that must stream, with what their tiny config needs beyond :func:`_shrink`'s generic sizes.
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
    "gemma2": {"layer_types": [SLIDING, FULL]},
    "gemma3_text": {"layer_types": [SLIDING, SLIDING, FULL], "num_hidden_layers": 3},
    "phi3": {"partial_rotary_factor": 0.5},
    "olmo2": {},
    "granite": {},
    "starcoder2": {"sliding_window": 6},
    "cohere": {},
    "cohere2": {"layer_types": [SLIDING, FULL]},
    "gpt_neox": {},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "gpt_oss": {"layer_types": [SLIDING, FULL]},
    "smollm3": {"no_rope_layers": [1, 0], "use_sliding_window": False},
    # NoPE global layers, recorded in MODEL_SPECS (only their attention code shows it)
    "afmoe": {},
    "flint": {},
    "exaone4": {},
    "exaone4_no_window": {"sliding_window": None, "layer_types": [FULL, FULL]},  # then every layer rotates
    "exaone_moe": {},
    "kolibri1": {},
    "cohere2_moe": {},
    # its attention takes position_ids and does not pass them on: the sink_* functions place chunks without them
    "persimmon": {},
    "nanochat": {},  # its rotate_half turns by -angle: modelled with negated frequencies
    "fuyu": {},  # Persimmon behind an image-patch front end (text-only here)
    # sizes under names of their own; transformers 5.24's defaults do not build (no rope_theta, clip_qkv=None)
    "dbrx": {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 512,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"hidden_size": 64, "ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    },
    # the generic route, with the generic tiny config
    **{
        model_type: {}
        for model_type in """
        apertus apertus1p5_text arcee aria_text bitnet cwm doge ernie4_5 ernie4_5_moe exaone flex_olmo gemma3 glm glm4
        glm4_moe got_ocr2 granite_swa granitemoe granitemoe_swa granitemoeshared helium hunyuan_v1_dense
        hunyuan_v1_moe hy_v3 hyperclovax internlm3 iquestcoder jais2 laguna mellum mimo_v2_flash minimax_m2
        minimax_m3_vl_text ministral ministral3 modernbert-decoder moshi moss_transcribe_diarize nemotron olmo olmo3
        olmoe phi phi4_multimodal phimoe sarvam_moe seed_oss solar_open vaultgemma
        """.split()
    },
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},  # None by default
    "lfm2": {},  # attention layers only (its conv layers are refused: test_lfm2_conv_layers_are_refused)
    "lfm2_moe": {"layer_types": [FULL, FULL]},
}
ALIASES = {"mistral_wide": "mistral", "exaone4_no_window": "exaone4"}

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
    "gemma3n_text": "KV sharing",
    "gemma4_text": "per-layer attention shapes",
    "mllama": "cross-attention layers",
    "beam": "absolute position",
    "diffllama": "differential attention",
    "hrm_text": "recurrent cycles",
    "dory": "recurrent loops",
    "jetmoe": "copies the cached keys",
}


def _installed(names, alias=lambda name: name):
    """``names`` as pytest params; those whose model type this transformers lacks are skipped, saying so."""
    import transformers

    return [
        pytest.param(name)
        if alias(name) in CONFIG_MAPPING
        else pytest.param(
            name, marks=pytest.mark.skip(reason=f"{alias(name)} is not in transformers {transformers.__version__}")
        )
        for name in sorted(names)
    ]


def tiny_config(arch: str):
    model_type = ALIASES.get(arch, arch)
    config_class = CONFIG_MAPPING[model_type]
    fields = _shrink(config_class().to_dict())
    fields.update(STREAMING.get(arch, {}))
    for key in ("transformers_version", "architectures", "model_type", "_name_or_path"):
        fields.pop(key, None)
    return config_class(**fields)


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


@pytest.mark.parametrize("arch", _installed(STREAMING, lambda a: ALIASES.get(a, a)))
def test_each_layer_rotates_as_the_model_does(arch):
    model = build(arch)
    if check_model(model).route == "patch":
        pytest.skip("Falcon's patched attention is covered by tests/test_streaming_oracle.py (recompute oracle)")
    rules = model_rules(model, S, W)
    ids = random_ids(1, 12)
    shift = 7
    _CAPTURED.clear()
    with torch.no_grad(), use_attention(model, "hf_sinks_capture"):
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


@pytest.mark.parametrize("arch", _installed(STREAMING, lambda a: ALIASES.get(a, a)))
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
        prompt,
        attention_mask=mask,
        **cache_kwargs(cache),
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
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


@pytest.mark.parametrize("arch", _installed(STREAMING, lambda a: ALIASES.get(a, a)))
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


def _without_position_ids(module, query, key, value, attention_mask, **kwargs):
    from hf_sinks.attention import sink_sdpa_attention_forward

    kwargs.pop("position_ids", None)  # as Persimmon's attention does: it takes them and does not pass them on
    return sink_sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("sink_sdpa_without_position_ids", _without_position_ids)
AttentionMaskInterface.register("sink_sdpa_without_position_ids", sink_sdpa_mask)


def test_chunks_stream_exactly_when_the_attention_gets_no_position_ids():
    """A later chunk after ``apply`` re-based the positions, with no ``position_ids`` reaching the attention: the
    chunk's keys sit where the rotary put them (real index - base), not where the sinks' offset says."""
    model = build("llama")
    hf_sinks.apply(model, num_sink_tokens=S, window_length=W)
    ids = random_ids(1, 23, seed=3)
    spec = reference_logits(model, ids, S, W)
    with use_attention(model, "sink_sdpa_without_position_ids"):
        cache = hf_sinks.SinkCache.from_model(model)
        with torch.no_grad():
            logits = [
                model(input_ids=ids[:, a:b], use_cache=True, **cache_kwargs(cache)).logits[0]
                for a, b in ((0, 14), (14, 23))
            ]
    torch.testing.assert_close(torch.cat(logits), spec, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "mixtral", "starcoder2"])
def test_all_sliding_model_streams_like_its_native_generation(arch):
    """Every layer slides with sw=6 <= S + W: the per-layer rule is the model's own generation (independent of the
    spec): same logits as the stock attention with a DynamicCache, while the cache holds 6 tokens per layer."""
    from transformers import DynamicCache

    stock = build(arch)
    model = build(arch, "sink_sdpa")
    prompt = random_ids(1, 5)
    kwargs = dict(
        max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
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
@pytest.mark.parametrize("model_type", _installed(REFUSED))
def test_refused_with_its_reason(model_type):
    config = CONFIG_MAPPING[model_type]()
    reason = unsupported_reason(config)
    if reason is None:  # a feature only the model class shows (it bypasses AttentionInterface)
        cls = AutoModelForCausalLM._model_mapping[type(config)]
        assert not getattr(cls, "_supports_attention_backend", False)
        reason = "does not route its attention through AttentionInterface"
    assert REFUSED[model_type] in reason


def classify(model_type: str) -> str | None:
    """``None`` when hf_sinks streams ``model_type``, else the reason it is refused (no model built)."""
    try:
        config = CONFIG_MAPPING[model_type]()
    except Exception as error:  # noqa: BLE001 (a config that cannot even be built with its defaults)
        assert model_type not in VERIFIED_MODEL_TYPES, model_type
        return f"not verified (its default config does not build here: {type(error).__name__})"
    import transformers

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    reason = feature_reason(config)
    if (
        reason is None
        and hf_sinks.MODEL_SPECS.get(model_type) is None
        and not getattr(cls, "_supports_attention_backend", False)
    ):
        return "does not route its attention through AttentionInterface"  # check_model, before the verified check
    return unsupported_reason(config)


def proven_types() -> dict[str, set[str]]:
    """``{arch: {model types of its config and text config}}`` for every installed architecture of STREAMING."""
    out = {}
    for arch in STREAMING:
        if ALIASES.get(arch, arch) in CONFIG_MAPPING:
            config = tiny_config(arch)
            out[arch] = {config.model_type, config.get_text_config(decoder=True).model_type}
    return out


def test_verified_types_are_exactly_the_proven_ones():
    """The library accepts (hf_sinks.models.VERIFIED_MODEL_TYPES) exactly the types this file proves."""
    proven = set().union(*proven_types().values())
    installed = {t for t in VERIFIED_MODEL_TYPES if t in CONFIG_MAPPING}
    assert proven == installed, (sorted(proven - installed), sorted(installed - proven))


def test_every_causal_lm_is_proven_or_refused():
    """Every causal-LM type of the installed transformers is proven above or refused by the library with a reason
    (configs only; a type that is neither fails here)."""
    proven = {ALIASES.get(arch, arch) for arch in proven_types()}
    neither = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        reason = classify(model_type)
        if model_type in proven:
            assert reason is None, f"{model_type}: {reason}"
        elif reason is None or len(reason) < 20:
            neither.append(model_type)
    assert not neither, f"neither proven nor refused: {neither}"
    for arch in STREAMING:
        if arch in CONFIG_MAPPING:
            assert classify(arch) is None, arch
    for model_type, words in REFUSED.items():
        if model_type in CONFIG_MAPPING:
            assert words in classify(model_type), model_type


def test_an_unverified_type_is_refused_and_the_opt_in_warns_once(monkeypatch):
    """A type that passes the feature checks but is not proven here (Llama, taken off the verified list for this
    test) is refused with that reason; HF_SINKS_ALLOW_UNVERIFIED=1 warns once."""
    import warnings

    from hf_sinks import models

    config = tiny_config("llama")
    assert models.feature_reason(config) is None
    model = AutoModelForCausalLM.from_config(config)
    monkeypatch.setattr(models, "VERIFIED_MODEL_TYPES", models.VERIFIED_MODEL_TYPES - {"llama"})
    with pytest.raises(ValueError, match=r"model_type='llama'.*not verified by hf_sinks' coverage tests"):
        hf_sinks.apply(model)
    monkeypatch.setenv("HF_SINKS_ALLOW_UNVERIFIED", "1")
    monkeypatch.setattr(models, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"model_type='llama'.*not verified by hf_sinks' coverage tests"):
        assert models.unsupported_reason(config) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.unsupported_reason(config) is None  # once per model type


def test_lfm2_conv_layers_are_refused():
    """LFM2's short convolutions are refused from the config (``layer_types`` with "conv") and, when a config does
    not mark them, from the module tree."""
    if "lfm2" not in CONFIG_MAPPING:
        pytest.skip("lfm2 is not in this transformers")
    config = tiny_config("lfm2")
    n = config.num_hidden_layers
    config.layer_types = ["conv"] + [FULL] * (n - 1)
    assert "layer types ['conv']" in unsupported_reason(config)
    model = AutoModelForCausalLM.from_config(config)
    model.config.layer_types = [FULL] * n  # a config that hides its conv layer
    with pytest.raises(ValueError, match=r"model_type='lfm2'.*convolution layers"):
        check_model(model)
    with pytest.raises(ValueError, match="convolution layers"):
        hf_sinks.apply(model)


if __name__ == "__main__":  # the coverage table of docs/models.md: `python tests/test_model_coverage.py`
    from collections import Counter

    proven = {ALIASES.get(arch, arch) for arch in proven_types()}
    counts = Counter()
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        reason = classify(model_type)
        outcome = "proven" if model_type in proven else f"refused: {reason}"
        counts["proven" if model_type in proven else reason.split(":")[0].split(" (")[0][:60]] += 1
        print(f"{model_type:32s} {outcome}")
    print(f"\n{len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} causal-LM types")
    for key, n in counts.most_common():
        print(f"{n:4d}  {key}")
