"""The mask transformers hands an attention function, built through the registered sink mask function."""

import torch

from hf_sinks.attention.masks import sink_sdpa_mask


def sink_mask(padding: torch.Tensor, q: int, mask_function=sink_sdpa_mask):
    """What ``create_causal_mask`` returns for ``q`` new tokens whose 2D padding mask (seen + q columns) is given."""
    batch, length = padding.shape
    return mask_function(
        batch_size=batch, q_length=q, kv_length=length, q_offset=length - q, kv_offset=0,
        attention_mask=padding.bool(), dtype=torch.float32, device=padding.device,
    )
