"""`SinkConfig`: the validated description of how a model streams (docs/design.md §2.1, §2.2)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .validation import SinkTypeError, check_cache_size, check_choice, check_int

#: Attribute of a transformers ``PretrainedConfig`` under which a streaming setup is recorded.
CONFIG_ATTRIBUTE = "attention_sinks"

POSITION_MODES = ("cache",)


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
        check_int("num_sink_tokens", self.num_sink_tokens, 0)
        check_int("window_length", self.window_length, 1)
        check_cache_size("SinkConfig", num_sink_tokens=self.num_sink_tokens, window_length=self.window_length)
        check_choice("position_mode", self.position_mode, POSITION_MODES)

    @property
    def capacity(self) -> int:
        """Most tokens a layer ever holds: ``num_sink_tokens + window_length``."""
        return self.num_sink_tokens + self.window_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "SinkConfig":
        """Build from a dict (e.g. ``config.attention_sinks``); unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise SinkTypeError(
                f"SinkConfig.from_dict needs a dict like {{'num_sink_tokens': 4, 'window_length': 1020}}, got "
                f"{data!r} ({type(data).__name__})."
            )
        merged = {**data, **overrides}
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
        """Read a file written by :meth:`to_json_file`; errors name the file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SinkConfig file {str(path)!r} does not exist (or is not a file).")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"SinkConfig file {str(path)!r} is not valid JSON: {e}.") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise type(e)(f"SinkConfig file {str(path)!r}: {e}") from None

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> "SinkConfig | None":
        """Read ``config.attention_sinks`` (a dict, a ``SinkConfig`` or the JSON text of a dict); ``None`` if the
        flag is absent and no overrides. Anything else raises naming the value."""
        recorded = getattr(config, CONFIG_ATTRIBUTE, None)
        if recorded is None and not overrides:
            return None
        if isinstance(recorded, SinkConfig):
            recorded = recorded.to_dict()
        elif isinstance(recorded, str):
            try:
                recorded = json.loads(recorded)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"config.{CONFIG_ATTRIBUTE}={_short(recorded)} is not valid JSON ({e}); set it to a dict like "
                    f"{{'num_sink_tokens': 4, 'window_length': 1020}} (or delete it for the defaults)."
                ) from None
        if recorded is not None and not isinstance(recorded, dict):
            raise SinkTypeError(
                f"config.{CONFIG_ATTRIBUTE}={_short(recorded)} is invalid: must be a dict like "
                f"{{'num_sink_tokens': 4, 'window_length': 1020}}, not {type(recorded).__name__} (or delete it for "
                f"the defaults)."
            )
        if overrides:
            cls.from_dict({}, **overrides)  # a bad override is named as the argument, not as the config's
        try:
            return cls.from_dict(recorded or {}, **overrides)
        except ValueError as e:
            raise type(e)(f"config.{CONFIG_ATTRIBUTE}: {e}") from None

    @classmethod
    def for_model(
        cls, config: Any, num_sink_tokens: int | None = None, window_length: int | None = None
    ) -> "SinkConfig":
        """The sizes to stream a model with: ``config.attention_sinks`` (or the defaults), the sizes given here
        (not ``None``) overriding it. What ``apply``, ``SinkCache.from_model`` and ``StaticSinkCache.from_model``
        use."""
        overrides = {
            k: v for k, v in (("num_sink_tokens", num_sink_tokens), ("window_length", window_length)) if v is not None
        }
        return cls.from_model_config(config, **overrides) or cls()


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
