"""Learned per-head sink logits: added as `sink_logits` modules, trained/saved by PEFT, read through the wrapper."""

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file

from hf_sinks.training import (
    add_learned_sinks,
    get_sink_logits,
    lora_recipe,
    remove_learned_sinks,
    trainable_parameter_names,
)
from hf_sinks.training.learned_sinks import DEFAULT_INIT, AttentionSinkLogits, attention_modules, learned_sink_state
from hf_sinks.training.recipes import attention_is_registered


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt_neox", "falcon"])
def test_add_and_remove(arch):
    model = tiny_model(arch, attn_implementation="sdpa")
    ids = torch.randint(1, 96, (1, 10))
    before = model(input_ids=ids).logits
    assert add_learned_sinks(model) == model.config.num_hidden_layers
    assert add_learned_sinks(model) == 0  # idempotent
    for _, module in attention_modules(model):
        logits = get_sink_logits(module)
        assert logits.shape == (model.config.num_attention_heads,)
        assert torch.all(logits == DEFAULT_INIT)
    # sdpa ignores them: the model computes exactly what it did
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert remove_learned_sinks(model) == model.config.num_hidden_layers
    assert all(get_sink_logits(m) is None for _, m in attention_modules(model))
    assert not any("sink_logits" in n for n, _ in model.named_parameters())


def test_bad_head_count():
    with pytest.raises(ValueError, match="num_heads"):
        AttentionSinkLogits(0)


def test_recipe_trains_saves_and_merges_them(tmp_path):
    model = tiny_model("llama", attn_implementation="sdpa")
    peft_model = lora_recipe(model, "sinklora", learned_sink_logits=True, attn_implementation=None).apply(model)
    names = trainable_parameter_names(peft_model)
    sink_names = [n for n in names if "sink_logits" in n]
    assert len(sink_names) == model.config.num_hidden_layers
    assert all(n.endswith("sink_logits.modules_to_save.default.weight") for n in sink_names)
    # attention functions see the trainable copy through PEFT's wrapper (by call or via get_sink_logits)
    attn = peft_model.base_model.model.model.layers[0].self_attn
    trained = dict(peft_model.named_parameters())[sink_names[0]]
    assert get_sink_logits(attn) is trained and attn.sink_logits() is trained
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "sink_logits" in n:
                p.add_(torch.arange(p.numel(), dtype=p.dtype))
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    keys = [k for k in saved if "sink_logits" in k]
    assert len(keys) == model.config.num_hidden_layers
    expected = DEFAULT_INIT + torch.arange(model.config.num_attention_heads, dtype=torch.float32)
    torch.testing.assert_close(saved[keys[0]], expected)
    merged = peft_model.merge_and_unload()
    state = learned_sink_state(merged)
    assert len(state) == model.config.num_hidden_layers
    for logits in state.values():
        torch.testing.assert_close(logits, expected)


@pytest.mark.skipif(not attention_is_registered("sink_sfattn"), reason="sink_sfattn not registered")
def test_sfattn_gives_them_a_gradient():
    model = tiny_model("llama", attn_implementation="sdpa")
    peft_model = lora_recipe(model, "sinklora", learned_sink_logits=True, attn_implementation="sink_sfattn").apply(
        model
    )
    peft_model.train()
    ids = torch.randint(1, 96, (2, 32))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "sink_logits" in n and p.requires_grad]
    assert grads and all(g is not None and torch.count_nonzero(g) > 0 for g in grads)
