"""Registration of the ``sink_*`` attention implementations into transformers (both registries, same name)."""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface

from .functions import sink_eager_attention_forward, sink_flex_attention_forward, sink_sdpa_attention_forward
from .masks import sink_eager_mask, sink_flex_mask, sink_sdpa_mask
from .shifted_sparse import sink_s2attn_attention_forward, sink_sfattn_attention_forward
from .triton import sink_triton_attention_forward

#: ``attn_implementation`` name -> (attention function, mask function). Without the mask registration transformers
#: would hand the function no mask at all (docs/design.md §5.4).
ATTENTION_IMPLEMENTATIONS = {
    "sink_sdpa": (sink_sdpa_attention_forward, sink_sdpa_mask),
    "sink_eager": (sink_eager_attention_forward, sink_eager_mask),
    "sink_flex": (sink_flex_attention_forward, sink_flex_mask),
    "sink_triton": (sink_triton_attention_forward, sink_sdpa_mask),
    # training-time S²-Attn / SF-Attn: they read only the padding mask (visibility depends on the head) and hand
    # the stock sdpa mask to the stock path in eval, to sink_sdpa with a SinkCache
    "sink_s2attn": (sink_s2attn_attention_forward, sink_sdpa_mask),
    "sink_sfattn": (sink_sfattn_attention_forward, sink_sdpa_mask),
}


def register() -> None:
    """Register every ``sink_*`` name with transformers. Idempotent; run on ``import hf_sinks``."""
    for name, (attention, mask) in ATTENTION_IMPLEMENTATIONS.items():
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
    from ..patches import falcon  # Falcon picks attention classes by name: make the same names load there

    falcon.register(ATTENTION_IMPLEMENTATIONS)
