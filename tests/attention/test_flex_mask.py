"""``sink_flex``'s mask: transformers' ``flex_attention_mask`` exactly, without torch's deprecated ``_compile`` flag."""

import warnings

import pytest
import torch
from transformers import masking_utils

from hf_sinks import compat
from hf_sinks.attention.masks import sink_flex_mask


def _deprecations(records):
    # torch's Inductor imports torch.utils.mkldnn (deprecated `torch.jit.script_method`) on its first CPU compile:
    # torch's own module, nothing a caller can avoid
    return [
        f"{r.filename}:{r.lineno}: {r.message}"
        for r in records
        if issubclass(r.category, (DeprecationWarning, FutureWarning)) and "torch/jit/" not in r.filename
    ]


def test_sink_flex_mask_is_transformers_mask_and_warns_nothing():
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10]).bool()
    kwargs = dict(batch_size=2, q_length=10, kv_length=10, attention_mask=padding)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        ours = sink_flex_mask(**kwargs)
    assert _deprecations(records) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the reference itself may pass the deprecated flag
        reference = masking_utils.flex_attention_mask(**kwargs)
    assert type(ours) is type(reference) and ours.shape == reference.shape
    assert torch.equal(ours.to_dense(), reference.to_dense())


# ---------------------------------------------------------------------------- the feature checks, on stand-ins
def _flag_passed(mask_mod, B, H, Q_LEN, KV_LEN, device):
    return masking_utils.create_block_mask(mask_mod=mask_mod, B=B, H=H, Q_LEN=Q_LEN, KV_LEN=KV_LEN, _compile=True)


def _flag_not_passed(mask_mod, B, H, Q_LEN, KV_LEN, device):
    return masking_utils.create_block_mask(mask_mod=mask_mod, B=B, H=H, Q_LEN=Q_LEN, KV_LEN=KV_LEN, device=device)


def test_passes_keyword_reads_the_call_not_the_signature():
    assert compat._passes_keyword(_flag_passed, "_compile")
    assert not compat._passes_keyword(_flag_not_passed, "_compile")


def _torch_2_5(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False):
    """The flag is the way to compile (no warning)."""


def _deprecating(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False):
    if _compile:
        warnings.warn("use torch.compile(create_block_mask)", DeprecationWarning, stacklevel=2)


def _flag_removed(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128):
    """A torch without the flag."""


@pytest.mark.parametrize(
    "stand_in,deprecated", [(_torch_2_5, False), (_deprecating, True), (_flag_removed, True)], ids=lambda x: str(x)
)
def test_compile_flag_deprecation_is_read_from_create_block_mask(monkeypatch, stand_in, deprecated):
    from torch.nn.attention import flex_attention

    monkeypatch.setattr(flex_attention, "create_block_mask", stand_in)
    assert compat.create_block_mask_deprecates_compile_flag() is deprecated


def test_flex_attention_mask_is_transformers_own_where_no_flag_is_deprecated(monkeypatch):
    """Where torch still wants the flag (2.5) or transformers stops passing it, transformers' builder is called."""
    calls = []
    monkeypatch.setattr(masking_utils, "flex_attention_mask", lambda *args, **kwargs: calls.append(args) or "stock")
    monkeypatch.setattr(compat, "_flex_mask_avoids_compile_flag", lambda: False)
    assert compat.flex_attention_mask(batch_size=1, q_length=2, kv_length=2) == "stock" and len(calls) == 1
