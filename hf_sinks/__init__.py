"""hf_sinks: attention sinks (StreamingLLM) for HuggingFace Transformers.

``import hf_sinks`` registers the ``sink_sdpa``, ``sink_eager``, ``sink_flex`` and ``sink_triton`` attention
implementations.
"""

from .api import SinkHandle, apply
from .attention import register
from .auto import AutoModelForCausalLM
from .cache import SinkCache
from .config import SinkConfig
from .models import MODEL_SPECS
from .rope import RotaryParams

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLM", "MODEL_SPECS", "RotaryParams", "SinkCache", "SinkConfig", "SinkHandle", "__version__", "apply", "register"]

register()
