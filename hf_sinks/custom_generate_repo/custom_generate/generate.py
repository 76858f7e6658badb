"""hf_sinks' drop-in for ``transformers-community/sink_cache``: attention sinks (StreamingLLM) through ``generate``.

transformers loads this file for ``model.generate(..., custom_generate=<this folder>, trust_remote_code=True)``
and calls ``generate(model, *args, **kwargs)``; the work is done by the installed hf_sinks (see the README).
"""

from hf_sinks.custom_generate import generate  # noqa: F401  (transformers looks up `generate` in this module)
