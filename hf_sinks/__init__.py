"""hf_sinks: attention sinks (StreamingLLM) for HuggingFace Transformers.

``import hf_sinks`` registers every attention implementation it provides (both AttentionInterface and
AttentionMaskInterface, idempotently): ``sink_sdpa``, ``sink_eager``, ``sink_flex``, ``sink_triton`` (streaming),
``sink_s2attn``, ``sink_sfattn`` (training), ``h2o_sdpa`` (:class:`H2OCache`), ``duo_sdpa`` and ``duo_gate``
(:mod:`hf_sinks.duo`). Fine-tuning lives in :mod:`hf_sinks.training`, evaluation in :mod:`hf_sinks.eval`; both are
imported on demand (``hf_sinks.lora_recipe`` / ``hf_sinks.finetune`` load them lazily).
"""

from typing import Any

from .analysis import SinkAnalysis, analyze
from .api import SinkHandle, apply
from .attention import register as _register_sink_attentions
from .auto import AutoModelForCausalLM
from .cache import SinkCache
from .config import SinkConfig
from .custom_generate import custom_generate_path
from .duo import DuoCache, HeadPattern
from .duo import register as _register_duo
from .h2o import H2OCache
from .h2o import register as _register_h2o
from .models import MODEL_SPECS
from .rope import RotaryParams
from .static_cache import StaticSinkCache

__version__ = "0.1.0"

#: Names re-exported lazily from :mod:`hf_sinks.training` (importing it pulls in peft when a recipe is built).
_TRAINING_EXPORTS = ("SinkRecipe", "finetune", "load_finetuned", "lora_recipe", "prepend_sink_token")


def register() -> None:
    """Register every attention implementation of hf_sinks with transformers. Idempotent; run on import."""
    _register_sink_attentions()
    _register_h2o()
    _register_duo()


def __getattr__(name: str) -> Any:
    if name in _TRAINING_EXPORTS:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'hf_sinks' has no attribute {name!r}")


__all__ = [
    "AutoModelForCausalLM",
    "DuoCache",
    "H2OCache",
    "HeadPattern",
    "MODEL_SPECS",
    "RotaryParams",
    "SinkAnalysis",
    "SinkCache",
    "SinkConfig",
    "SinkHandle",
    "StaticSinkCache",
    "__version__",
    "analyze",
    "apply",
    "custom_generate_path",
    "register",
    *_TRAINING_EXPORTS,
]

register()
