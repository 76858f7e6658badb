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
        """Pop the streaming arguments from ``kwargs`` and check them before any weight is loaded."""
        from .attention.registry import ATTENTION_IMPLEMENTATIONS
        from .config import SinkConfig
        from .validation import check_choice

        sizes: dict[str, Any] = {}
        for name, alias in (
            ("num_sink_tokens", "attention_sink_size"),
            ("window_length", "attention_sink_window_size"),
        ):
            value, legacy = kwargs.pop(name, None), kwargs.pop(alias, None)
            if value is not None and legacy is not None and value != legacy:
                raise ValueError(f"{name}={value!r} and {alias}={legacy!r} disagree; pass only one of them.")
            sizes[name] = value if value is not None else legacy
        given = {k: v for k, v in sizes.items() if v is not None}
        if given:
            SinkConfig.from_dict({}, **given)
        sizes["attn_implementation"] = check_choice(
            "sink_attn_implementation",
            kwargs.pop("sink_attn_implementation", "sink_sdpa"),
            sorted(ATTENTION_IMPLEMENTATIONS),
        )
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
