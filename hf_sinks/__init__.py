"""hf_sinks: attention sinks (StreamingLLM) for HuggingFace Transformers.

``import hf_sinks`` registers every attention implementation it provides (both AttentionInterface and
AttentionMaskInterface, idempotently): ``sink_sdpa``, ``sink_eager``, ``sink_flex``, ``sink_triton`` (streaming),
``sink_s2attn``, ``sink_sfattn`` (training), ``h2o_sdpa`` (:class:`H2OCache`), ``duo_sdpa`` and ``duo_gate``
(:mod:`hf_sinks.duo`). The import itself is cheap: the public names load on first use, and the registration runs
as soon as transformers' modeling code is imported, before any model exists (:mod:`hf_sinks.registration`).
Fine-tuning lives in :mod:`hf_sinks.training`, evaluation in :mod:`hf_sinks.eval`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registration import pending as _pending
from .registration import register_now_or_on_import as _register_now_or_on_import
from .source_tree import mount as _mount_source_tree

__version__ = "0.1.0"

_mount_source_tree(__name__, Path(__file__).parent)  # kernels/ and patches/ when running from a source checkout

#: Public name -> the submodule that defines it (loaded on first access, PEP 562).
_EXPORTS: dict[str, str] = {
    "AutoModelForCausalLM": "auto",
    "DuoCache": "duo",
    "H2OCache": "h2o",
    "HeadPattern": "duo",
    "MODEL_SPECS": "models",
    "RotaryParams": "rope",
    "SinkAnalysis": "analysis",
    "SinkCache": "cache",
    "SinkConfig": "config",
    "SinkHandle": "api",
    "StaticSinkCache": "static_cache",
    "analyze": "analysis",
    "apply": "api",
    "custom_generate_path": "custom_generate",
    # training (pulls in peft when a recipe is built)
    "SinkRecipe": "training",
    "finetune": "training",
    "load_finetuned": "training",
    "lora_recipe": "training",
    "prepend_sink_token": "training",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .analysis import SinkAnalysis, analyze
    from .api import SinkHandle, apply
    from .auto import AutoModelForCausalLM
    from .cache import SinkCache
    from .config import SinkConfig
    from .custom_generate import custom_generate_path
    from .duo import DuoCache, HeadPattern
    from .h2o import H2OCache
    from .models import MODEL_SPECS
    from .rope import RotaryParams
    from .static_cache import StaticSinkCache
    from .training import SinkRecipe, finetune, load_finetuned, lora_recipe, prepend_sink_token


def register() -> None:
    """Register every attention implementation of hf_sinks with transformers. Idempotent; runs on its own after
    ``import hf_sinks`` once transformers' modeling code is imported."""
    from .attention import register as register_sink_attentions
    from .duo import register as register_duo
    from .h2o import register as register_h2o

    register_sink_attentions()
    register_h2o()
    register_duo()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_sinks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    finder = _pending(__name__)
    if finder is not None:  # a public name is in use: the registration must have run by now
        finder.fire(now=True)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
    "SinkRecipe",
    "StaticSinkCache",
    "__version__",
    "analyze",
    "apply",
    "custom_generate_path",
    "finetune",
    "load_finetuned",
    "lora_recipe",
    "prepend_sink_token",
    "register",
]

_register_now_or_on_import(__name__, register)
