"""The sink_token recipe: token added and prepended, only its embedding row (plus LoRA/norms) trains."""

import warnings

import pytest
import torch
from helpers import tiny_model
from training_helpers import LEARNABLE_TEXT, char_tokenizer, logits_of

from hf_sinks.training import (
    DEFAULT_SINK_TOKEN,
    PackedDataset,
    add_sink_token,
    finetune,
    load_finetuned,
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


def _sink_rows(model: torch.nn.Module, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sink token's effective input-embedding row and output-embedding row of ``model`` (PEFT-wrapped or not).

    Read through the modules' forwards, so PEFT's trainable-token rows count exactly as the model uses them.
    """
    with torch.no_grad():
        row_in = model.get_input_embeddings()(torch.tensor([sink]))[0]
        out = model.get_output_embeddings()
        row_out = out(torch.eye(row_in.shape[-1]))[:, sink]  # column `sink` of x @ W.T for x = I is row W[sink]
    return row_in.clone(), row_out.clone()


def _finetune_sink_token(model, output_dir):
    """The sink_token recipe on ``model``, a few steps at a high learning rate through ``finetune`` (Trainer +
    save_model, so the rows move measurably): ``(sink token id, its rows before training, the FinetuneResult)``."""
    tok = char_tokenizer()
    recipe = lora_recipe(model, "sink_token", tokenizer=tok)
    peft_model = recipe.apply(model)
    initial = _sink_rows(peft_model, recipe.sink_token_id)
    result = finetune(
        peft_model,
        tok,
        recipe,
        LEARNABLE_TEXT,
        seq_len=32,
        max_steps=3,
        learning_rate=0.05,
        warmup_steps=0,
        output_dir=output_dir,
        progress=False,
        plot=False,
    )
    return recipe.sink_token_id, initial, result


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_reload_reproduces_the_trained_sink_token(tmp_path, tied):
    """``load_finetuned`` gives back exactly the trained model: the sink row, and with tied embeddings lm_head's too.

    SmolLM2 (tied) made PEFT 0.22 report an "unexpected adapter key" for ``lm_head.token_adapter`` once; a lost
    delta would show here as logits far apart. Untied, the output row of the new token is not trained and not saved,
    so it must come out of ``resize_for_sink_token`` the same on every load, whatever the RNG state.
    """
    model = tiny_model("llama", attn_implementation="sdpa", tie_word_embeddings=tied)
    sink, (init_in, init_out), result = _finetune_sink_token(model, tmp_path / "ft")
    trained_in, trained_out = _sink_rows(result.model, sink)
    assert (trained_in - init_in).abs().max() > 0.05
    if tied:  # lm_head is the embedding: its sink row trained with it
        assert (trained_out - init_out).abs().max() > 0.05
        torch.testing.assert_close(trained_out, trained_in, atol=0, rtol=0)
    else:  # untied: only the input row is in the recipe
        torch.testing.assert_close(trained_out, init_out, atol=0, rtol=0)
    ids = prepend_sink_token(torch.randint(1, 90, (2, 12), generator=torch.Generator().manual_seed(3)), sink)
    expected = logits_of(result.model, ids)

    def fresh_base() -> torch.nn.Module:
        base = tiny_model("llama", attn_implementation="sdpa", tie_word_embeddings=tied)
        torch.manual_seed(1234)  # another RNG state than at training: the new rows must not depend on it
        return base

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = load_finetuned(fresh_base(), tmp_path / "ft", merge=False)
    assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    torch.testing.assert_close(logits_of(reloaded, ids), expected, atol=1e-6, rtol=0)
    for got, want in zip(_sink_rows(reloaded, sink), (trained_in, trained_out)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    merged = load_finetuned(fresh_base(), tmp_path / "ft")  # merge_and_unload: the rows written into the weights
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    for got, want in zip(_sink_rows(merged, sink), (trained_in, trained_out)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits_of(merged, ids), expected, atol=1e-4, rtol=0)  # LoRA merge: fp32 rounding


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_reload_from_a_saved_base_reproduces_the_trained_sink_token(tmp_path, tied):
    """Like the test above, with a base model loaded from a ``save_pretrained`` directory, as a user's model is.

    The base's ``config.json`` on disk makes PEFT's ``save_embedding_layers="auto"`` see the resized vocabulary and
    save both whole embedding matrices (and, tied, ``lm_head``'s token delta, an "unexpected adapter key" on PEFT
    0.22). ``finetune`` saves only the trained sink row; ``load_finetuned`` must still give back the trained model.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tiny_model("llama", attn_implementation="sdpa", tie_word_embeddings=tied).save_pretrained(tmp_path / "base")

    def base_from_disk() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa").eval()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink, (init_in, _), result = _finetune_sink_token(base_from_disk(), tmp_path / "ft")
    assert not [str(w.message) for w in caught if "save_embedding_layers" in str(w.message)]
    with safe_open(str(tmp_path / "ft" / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    # The sink row is saved, as the input embedding's token delta; no whole embedding matrix, no lm_head delta.
    assert [k for k in saved if "token_adapter" in k] == [
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ], saved
    assert not [k for k in saved if "embed_tokens.weight" in k or "lm_head" in k], saved
    trained_in, trained_out = _sink_rows(result.model, sink)
    assert (trained_in - init_in).abs().max() > 0.05  # trained measurably: a lost row shows in logits and rows
    ids = prepend_sink_token(torch.randint(1, 90, (2, 12), generator=torch.Generator().manual_seed(3)), sink)
    expected = logits_of(result.model, ids)

    for merge, atol in ((False, 1e-6), (True, 1e-4)):  # merge_and_unload: LoRA merged in fp32, rounding only
        base = base_from_disk()
        torch.manual_seed(1234)  # another RNG state than at training: the new rows must not depend on it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reloaded = load_finetuned(base, tmp_path / "ft", merge=merge)
        assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]
        torch.testing.assert_close(logits_of(reloaded, ids), expected, atol=atol, rtol=0)
        for got, want in zip(_sink_rows(reloaded, sink), (trained_in, trained_out)):
            torch.testing.assert_close(got, want, atol=1e-6 if merge else 0, rtol=0)
        if merge:
            assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
