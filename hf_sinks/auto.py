"""``hf_sinks.AutoModelForCausalLM``: load + :func:`hf_sinks.apply` in one call (attention_sinks' entry point)."""

from __future__ import annotations

from typing import Any

import transformers

from .api import apply


class AutoModelForCausalLM:
    """Load any supported causal LM streaming with attention sinks.

    ``from attention_sinks import AutoModelForCausalLM`` users change only the import::

        from hf_sinks import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, attention_sink_size=4, attention_sink_window_size=1020)
        model.generate(**inputs, max_new_tokens=100_000)   # streams with a SinkCache it creates

    Sizes: ``num_sink_tokens``/``window_length`` (or attention_sinks' ``attention_sink_size``/
    ``attention_sink_window_size``), else ``config.attention_sinks`` saved with the model, else 4 + 1020. Other
    arguments go to ``transformers.AutoModelForCausalLM.from_pretrained``. The result is a plain transformers model;
    ``model._hf_sinks_handle.remove()`` turns streaming off.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        raise TypeError("Use hf_sinks.AutoModelForCausalLM.from_pretrained(...) or .from_config(...).")

    @staticmethod
    def _sizes(kwargs: dict[str, Any]) -> dict[str, Any]:
        sizes = {
            "num_sink_tokens": kwargs.pop("num_sink_tokens", kwargs.pop("attention_sink_size", None)),
            "window_length": kwargs.pop("window_length", kwargs.pop("attention_sink_window_size", None)),
            "attn_implementation": kwargs.pop("sink_attn_implementation", "sink_sdpa"),
        }
        return sizes

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        sizes = cls._sizes(kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        apply(model, **sizes)
        return model

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any):
        sizes = cls._sizes(kwargs)
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        apply(model, **sizes)
        return model
