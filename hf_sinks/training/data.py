"""Training data: a text (file, string or token ids) packed into fixed-length sequences, optionally sink-prefixed.

LongLoRA-style packing: the whole text is tokenized once and cut into consecutive rows of ``seq_len`` tokens (the
remainder is dropped), so there is no padding and every row is a full-length causal-LM sample. With a sink token each
row is ``[sink] + seq_len - 1 text tokens``: the model always sees the same first token (StreamingLLM §3.3).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..validation import check_int

#: Label value the loss ignores (transformers' convention).
IGNORE_INDEX = -100


def tokenize_text(tokenizer: Any, text: str | os.PathLike | torch.Tensor | list[int] | None) -> torch.Tensor:
    """``text`` as a 1-D LongTensor of token ids.

    Args:
        text: token ids (a tensor ``[T]``/``[1, T]`` or a list), a path to a UTF-8 text file, ``None``/``"default"``
            for hf_sinks' default text (Shakespeare, see :mod:`hf_sinks.eval.data`), or a string of text (a string
            naming an existing file is read as that file).
    """
    if isinstance(text, torch.Tensor):
        ids = text.long()
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"token ids must be [T] or [1, T], got shape {tuple(ids.shape)}.")
        return ids
    if isinstance(text, (list, tuple)):
        return torch.tensor(list(text), dtype=torch.long)
    if text is None or (isinstance(text, (str, os.PathLike)) and (str(text).lower() == "default" or _is_file(text))):
        from ..eval.data import read_text

        text = read_text(text)
    elif isinstance(text, os.PathLike):
        raise FileNotFoundError(f"Text file {str(text)!r} does not exist.")
    ids = tokenizer(str(text), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _is_file(text: str | os.PathLike) -> bool:
    if isinstance(text, str) and ("\n" in text or len(text) > 4096):
        return False  # text, not a path (and too long for one: os.stat would raise)
    try:
        return Path(text).expanduser().is_file()
    except OSError:
        return False


class PackedDataset(Dataset):
    """Consecutive ``seq_len``-token rows of one token stream, as ``{"input_ids", "labels"}`` (a torch Dataset).

    Args:
        token_ids: 1-D token ids (see :func:`tokenize_text`).
        seq_len: tokens per row, sink token included.
        sink_token_id: if given, every row starts with it and holds ``seq_len - 1`` text tokens. Its label is
            ``-100``: the sink is a given, never a prediction target (causal LMs shift labels, so label 0 is unused
            anyway; this keeps custom losses honest too).
        stride: text tokens between the starts of consecutive rows (default: no overlap).
        max_rows: keep at most this many rows (the first ones).

    Raises:
        ValueError: ``seq_len`` too small, or the text too short for one row (the message gives both lengths).
    """

    def __init__(
        self,
        token_ids: torch.Tensor,
        seq_len: int,
        sink_token_id: int | None = None,
        stride: int | None = None,
        max_rows: int | None = None,
    ):
        ids = torch.as_tensor(token_ids).long().flatten()
        minimum = 3 if sink_token_id is not None else 2
        check_int("seq_len", seq_len, minimum)
        self.seq_len = seq_len
        self.sink_token_id = sink_token_id
        self.text_len = seq_len - (1 if sink_token_id is not None else 0)
        self.stride = self.text_len if stride is None else stride
        check_int("stride", self.stride, 1)
        if ids.numel() < self.text_len:
            raise ValueError(
                f"The text has {ids.numel()} tokens, fewer than one row of {self.text_len} text tokens "
                f"(seq_len={seq_len}); use a longer text or a smaller seq_len."
            )
        self.token_ids = ids
        rows = (ids.numel() - self.text_len) // self.stride + 1
        self.num_rows = rows if max_rows is None else min(rows, max_rows)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_rows <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for {self.num_rows} rows")
        index %= self.num_rows
        start = index * self.stride
        text = self.token_ids[start : start + self.text_len]
        if self.sink_token_id is None:
            return {"input_ids": text.clone(), "labels": text.clone()}
        input_ids = torch.cat([torch.tensor([self.sink_token_id]), text])
        labels = input_ids.clone()
        labels[0] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


def split_token_ids(token_ids: torch.Tensor, held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)``: the last ``held_out`` tokens are kept apart for evaluation."""
    ids = torch.as_tensor(token_ids).long().flatten()
    if not 0 <= held_out < ids.numel():
        raise ValueError(f"held_out={held_out} must be in [0, {ids.numel()}) for a text of {ids.numel()} tokens.")
    return ids[: ids.numel() - held_out], ids[ids.numel() - held_out :]


__all__ = ["IGNORE_INDEX", "PackedDataset", "split_token_ids", "tokenize_text"]
