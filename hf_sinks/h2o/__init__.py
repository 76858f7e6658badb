"""H2O (Zhang et al. 2023): `H2OCache`, attention sinks + a recent window + heavy hitters, per layer and KV head.

Semantics (the contract the tests check against a naive full-attention-matrix reference):

* Budget ``C = num_sink_tokens + window_length + heavy_budget`` (``S + W + H``): every query sees at most ``C``
  keys, itself included. Query ``t`` (absolute 0-based index) sees the tokens its KV head still holds plus itself.
* Every token a KV head holds accumulates a **score**: the attention probability it receives from every query that
  sees it (its own query included), summed over the query heads of the KV head's GQA group and over steps.
* After query ``t`` has attended, when the head holds ``C`` tokens (``t`` included) it evicts one so the next query
  fits: never a sink (``j < S``) nor a token inside the next query's window (``(t + 1) - j < W``); among the others
  (the ``H`` heavy hitters plus the token that just left the window) the one with the **lowest score** goes, the
  **oldest** on ties. Evicted tokens never come back. Each KV head (and batch row) evicts independently, so heads
  keep different tokens; they always hold the same *number* of tokens.
* ``heavy_budget=0`` is exactly the visibility rule of docs/design.md §2.1: query ``t`` sees ``j <= t`` with
  ``j < S`` or ``t - j < W``.
* **Positions.** Keys are always *stored* as the model rotated them, at their original absolute positions (the
  cache reports every token seen through ``get_seq_length``, so the model assigns positions as without eviction).
  ``H2OCache(positions=...)`` chooses what attention sees:

  - ``"original"`` (default; H2O's own scheme): nothing is re-rotated. A kept token keeps the position it had in the
    text and query ``t`` is at position ``t``: true distances to every kept token, so sinks and heavy hitters drift
    thousands of positions away from the query on a long stream (on SmolLM2 this costs perplexity after ~4k tokens,
    see docs/benchmarks/h2o_smollm2_12k).
  - ``"cache"`` (StreamingLLM-style, like SinkCache): the query that sees ``m`` keys sits at ``m - 1`` and those keys
    at ``0..m-1`` in text order, so the window keeps its true distances and sinks + heavy hitters sit just before it.
    With ``heavy_budget=0`` they are those of docs/design.md §2.2. Each attention rotates the held keys from
    their stored originals (angles in fp64: no drift; O(C) per step and KV head).

The scores need the attention probabilities, which no fused kernel returns: use the registered ``h2o_sdpa``
attention (:func:`register`, in ``attention``). It processes a multi-token chunk (prompt, chunked streaming) in
blocks of queries and, inside a block, query by query for the softmax and eviction (the logits and ``P @ V`` are
batched), so a chunk gives
*exactly* what token-by-token decoding gives, with memory bounded by ``heads x block x (C + block)``.

::

    hf_sinks.h2o.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="h2o_sdpa")
    cache = H2OCache(num_sink_tokens=4, window_length=128, heavy_budget=124)
    model.generate(**inputs, cache=cache, max_new_tokens=2000)  # past_key_values=cache before transformers 5.24

Modules: ``cache`` (:class:`H2OCache`, :class:`H2OCacheLayer`), ``attention`` (``h2o_sdpa``, :func:`register`).
Streaming perplexity with an H2OCache: :func:`hf_sinks.eval.streaming_perplexity`.
"""

from .attention import h2o_sdpa_attention_forward, register
from .cache import H2O_ATTENTION, POSITION_MODES, H2OCache, H2OCacheLayer

__all__ = [
    "H2OCache",
    "H2OCacheLayer",
    "H2O_ATTENTION",
    "POSITION_MODES",
    "h2o_sdpa_attention_forward",
    "register",
]
