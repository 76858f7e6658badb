"""Shared fixtures: tiny random models built from configs (no downloads), one thread (15x faster here)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Triton kernels (tests/kernels) run under the interpreter without CUDA. It must be on before anything imports triton:
# torch._dynamo does, and hf_sinks imports it. `TRITON_INTERPRET=0 pytest tests/kernels` is the GPU lane.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_sinks  # noqa: E402,F401  (registers the sink_* attention names)

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
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa" if "sink" in attn_implementation else attn_implementation)
        if "sink" in attn_implementation:
            hf_sinks.apply(model, attn_implementation=attn_implementation)
        return model.eval()
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Token ids that never collide with the pad id 0 (generate treats pad ids in the prompt as padding)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=gen)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
