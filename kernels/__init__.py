"""Triton kernels (installed as ``hf_sinks.kernels``). No transformers imports here."""
