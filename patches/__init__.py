"""Per-model patches, one module per ``model_type``, for models that bypass transformers' AttentionInterface.

Installed as ``hf_sinks.patches``. Llama and Mistral need none (they route through the interface).
"""
