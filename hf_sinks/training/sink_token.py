"""A dedicated, trainable sink token (StreamingLLM §3.3): one placeholder token at the start of every sequence.

Pretrained models dump attention on whatever happens to come first, so streaming needs ~4 initial tokens as sinks.
A model that always sees the same learned token at position 0 uses it as its sink, and **one** token is enough
(StreamingLLM Table 3). Here the token is added to an existing model: the tokenizer gets ``"<|sink|>"``, the
embedding matrix one new row, and only that row (plus LoRA) is trained, via PEFT ``trainable_token_indices``.
At inference the token is prepended to every prompt/stream and the model streams with ``num_sink_tokens=1``.
"""

from __future__ import annotations

from typing import Any

import torch

#: The default sink token string.
DEFAULT_SINK_TOKEN = "<|sink|>"


def add_sink_token(tokenizer: Any, sink_token: str = DEFAULT_SINK_TOKEN) -> int:
    """Add ``sink_token`` to ``tokenizer`` as a special token (idempotent) and return its id.

    Special, so that ordinary text never tokenizes into it and decoding can skip it.
    """
    if not isinstance(sink_token, str) or not sink_token:
        raise ValueError(f"sink_token must be a non-empty string, got {sink_token!r}.")
    if sink_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [sink_token]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(sink_token))


def resize_for_sink_token(model: torch.nn.Module, sink_token_id: int, init_from: int | None = None) -> None:
    """Give ``model`` an embedding row for ``sink_token_id`` (no-op if it already has one).

    The new rows start as the exact mean of the existing rows, in the input embeddings and (untied) output embeddings,
    or the input row as a copy of token ``init_from``'s row (e.g. the BOS token, a natural sink of many models). Tied
    output embeddings follow.

    Deterministic on purpose: :func:`hf_sinks.training.load_finetuned` calls this again on a fresh base model, and an
    untied output row is neither trained nor saved by the ``sink_token`` recipe (``finetune`` saves no embedding
    matrix, only the trained sink row), so it must come out the same on every call.
    transformers' ``mean_resizing`` samples ``N(mean, 1e-9 * covariance)`` from the global RNG instead, which moved
    the sink token's logit by ~1e-5 between training and reload.
    """
    embeddings = model.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    if sink_token_id >= old_rows:
        out = model.get_output_embeddings()
        old_out_rows = out.weight.shape[0] if out is not None else 0
        model.resize_token_embeddings(sink_token_id + 1, mean_resizing=False)
        # Re-read the modules: resizing may replace them (and the output one follows a tie).
        _fill_new_rows_with_mean(model.get_input_embeddings().weight, old_rows)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not model.get_input_embeddings().weight:
            _fill_new_rows_with_mean(out.weight, old_out_rows)
            if isinstance(getattr(out, "bias", None), torch.Tensor):
                _fill_new_rows_with_mean(out.bias, old_out_rows)
    if init_from is not None:
        weight = model.get_input_embeddings().weight
        if not 0 <= init_from < weight.shape[0]:
            raise ValueError(f"init_from={init_from} is not a token id of this model (0..{weight.shape[0] - 1}).")
        with torch.no_grad():
            weight[sink_token_id] = weight[init_from]


def _fill_new_rows_with_mean(tensor: torch.Tensor, old_rows: int) -> None:
    """Set ``tensor[old_rows:]`` (rows added by a resize) to the mean of ``tensor[:old_rows]``, computed in fp32."""
    if 0 < old_rows < tensor.shape[0]:
        with torch.no_grad():
            tensor[old_rows:] = tensor[:old_rows].float().mean(0).to(tensor.dtype)


def prepend_sink_token(input_ids: torch.Tensor, sink_token_id: int, attention_mask: torch.Tensor | None = None):
    """Put the sink token in front of every row of ``input_ids`` (``[T]`` or ``[B, T]``), unless already there.

    With ``attention_mask`` (``[B, T]``, left padding allowed) the sink goes right before each row's first real
    token, and ``(input_ids, attention_mask)`` is returned; otherwise just ``input_ids``. Rows that already start
    with the sink are left alone, so streaming code can call this on every prompt of a session.
    """
    ids = torch.as_tensor(input_ids)
    squeeze = ids.dim() == 1
    if squeeze:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(ids.shape)}.")
    if attention_mask is None:
        starts = ids[:, 0] == sink_token_id if ids.shape[1] > 0 else torch.zeros(ids.shape[0], dtype=torch.bool)
        if bool(starts.all()):
            return ids[0] if squeeze else ids
        if bool(starts.any()):
            raise ValueError(
                f"Rows {starts.nonzero().flatten().tolist()} already start with the sink token and others do not; "
                "pass an attention_mask (rows then get padded) or prepend per row."
            )
        sink = torch.full((ids.shape[0], 1), sink_token_id, dtype=ids.dtype, device=ids.device)
        out = torch.cat([sink, ids], dim=1)
        return out[0] if squeeze else out
    mask = torch.as_tensor(attention_mask).to(ids.device)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}.")
    # Left-padded rows: insert at each row's first real token by shifting the padding one slot further left.
    pad = torch.zeros((ids.shape[0], 1), dtype=ids.dtype, device=ids.device)
    new_ids = torch.cat([pad, ids], dim=1)
    new_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
    for row in range(ids.shape[0]):
        real = mask[row].nonzero()
        first = int(real[0]) if real.numel() else ids.shape[1]
        if first < ids.shape[1] and int(ids[row, first]) == sink_token_id:
            continue  # already there: keep the row, one more pad slot on the left
        new_ids[row, :first] = ids[row, :first]
        new_ids[row, first] = sink_token_id
        new_mask[row, :first] = mask[row, :first]
        new_mask[row, first] = 1
    return new_ids, new_mask


def sink_token_id_of(tokenizer: Any, sink_token: str = DEFAULT_SINK_TOKEN) -> int:
    """The id of ``sink_token`` in ``tokenizer``; ``ValueError`` if it was never added (see :func:`add_sink_token`)."""
    if sink_token not in tokenizer.get_vocab():
        raise ValueError(
            f"The tokenizer has no {sink_token!r} token. Load the tokenizer saved with the fine-tuned adapter, or call "
            f"hf_sinks.training.add_sink_token(tokenizer) before building the recipe."
        )
    return int(tokenizer.convert_tokens_to_ids(sink_token))


__all__ = ["DEFAULT_SINK_TOKEN", "add_sink_token", "prepend_sink_token", "resize_for_sink_token", "sink_token_id_of"]
