"""Sink attention: the fp64 reference (the spec), the registered functions and their mask functions.

``sink_triton`` (hf_sinks.attention.triton) imports triton lazily, on its first call with a SinkCache.
"""

from .functions import sink_eager_attention_forward, sink_flex_attention_forward, sink_sdpa_attention_forward
from .reference import reference_sink_attention, visible_indices
from .registry import ATTENTION_IMPLEMENTATIONS, register
from .triton import sink_triton_attention_forward

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "reference_sink_attention",
    "register",
    "sink_eager_attention_forward",
    "sink_flex_attention_forward",
    "sink_sdpa_attention_forward",
    "sink_triton_attention_forward",
    "visible_indices",
]
