"""`SinkConfig`: the validated description of how a model streams (docs/design.md §2.1, §2.2)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: Attribute of a transformers ``PretrainedConfig`` under which a streaming setup is recorded.
CONFIG_ATTRIBUTE = "attention_sinks"

POSITION_MODES = ("cache",)


def _check_int(name: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; `num_sink_tokens=True` is a bug, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")


@dataclass
class SinkConfig:
    """How a causal LM streams with attention sinks (StreamingLLM).

    Query token ``i`` sees key ``j`` iff ``j <= i`` and (``j < num_sink_tokens`` or ``i - j < window_length``);
    positions are assigned inside that visible set (sinks at ``0..S-1``, the window right after them).

    Args:
        num_sink_tokens: the first ``S`` tokens of every sequence that stay visible forever. ``0`` gives plain
            window attention (the StreamingLLM paper's failing baseline).
        window_length: the ``W`` most recent tokens a query sees, itself included. Capacity is ``S + W``.
        position_mode: ``"cache"`` (the paper's cache-relative positions; the only mode so far).
    """

    num_sink_tokens: int = field(default=4, metadata={"help": "Initial tokens kept forever (S >= 0)."})
    window_length: int = field(default=1020, metadata={"help": "Most recent tokens kept, query included (W >= 1)."})
    position_mode: str = field(default="cache", metadata={"help": f"One of {POSITION_MODES}."})

    def __post_init__(self) -> None:
        _check_int("num_sink_tokens", self.num_sink_tokens, 0)
        _check_int("window_length", self.window_length, 1)
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"`position_mode` must be one of {POSITION_MODES}, got {self.position_mode!r}.")

    @property
    def capacity(self) -> int:
        """Most tokens a layer ever holds: ``num_sink_tokens + window_length``."""
        return self.num_sink_tokens + self.window_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "SinkConfig":
        """Build from a dict (e.g. ``config.attention_sinks``); unknown keys raise ``ValueError``."""
        merged = {**dict(data), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"Unknown SinkConfig key(s) {unknown}; allowed keys are {sorted(known)}.")
        return cls(**merged)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SinkConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> "SinkConfig | None":
        """Read ``config.attention_sinks`` (a dict or ``SinkConfig``); ``None`` if the flag is absent and no overrides."""
        recorded = getattr(config, CONFIG_ATTRIBUTE, None)
        if recorded is None and not overrides:
            return None
        if isinstance(recorded, SinkConfig):
            recorded = recorded.to_dict()
        return cls.from_dict(recorded or {}, **overrides)
