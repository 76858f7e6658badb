"""Evaluation: streaming perplexity (dense / window / sink / recompute), decode benchmarks, the default text.

``hf_sinks.eval`` is imported explicitly (``import hf_sinks`` does not load it); plotting needs ``matplotlib``.
"""

from .data import default_text_path, load_token_ids, read_text
from .memory import MemoryMeter, cache_bytes
from .perplexity import MODES, StreamingResult, streaming_perplexity

__all__ = [
    "MODES",
    "MemoryMeter",
    "StreamingResult",
    "cache_bytes",
    "default_text_path",
    "load_token_ids",
    "read_text",
    "streaming_perplexity",
]
