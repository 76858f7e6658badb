"""Helpers for tests/training: an offline character-level tokenizer and a learnable text."""

from __future__ import annotations

import torch

#: Short repeated text: learnable by a tiny model in a few dozen steps.
LEARNABLE_TEXT = "the cat sat on the mat. the dog sat on the log. " * 60


def char_tokenizer(vocab_size: int = 96):
    """A character-level ``PreTrainedTokenizerFast`` built offline (ids < ``vocab_size``; 0 is ``<unk>``/pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab_size - 2] + ["\n"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
