"""Per-layer rules (docs/design.md §2.3): what each attention layer of a streaming model sees and keeps.

Written once, used by the cache (how many slots a layer keeps), the ``sink_*`` functions (visibility and sink
shifts) and the fp64 spec forward (:func:`hf_sinks.oracle.reference_logits`).

* A **global** layer follows the sink + window rule of §2.1 with the cache's ``S`` and ``W``.
* A layer with **its own sliding window** ``sw`` never sees farther back than ``sw``: if ``sw <= S + W`` it attends
  exactly as it does natively (``S = 0``, ``W = sw``: its window, true distances, no sinks) and keeps only that
  window; if ``sw > S + W`` it follows the sink + window rule like a global layer.
* Each layer shifts its sinks with its own rotary parameters (``None``: a layer without RoPE, nothing to shift).
"""

from __future__ import annotations

from dataclasses import dataclass

from .rope import RotaryParams

SLIDING = "sliding_attention"


@dataclass(frozen=True)
class LayerRule:
    """What one layer sees: visibility ``j <= i and (j < num_sink_tokens or i - j < window_length)``
    (:func:`hf_sinks.visibility.sink_visible` with this rule's sizes)."""

    num_sink_tokens: int
    window_length: int
    rotary: RotaryParams | None  # None: the layer has no RoPE
    sliding_window: int | None = None  # the layer's own window, when it has one

    @property
    def capacity(self) -> int:
        return self.num_sink_tokens + self.window_length

    @property
    def native(self) -> bool:
        """The layer attends exactly as it does natively (its own window fits in the cache)."""
        return (
            self.sliding_window is not None and self.num_sink_tokens == 0 and self.window_length == self.sliding_window
        )

    def same_as(self, other: "LayerRule") -> bool:
        same_rotary = (self.rotary is None and other.rotary is None) or (
            self.rotary is not None and self.rotary.matches(other.rotary)
        )
        return (self.num_sink_tokens, self.window_length) == (
            other.num_sink_tokens,
            other.window_length,
        ) and same_rotary


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The layer's own sliding window from its config: ``config.sliding_window`` on layers whose
    ``config.layer_types[i]`` is ``"sliding_attention"``, or on every layer when the config has no ``layer_types``
    (Mistral, Mixtral, Phi-3, Starcoder2). ``None``: a global layer."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return int(window) if layer_types[layer_idx] == SLIDING else None
    return int(window)


def rule_for(
    num_sink_tokens: int, window_length: int, rotary: RotaryParams | None, sliding_window: int | None
) -> LayerRule:
    """The rule of a layer with ``sliding_window`` (``None``: global) under a cache of ``S + W`` (§2.3)."""
    if sliding_window is not None and sliding_window <= num_sink_tokens + window_length:
        return LayerRule(0, int(sliding_window), rotary, int(sliding_window))
    return LayerRule(num_sink_tokens, window_length, rotary, sliding_window)


def layer_rules(config, num_sink_tokens: int, window_length: int, rotaries: list | None = None) -> list[LayerRule]:
    """Every layer's rule from a model config (``rotaries``: :func:`hf_sinks.rope.layer_rotaries`, or recomputed)."""
    from .rope import layer_rotaries

    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    rotaries = layer_rotaries(config) if rotaries is None else rotaries
    return [
        rule_for(num_sink_tokens, window_length, rotaries[i], layer_sliding_window(config, i))
        for i in range(config.num_hidden_layers)
    ]


__all__ = ["LayerRule", "layer_rules", "layer_sliding_window", "rule_for"]
