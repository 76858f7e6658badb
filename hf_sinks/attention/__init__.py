"""Sink attention: the fp64 reference (the spec), the registered functions and their mask functions.

``sink_triton`` (hf_sinks.attention.triton) imports triton lazily, on its first call with a SinkCache.
``sink_s2attn`` / ``sink_sfattn`` (hf_sinks.attention.shifted_sparse) are the training-time S²-Attn / SF-Attn.
"""

from .functions import sink_eager_attention_forward, sink_flex_attention_forward, sink_sdpa_attention_forward
from .reference import reference_shifted_sparse_attention, reference_sink_attention, visible_indices
from .registry import ATTENTION_IMPLEMENTATIONS, register
from .shifted_sparse import shifted_sparse_attention, sink_s2attn_attention_forward, sink_sfattn_attention_forward
from .switch import routed_through_interface, use_attention
from .triton import sink_triton_attention_forward

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "reference_shifted_sparse_attention",
    "routed_through_interface",
    "reference_sink_attention",
    "register",
    "shifted_sparse_attention",
    "sink_eager_attention_forward",
    "sink_flex_attention_forward",
    "sink_s2attn_attention_forward",
    "sink_sdpa_attention_forward",
    "sink_sfattn_attention_forward",
    "sink_triton_attention_forward",
    "use_attention",
    "visible_indices",
]
