"""Shared test helpers: tiny random models from configs (no downloads), token ids, padded batches, sink masks.

Imported by the tests as ``from helpers import ...`` (tests/conftest.py puts tests/ on the path and sets the
environment up first: one torch thread, ``TRITON_INTERPRET`` without CUDA). Fixtures live in conftest.py.
"""

import torch

import hf_sinks
from hf_sinks.attention.masks import sink_sdpa_mask

VOCAB = 96


def tiny_config(arch: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, **extra):
    """A tiny random config of ``arch``: llama, mistral, gpt_neox, falcon (multi-query), falcon_new, falcon_mha."""
    from transformers import FalconConfig, GPTNeoXConfig, LlamaConfig, MistralConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=2 * heads * head_dim,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    common.update(extra)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        common.setdefault("sliding_window", None)
        return MistralConfig(**common)
    if arch == "gpt_neox":  # no GQA; rotates only rotary_pct of each head
        common.pop("num_key_value_heads")
        common.setdefault("rotary_pct", 0.5)
        return GPTNeoXConfig(**common)
    if arch.startswith("falcon"):
        kv_heads = common.pop("num_key_value_heads")
        common.pop("intermediate_size")
        variant = {
            "falcon": {},
            "falcon_new": {"new_decoder_architecture": True, "num_kv_heads": kv_heads},
            "falcon_mha": {"multi_query": False, "parallel_attn": False},
        }[arch]
        return FalconConfig(**common, **variant)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", attn_implementation: str = "sink_sdpa", seed: int = 0, **kwargs):
    """A tiny random model using ``attn_implementation``; Falcon gets sink attentions through ``hf_sinks.apply``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **kwargs)
    if arch.startswith("falcon"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa" if "sink" in attn_implementation else attn_implementation
        )
        if "sink" in attn_implementation:
            hf_sinks.apply(model, attn_implementation=attn_implementation)
        return model.eval()
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Token ids that never collide with the pad id 0 (generate treats pad ids in the prompt as padding)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=gen)


# ------------------------------------------------------------------------------ padded batches (api, compat)
def padded_batch(lengths, seed=20):
    """Left-padded rows of the given lengths: ``(rows, ids [B, max], attention_mask)``."""
    rows = [random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return rows, ids, mask


def assert_rows_match_spec(model, rows, out, width, sinks, window):
    """Each generated row's logits equal the fp64 spec model's over that row alone (its padding removed)."""
    from hf_sinks.oracle import reference_logits

    logits = torch.stack(out.logits, dim=1)
    for i, row in enumerate(rows):
        seq = torch.cat([row, out.sequences[i, width:]])
        spec = reference_logits(model, seq[:-1], sinks, window)[len(row) - 1 :]
        torch.testing.assert_close(logits[i], spec, atol=1e-4, rtol=0, msg=f"row {i}")


# ------------------------------------------------------------------------------------ masks (attention, kernels)
def sink_mask(padding: torch.Tensor, q: int, mask_function=sink_sdpa_mask):
    """What ``create_causal_mask`` returns for ``q`` new tokens whose 2D padding mask (seen + q columns) is given."""
    batch, length = padding.shape
    return mask_function(
        batch_size=batch,
        q_length=q,
        kv_length=length,
        q_offset=length - q,
        kv_offset=0,
        attention_mask=padding.bool(),
        dtype=torch.float32,
        device=padding.device,
    )


# ------------------------------------------------------------------------------------------------ CLI models
CLI_WORDS = (
    "the king is dead long live the king and the queen of the north is here to see the prince "
    "who would be king if the old man in the tower had not lost the crown to a fool at sea "
).split()


def write_word_text(path, words: int = 600):
    """``words`` random words of :data:`CLI_WORDS` (seeded), 12 per line, written to ``path``; returns ``path``."""
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(CLI_WORDS), (words,), generator=gen).tolist()
    lines = [" ".join(CLI_WORDS[i] for i in picks[k : k + 12]) for k in range(0, len(picks), 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_word_model(path, text: str, arch: str = "llama", layers: int = 2):
    """A tiny random model plus a word-level tokenizer trained on ``text`` (vocab < the model's), saved to ``path``
    like any local HF model directory; returns ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tiny_model(arch, layers=layers).save_pretrained(path)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [text], trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<unk>", "<eos>"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(path)
    return path


def add_chat_template(source, path):
    """A copy of the model directory ``source`` at ``path`` whose tokenizer has a small chat template."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tok.save_pretrained(path)
    return path


def passkey_bpe_tokenizer():
    """A byte-level BPE tokenizer (vocab 320) trained offline on the passkey and head-identification texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_sinks.duo.identify import FILLER as IDENTIFY_FILLER
    from hf_sinks.eval.passkey import FILLER, INSTRUCTION, NEEDLE, QUESTION

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([INSTRUCTION, FILLER * 3, NEEDLE.format(key="12345"), QUESTION, IDENTIFY_FILLER], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def read_csv(path):
    """A CSV file's rows as dicts."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def greedy(model, ids, new_tokens: int, **kwargs):
    """``generate`` exactly ``new_tokens`` greedy tokens, returning the logits of every step."""
    return model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
