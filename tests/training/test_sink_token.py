"""The sink_token recipe: token added and prepended, only its embedding row (plus LoRA/norms) trains."""

import pytest
import torch
from helpers import tiny_model
from training_helpers import LEARNABLE_TEXT, char_tokenizer

from hf_sinks.training import (
    DEFAULT_SINK_TOKEN,
    PackedDataset,
    add_sink_token,
    lora_recipe,
    prepend_sink_token,
    tokenize_text,
    trainable_parameter_names,
)
from hf_sinks.training.data import IGNORE_INDEX
from hf_sinks.training.sink_token import sink_token_id_of


def test_add_sink_token_is_idempotent_and_special():
    tok = char_tokenizer()
    n = len(tok)
    sink = add_sink_token(tok)
    assert sink == n and len(tok) == n + 1
    assert add_sink_token(tok) == sink and len(tok) == n + 1
    assert tok.convert_ids_to_tokens(sink) == DEFAULT_SINK_TOKEN
    assert tok.decode([sink, 5], skip_special_tokens=True) == tok.decode([5])
    assert sink_token_id_of(tok) == sink
    with pytest.raises(ValueError, match="no '<\\|other\\|>' token"):
        sink_token_id_of(tok, "<|other|>")
    with pytest.raises(ValueError, match="non-empty string"):
        add_sink_token(tok, "")


def test_prepend_sink_token():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = prepend_sink_token(ids, 99)
    assert out.tolist() == [[99, 5, 6, 7], [99, 8, 9, 10]]
    assert prepend_sink_token(out, 99) is out  # already there: a streaming session can call it on every prompt
    assert prepend_sink_token(torch.tensor([1, 2]), 99).tolist() == [99, 1, 2]
    # left padding: the sink goes right before each row's first real token
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    new_ids, new_mask = prepend_sink_token(ids, 99, mask)
    assert new_ids.tolist() == [[0, 0, 99, 5, 6], [99, 7, 8, 9, 10]]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    again_ids, again_mask = prepend_sink_token(new_ids, 99, new_mask)  # already there: only one more pad slot
    assert again_ids.tolist() == [[0, 0, 0, 99, 5, 6], [0, 99, 7, 8, 9, 10]]
    assert again_mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="does not match"):
        prepend_sink_token(ids, 99, mask[:, :3])


def test_packed_rows_start_with_the_sink():
    tok = char_tokenizer()
    sink = add_sink_token(tok)
    ids = tokenize_text(tok, LEARNABLE_TEXT)
    ds = PackedDataset(ids, seq_len=32, sink_token_id=sink)
    assert len(ds) == len(ids) // 31
    for i in (0, len(ds) - 1):
        row = ds[i]
        assert row["input_ids"].shape == (32,) and row["input_ids"][0] == sink
        assert row["labels"][0] == IGNORE_INDEX and torch.equal(row["labels"][1:], row["input_ids"][1:])
        assert torch.equal(row["input_ids"][1:], ids[i * 31 : (i + 1) * 31])  # consecutive, no overlap
    plain = PackedDataset(ids, seq_len=32)
    assert torch.equal(plain[1]["input_ids"], ids[32:64])
    with pytest.raises(ValueError, match="fewer than one row"):
        PackedDataset(ids[:10], seq_len=32)
    with pytest.raises(ValueError, match="seq_len=1"):
        PackedDataset(ids, seq_len=1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt_neox", "falcon"])
def test_only_the_sink_row_trains(arch):
    tok = char_tokenizer()
    model = tiny_model(arch, attn_implementation="sdpa")
    recipe = lora_recipe(model, "sink_token", tokenizer=tok)
    assert recipe.sink_config.num_sink_tokens == 1 and recipe.sink_token_id == len(tok) - 1
    peft_model = recipe.apply(model)
    emb = peft_model.get_input_embeddings()
    assert emb.weight.shape[0] == len(tok)  # resized for the new token
    names = trainable_parameter_names(peft_model)
    token_params = [n for n in names if "trainable_tokens" in n]
    assert token_params, names
    assert all(".lora_" in n or "trainable_tokens_delta" in n or ("norm" in n or "ln_" in n) for n in names), names
    assert not any(
        ".modules_to_save." in n and ("embed" in n or "word_embeddings" in n or "lm_head" in n) for n in names
    )
    for n, p in peft_model.named_parameters():
        if "trainable_tokens_delta" in n:
            assert p.shape == (1, model.config.hidden_size)

    # one optimizer step with a large lr: only the sink's embedding row moves
    all_ids = torch.arange(len(tok))[None]
    before = emb(all_ids).detach().clone()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model.train()
    batch = prepend_sink_token(torch.randint(1, 90, (2, 16)), recipe.sink_token_id)
    peft_model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    changed = (emb(all_ids).detach() - before).abs().sum(-1)[0]
    assert changed[recipe.sink_token_id] > 0
    assert torch.count_nonzero(changed) == 1


def test_tied_output_row_follows_the_sink_row():
    tok = char_tokenizer()
    model = tiny_model("llama", attn_implementation="sdpa", tie_word_embeddings=True)
    recipe = lora_recipe(model, "sink_token", tokenizer=tok, train_norms=False)
    peft_model = recipe.apply(model)
    delta = next(p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n)
    with torch.no_grad():
        delta.add_(0.5)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)
