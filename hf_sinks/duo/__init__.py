"""DuoAttention (Xiao et al., ICLR 2025): retrieval heads keep the full KV cache, streaming heads only sinks + window.

Every (layer, KV head) is either a **retrieval head** (full KV, grows with the text) or a **streaming head**
(``num_sink_tokens`` first tokens + the ``window_length`` most recent, bounded). Which is which is a
:class:`HeadPattern`, identified by optimisation (:func:`identify_heads`, DuoAttention §3.2) or by a heuristic
(:func:`attention_mass_scores`, :func:`passkey_retrieval_scores`). GQA groups stay together: the pattern is per
*KV* head.

Semantics (what the tests check against a per-head full-sequence reference):

* **Visibility.** A retrieval head's query ``i`` sees every key ``j <= i``; a streaming head's query ``i`` sees key
  ``j`` iff ``j <= i`` and (``j < S`` or ``i - j < W``) (docs/design.md §2.1 per head). It holds for decoding and for
  every query of a multi-token chunk (chunked prefill of a prompt longer than ``S + W``).
* **Positions: the model's absolute positions, for every head (DuoAttention's setting: long-context models used
  within their trained context).** The cache reports every token seen through ``get_seq_length``, so the model
  rotates token ``t`` at position ``t`` as it would with a ``DynamicCache``; streaming heads keep their keys rotated
  at their *original* positions and are never re-rotated (unlike :class:`~hf_sinks.SinkCache`'s cache-relative
  positions). Query-key distances are the true ones; past the model's trained context RoPE extrapolates, so use
  a SinkCache for unbounded streams.
* **Memory.** Retrieval and streaming heads live in separate tensors per layer: ``[B, R, n, D]`` for the ``R``
  retrieval heads and ``[B, KVH - R, min(n, S + W), D]`` for the streaming ones, so after ``n`` tokens the cache
  holds ``(1 - f) * n + f * (S + W)`` token slots per KV head on average (``f`` = streaming fraction).

The cache needs ``attn_implementation="duo_sdpa"`` (call :func:`register`): a stock attention cannot attend heads
over keys of different lengths. Without a ``DuoCache`` ``duo_sdpa`` is stock SDPA. ::

    hf_sinks.duo.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="duo_sdpa")
    pattern = HeadPattern.load("pattern.safetensors")          # or identify_heads(model, tokenizer=tok)
    cache = DuoCache(pattern, num_sink_tokens=64, window_length=256)
    model.generate(**inputs, cache=cache, max_new_tokens=200)  # past_key_values=cache before transformers 5.24

Modules: ``pattern`` (HeadPattern), ``cache`` (DuoCache), ``attention`` (``duo_sdpa``, ``duo_gate``, :func:`register`),
``identify`` (:func:`identify_heads`, :func:`attention_mass_scores`, :func:`passkey_retrieval_scores`), ``eval``
(passkey retrieval, the head-pattern plot). The command ``hf-sinks duo {identify,score,bench,passkey}`` (also under
``accelerate launch -m hf_sinks.cli duo identify``) lives in the CLI package, which this package never imports.
"""

from .attention import (
    DUO_GATE_ATTENTION,
    duo_gate_attention_forward,
    duo_sdpa_attention_forward,
    gated_attention,
    register,
)
from .cache import DUO_ATTENTION, DuoCache, DuoCacheLayer, visibility_mask
from .identify import (
    IdentificationResult,
    PasskeyExample,
    attention_mass_scores,
    identify_heads,
    make_passkey_example,
    passkey_retrieval_scores,
)
from .pattern import HeadPattern

__all__ = [
    "DUO_ATTENTION",
    "DUO_GATE_ATTENTION",
    "DuoCache",
    "DuoCacheLayer",
    "HeadPattern",
    "IdentificationResult",
    "PasskeyExample",
    "attention_mass_scores",
    "duo_gate_attention_forward",
    "duo_sdpa_attention_forward",
    "gated_attention",
    "identify_heads",
    "make_passkey_example",
    "passkey_retrieval_scores",
    "register",
    "visibility_mask",
]
