"""lora_recipe: the right parameters train, per architecture; tied embeddings; attention choice; rope; errors."""

import json
import re

import pytest
import torch
from helpers import tiny_model

from hf_sinks.training import (
    load_finetuned,
    lora_recipe,
    rope_scaling_for_length,
    set_rope_scaling,
    trainable_parameter_names,
)
from hf_sinks.training.finetune import RECIPE_FILE
from hf_sinks.training.recipes import attention_is_registered, check_trained_modules, module_paths

ARCHS = ["llama", "mistral", "gpt_neox", "falcon", "falcon_new"]

# What LongLoRA's LoRA+ trains, per architecture: (LoRA-targeted modules, embedding, norms).
EXPECTED = {
    "llama": (
        {"q_proj", "k_proj", "v_proj", "o_proj"},
        "model.embed_tokens",
        {"input_layernorm", "post_attention_layernorm", "model.norm"},
    ),
    "mistral": (
        {"q_proj", "k_proj", "v_proj", "o_proj"},
        "model.embed_tokens",
        {"input_layernorm", "post_attention_layernorm", "model.norm"},
    ),
    "gpt_neox": (
        {"query_key_value", "attention.dense"},
        "gpt_neox.embed_in",
        {"input_layernorm", "post_attention_layernorm", "final_layer_norm"},
    ),
    "falcon": ({"query_key_value", "self_attention.dense"}, "transformer.word_embeddings", {"input_layernorm", "ln_f"}),
    "falcon_new": (
        {"query_key_value", "self_attention.dense"},
        "transformer.word_embeddings",
        {"ln_attn", "ln_mlp", "ln_f"},
    ),
}


def _categorise(name: str, arch: str) -> str:
    lora, embedding, norms = EXPECTED[arch]
    if ".lora_A." in name or ".lora_B." in name:
        module = name.split(".lora_")[0]
        assert any(module.endswith(t) for t in lora), f"LoRA on an unexpected module: {name}"
        return "lora"
    if ".modules_to_save." in name:
        module = name.split(".modules_to_save.")[0]
        if module.endswith(embedding) or module.endswith("lm_head"):
            return "embedding"
        assert any(module.endswith(n) for n in norms), f"unexpected module to save: {name}"
        return "norm"
    raise AssertionError(f"unexpected trainable parameter {name}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", ["longlora", "sinklora"])
def test_only_lora_embeddings_and_norms_train(arch, recipe):
    model = tiny_model(arch, attn_implementation="sdpa")
    all_norms = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}
    sink_recipe = lora_recipe(model, recipe, attn_implementation=None)
    declared = set(sink_recipe.lora_config.modules_to_save)  # before PEFT rewrites it (tied embeddings)
    assert all_norms <= declared  # the recipe declares every norm by its path...
    peft_model = sink_recipe.apply(model)
    names = trainable_parameter_names(peft_model)
    kinds = {_categorise(n, arch) for n in names}
    assert kinds == {"lora", "embedding", "norm"}
    # every targeted projection of every layer has LoRA; every norm is trainable
    lora_modules = {re.sub(r"\.lora_[AB]\..*", "", n) for n in names if ".lora_" in n}
    assert len(lora_modules) == len(EXPECTED[arch][0]) * model.config.num_hidden_layers
    norm_modules = {n.split(".modules_to_save.")[0] for n in names if _categorise(n, arch) == "norm"}
    assert {n.removeprefix("base_model.model.") for n in norm_modules} == all_norms
    # ...and exactly the declared modules train whole (the embedding plus, when tied, its partner)
    trained_whole = {
        n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n in names if "modules_to_save" in n
    }
    embedding = {EXPECTED[arch][1], "lm_head"}
    assert trained_whole - embedding == declared - embedding == all_norms
    # the base weights and the MLP stay frozen
    assert not any("base_layer" in n or ".mlp." in n for n in names)


def test_module_names_match_at_a_dot_boundary():
    # "norm" is llama's final norm only, not input_layernorm (PEFT <= 0.21 matched plain string suffixes)
    model = tiny_model("llama", attn_implementation="sdpa")
    assert module_paths(model, ("norm",)) == ["model.norm"]
    assert module_paths(model, ("layernorm",)) == []
    assert module_paths(model, ("layers.1.input_layernorm",)) == ["model.layers.1.input_layernorm"]


def test_apply_refuses_when_peft_trains_something_else(monkeypatch):
    # What PEFT 0.22 did to bare norm names: a declared module is silently left unwrapped. apply() must say so.
    import peft
    from peft.utils import ModulesToSaveWrapper

    real = peft.get_peft_model

    def drops_a_norm(model, config, *args, **kwargs):
        peft_model = real(model, config, *args, **kwargs)
        layer = peft_model.get_base_model().model.layers[0]
        assert isinstance(layer.input_layernorm, ModulesToSaveWrapper)
        layer.input_layernorm = layer.input_layernorm.original_module
        return peft_model

    monkeypatch.setattr(peft, "get_peft_model", drops_a_norm)
    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(
        RuntimeError, match=r"modules_to_save: declared but not trained \['model.layers.0.input_layernorm'\]"
    ):
        lora_recipe(model, "longlora", attn_implementation=None).apply(model)


def test_check_trained_modules_reports_both_directions():
    model = tiny_model("llama", attn_implementation="sdpa")
    peft_model = lora_recipe(model, "longlora", train_embeddings=False, attn_implementation=None).apply(model)
    norms = set(module_paths(model.get_base_model() if hasattr(model, "get_base_model") else model, ("norm",)))
    exact = {
        "modules_to_save": set(peft_model.peft_config["default"].modules_to_save),
        "trainable_token_indices": set(),
    }
    check_trained_modules(peft_model, exact)
    with pytest.raises(RuntimeError, match=r"trained but not declared \['model.norm'\]"):
        check_trained_modules(peft_model, {**exact, "modules_to_save": exact["modules_to_save"] - norms})
    with pytest.raises(RuntimeError, match=r"declared but not trained \['model.lm_head'\]"):
        check_trained_modules(peft_model, {**exact, "modules_to_save": exact["modules_to_save"] | {"model.lm_head"}})


def _save(peft_model, recipe, path) -> dict[str, torch.Tensor]:
    """Perturb every trained parameter (so a reload that misses one shows), save adapter + recipe; the values."""
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    peft_model.save_pretrained(str(path))
    recipe.to_json_file(path / RECIPE_FILE)
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", ["longlora", "sinklora"])
def test_adapter_reloads_the_same_trained_set(tmp_path, arch, recipe):
    model = tiny_model(arch, attn_implementation="sdpa")
    sink_recipe = lora_recipe(model, recipe, attn_implementation=None, learned_sink_logits=recipe == "sinklora")
    trained = _save(sink_recipe.apply(model), sink_recipe, tmp_path)
    reloaded = load_finetuned(tiny_model(arch, attn_implementation="sdpa"), tmp_path, merge=False, is_trainable=True)
    again = {n: p for n, p in reloaded.named_parameters() if p.requires_grad}
    assert sorted(again) == sorted(trained)
    for name, value in trained.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)


def test_adapter_saved_with_bare_norm_names_reloads_every_norm(tmp_path):
    # Adapters written before the recipes declared paths list modules_to_save=["embed_tokens", "norm"]; PEFT 0.21
    # trained and saved every *norm module for that, PEFT 0.22 would reload only model.norm. load_finetuned restores
    # what the adapter file holds.
    model = tiny_model("llama", attn_implementation="sdpa")
    sink_recipe = lora_recipe(model, "longlora", attn_implementation=None)
    trained = _save(sink_recipe.apply(model), sink_recipe, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["modules_to_save"] = ["model.embed_tokens", "norm"]
    config_file.write_text(json.dumps(config))
    reloaded = load_finetuned(tiny_model("llama", attn_implementation="sdpa"), tmp_path, merge=False, is_trainable=True)
    again = {n: p for n, p in reloaded.named_parameters() if p.requires_grad}
    assert sorted(again) == sorted(trained)
    for name, value in trained.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)


def test_untied_embeddings_train_input_only():
    model = tiny_model("llama", attn_implementation="sdpa", tie_word_embeddings=False)
    names = trainable_parameter_names(lora_recipe(model, "longlora", attn_implementation=None).apply(model))
    assert any("embed_tokens.modules_to_save" in n for n in names)
    assert not any("lm_head" in n for n in names)  # LongLoRA trains the input embedding, not an untied head


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_tied_embeddings_stay_one_matrix(arch):
    kwargs = {"tie_word_embeddings": True} if arch == "llama" else {}
    model = tiny_model(arch, attn_implementation="sdpa", **kwargs)
    assert model.config.tie_word_embeddings
    before = model.get_input_embeddings().weight.detach().clone()
    peft_model = lora_recipe(model, "longlora", attn_implementation=None).apply(model)
    embedding_params = [
        p for n, p in peft_model.named_parameters() if p.requires_grad and ("embed" in n or "lm_head" in n)
    ]
    assert len({id(p) for p in embedding_params}) == 1, "tied embeddings must train as one tensor"
    with torch.no_grad():
        embedding_params[0].add_(0.1)
    merged = peft_model.merge_and_unload()
    assert (
        merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
        or torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)
    )
    torch.testing.assert_close(merged.get_input_embeddings().weight, before + 0.1)


def test_norms_and_embeddings_can_be_frozen():
    model = tiny_model("llama", attn_implementation="sdpa")
    names = trainable_parameter_names(
        lora_recipe(model, "longlora", train_embeddings=False, train_norms=False, attn_implementation=None).apply(model)
    )
    assert names and all(".lora_" in n for n in names)


def test_target_modules_override_and_hyperparameters():
    model = tiny_model("llama", attn_implementation="sdpa")
    recipe = lora_recipe(model, "longlora", r=4, lora_alpha=8, target_modules=["q_proj"], attn_implementation=None)
    assert recipe.lora_config.r == 4 and recipe.lora_config.lora_alpha == 8
    assert set(recipe.lora_config.target_modules) == {"q_proj"}


@pytest.mark.parametrize("recipe, preferred, sinks", [("sinklora", "sink_sfattn", 4), ("longlora", "sink_s2attn", 4)])
def test_auto_attention_is_the_recipes_when_registered(recipe, preferred, sinks):
    model = tiny_model("llama", attn_implementation="sdpa")
    r = lora_recipe(model, recipe)
    assert r.attn_implementation == (preferred if attention_is_registered(preferred) else None)
    assert r.sink_config.num_sink_tokens == sinks
    r.apply(model)
    assert model.config._attn_implementation == (r.attn_implementation or "sdpa")
    assert model.config.attention_sinks["num_sink_tokens"] == sinks  # what sink_sfattn and hf_sinks.apply read


def test_explicit_attention_and_group_ratio():
    model = tiny_model("llama", attn_implementation="sdpa")
    lora_recipe(model, "sinklora", attn_implementation="eager", group_size_ratio=0.5).apply(model)
    assert model.config._attn_implementation == "eager"
    assert model.config.s2attn_group_size_ratio == 0.5


def test_errors_name_the_value():
    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="'qlora'.*sinklora, longlora, sink_token"):
        lora_recipe(model, "qlora")
    with pytest.raises(ValueError, match="not_an_attention.*not registered"):
        lora_recipe(model, "sinklora", attn_implementation="not_an_attention")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        lora_recipe(model, "sink_token")
    with pytest.raises(ValueError, match="group_size_ratio"):
        lora_recipe(model, "sinklora", group_size_ratio=2.0)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*\['falcon', 'gpt_neox', 'llama', 'mistral'\]"):
        lora_recipe(gpt2, "sinklora")


def test_falcon_cannot_switch_attention_after_loading():
    model = tiny_model("falcon", attn_implementation="sdpa")
    recipe = lora_recipe(model, "sinklora")
    assert recipe.attn_implementation is None  # auto: falcon bypasses the interface, keep its attention
    with pytest.raises(ValueError, match="Falcon bypasses"):
        lora_recipe(model, "sinklora", attn_implementation="eager").apply(model)


# ------------------------------------------------------------------------------------------------ RoPE scaling
def test_rope_scaling_set_through_the_recipe():
    model = tiny_model("llama", attn_implementation="sdpa")
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()
    ids = torch.randint(1, 96, (1, 12))
    before = model(input_ids=ids).logits
    lora_recipe(model, "longlora", rope_scaling=4, attn_implementation=None).apply(model)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0
    torch.testing.assert_close(rotary.inv_freq, inv_freq / 4)
    assert not torch.allclose(model(input_ids=ids).logits, before)  # positions really are interpolated


@pytest.mark.parametrize("arch", ["gpt_neox", "falcon"])
def test_rope_scaling_other_architectures(arch):
    model = tiny_model(arch, attn_implementation="sdpa")
    rotary = next(m for m in model.modules() if hasattr(m, "inv_freq"))
    inv_freq = rotary.inv_freq.clone()
    set_rope_scaling(model, {"type": "linear", "factor": 2.0})
    torch.testing.assert_close(rotary.inv_freq, inv_freq / 2)


def test_yarn_when_supported():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if "yarn" not in ROPE_INIT_FUNCTIONS:
        pytest.skip("this transformers has no yarn")
    model = tiny_model("llama", attn_implementation="sdpa")
    scaling = set_rope_scaling(model, {"rope_type": "yarn", "factor": 2.0})
    assert scaling["rope_type"] == "yarn" and model.model.rotary_emb.rope_type == "yarn"
    assert model.model.rotary_emb.attention_scaling > 1.0  # yarn's attention temperature


def test_dynamic_rope_cannot_stream():
    # RotaryParams (what SinkCache re-rotates keys with) refuses length-dependent RoPE; the docs say so.
    from hf_sinks import RotaryParams

    model = tiny_model("llama", attn_implementation="sdpa")
    set_rope_scaling(model, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        RotaryParams.from_model(model)


def test_rope_errors_and_length_helper():
    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="'ntk'.*supported types: linear"):
        lora_recipe(model, "longlora", rope_scaling={"rope_type": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="positive 'factor'"):
        lora_recipe(model, "longlora", rope_scaling={"rope_type": "linear", "factor": 0})
    assert rope_scaling_for_length(model.config, 4096) is None  # fits already
    assert rope_scaling_for_length(model.config, 10000) == {"rope_type": "linear", "factor": 3.0}  # ceil(10000/4096)


def test_dequantized_gguf_model_becomes_trainable():
    # The default SmolLM2 loads from a GGUF file dequantized to fp32 but keeps `hf_quantizer`, which makes Trainer
    # refuse to train it; the recipe forgets that quantizer (the weights are plain tensors).
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.trainer_utils import validate_quantization_for_training
    from transformers.utils.quantization_config import GgufConfig

    model = tiny_model("llama", attn_implementation="sdpa")
    quantizer = GgufHfQuantizer(GgufConfig(dequantize=True))
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.config.quantization_config = quantizer.quantization_config
    peft_model = lora_recipe(model, "longlora", attn_implementation=None).apply(model)
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    validate_quantization_for_training(peft_model)  # raised "GGUF ... do not support training" before
