"""`HeadPattern`: which (layer, KV head) is a retrieval head; binarising scores; safetensors / JSON storage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..validation import check_number

#: Format tag written into saved patterns.
PATTERN_FORMAT = "hf_sinks.HeadPattern"


def _kv_shape(config: Any) -> tuple[int, int]:
    """``(num_hidden_layers, num_key_value_heads)`` of a transformers config (MHA models: KV heads = heads)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(layers), int(kv_heads)


# ------------------------------------------------------------------------------------------------- pattern
@dataclass
class HeadPattern:
    """Which (layer, KV head) is a retrieval head (full KV) and which a streaming head (sinks + window).

    Attributes:
        retrieval: ``[num_layers, num_key_value_heads]`` bool, ``True`` = retrieval head.
        scores: optional ``[num_layers, num_key_value_heads]`` float, higher = more retrieval-like (DuoAttention's
            gate ``alpha``, or a heuristic score); what :meth:`from_scores` binarised.
        metadata: JSON-serialisable extras (how the pattern was made: sizes, steps, source...).
    """

    retrieval: torch.Tensor
    scores: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.retrieval, torch.Tensor):
            self.retrieval = _table("retrieval", self.retrieval)
        retrieval = torch.as_tensor(self.retrieval)
        if retrieval.dim() != 2 or retrieval.numel() == 0:
            raise ValueError(
                f"HeadPattern.retrieval must be a non-empty [num_layers, num_key_value_heads] tensor, got shape "
                f"{tuple(retrieval.shape)}."
            )
        if retrieval.dtype != torch.bool:
            bad = ~((retrieval == 0) | (retrieval == 1))
            if retrieval.is_floating_point() or bool(bad.any()):
                where = ""
                if bool(bad.any()):
                    layer, head = (int(i) for i in bad.nonzero()[0])
                    where = f" (retrieval[{layer}, {head}] = {retrieval[layer, head].item()!r})"
                raise ValueError(
                    f"HeadPattern.retrieval must be boolean (or 0/1 integers), got dtype {retrieval.dtype}{where}; "
                    "use HeadPattern.from_scores to binarise scores."
                )
            retrieval = retrieval.bool()
        self.retrieval = retrieval.cpu()
        if self.scores is not None:
            if not isinstance(self.scores, torch.Tensor):
                self.scores = _table("scores", self.scores)
            scores = torch.as_tensor(self.scores, dtype=torch.float32).cpu()
            if scores.shape != self.retrieval.shape:
                raise ValueError(
                    f"HeadPattern.scores has shape {tuple(scores.shape)}, retrieval {tuple(self.retrieval.shape)}: "
                    "they must match."
                )
            _check_finite("HeadPattern.scores", scores)
            self.scores = scores
        if not isinstance(self.metadata, dict):
            raise ValueError(f"HeadPattern.metadata must be a dict, got {type(self.metadata).__name__}.")

    # ---------------------------------------------------------------------------- constructors
    @classmethod
    def from_scores(
        cls,
        scores: torch.Tensor,
        sparsity: float | None = None,
        threshold: float | None = None,
        metadata: dict | None = None,
    ) -> "HeadPattern":
        """Binarise per-(layer, KV head) scores (higher = retrieval), as DuoAttention's deployment does.

        Exactly one of:
            sparsity: fraction of heads made **streaming**, in ``[0, 1]``: the ``round(sparsity * n)`` lowest scores
                (ties: the earlier head in layer-major order).
            threshold: heads with ``score >= threshold`` are retrieval heads.
        """
        if (sparsity is None) == (threshold is None):
            raise ValueError(
                f"Give exactly one of sparsity= or threshold= (got sparsity={sparsity!r}, threshold={threshold!r})."
            )
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
        if scores.dim() != 2 or scores.numel() == 0:
            raise ValueError(
                f"scores must be a non-empty [num_layers, num_key_value_heads] tensor, got {tuple(scores.shape)}."
            )
        _check_finite("scores", scores)
        if sparsity is not None:
            check_number("sparsity", sparsity, 0, 1, hint="the fraction of streaming heads")
            flat = scores.flatten()
            k = round(sparsity * flat.numel())
            order = torch.argsort(flat, stable=True)
            retrieval = torch.ones_like(flat, dtype=torch.bool)
            retrieval[order[:k]] = False
            retrieval = retrieval.view_as(scores)
        else:
            check_number("threshold", threshold)
            retrieval = scores >= threshold
        meta = dict(metadata or {})
        meta.update({"sparsity": sparsity} if sparsity is not None else {"threshold": threshold})
        return cls(retrieval, scores, meta)

    @classmethod
    def from_duo_attention(
        cls, path: str | Path, sparsity: float | None = 0.5, threshold: float | None = None
    ) -> "HeadPattern":
        """Read a pattern of the DuoAttention repository: ``full_attention_heads.tsv`` (``num_layers`` rows of
        ``num_kv_heads`` tab-separated gates; ``path`` may be the file or its folder, whose ``config.json`` sink/recent
        sizes go into ``metadata``), binarised like :meth:`from_scores` (give ``sparsity=None`` with a threshold)."""
        path = Path(path)
        folder, tsv = (path, path / "full_attention_heads.tsv") if path.is_dir() else (path.parent, path)
        if not tsv.is_file():
            raise FileNotFoundError(f"DuoAttention pattern {str(tsv)!r} does not exist (full_attention_heads.tsv).")
        rows = [line.split() for line in tsv.read_text().splitlines() if line.strip()]
        try:
            scores = torch.tensor([[float(x) for x in row] for row in rows]).clamp(0, 1)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{str(tsv)!r} is not a rectangular table of numbers: {err}") from None
        metadata = {"source": str(tsv)}
        config = folder / "config.json"
        if config.is_file():
            extra = json.loads(config.read_text())
            metadata.update({k: extra[k] for k in ("sink_size", "recent_size") if k in extra})
        return cls.from_scores(scores, sparsity=sparsity, threshold=threshold, metadata=metadata)

    @classmethod
    def full(cls, config: Any) -> "HeadPattern":
        """Every head a retrieval head (a ``DuoCache`` with it behaves as a ``DynamicCache``)."""
        return cls(torch.ones(_kv_shape(config), dtype=torch.bool))

    @classmethod
    def streaming(cls, config: Any) -> "HeadPattern":
        """Every head a streaming head (sinks + window everywhere, at absolute positions)."""
        return cls(torch.zeros(_kv_shape(config), dtype=torch.bool))

    # ------------------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return self.retrieval.shape[0]

    @property
    def num_key_value_heads(self) -> int:
        return self.retrieval.shape[1]

    @property
    def streaming_fraction(self) -> float:
        """Fraction of (layer, KV head) pairs that are streaming heads."""
        return 1.0 - float(self.retrieval.float().mean())

    def validate(self, config: Any) -> "HeadPattern":
        """Raise ``ValueError`` unless the pattern is ``[num_hidden_layers, num_key_value_heads]`` of ``config``."""
        expected = _kv_shape(config)
        if tuple(self.retrieval.shape) != expected:
            raise ValueError(
                f"HeadPattern has shape {tuple(self.retrieval.shape)} but the model has {expected[0]} layers x "
                f"{expected[1]} KV heads; the pattern must be [num_hidden_layers, num_key_value_heads]."
            )
        return self

    def __repr__(self) -> str:
        return (
            f"HeadPattern(layers={self.num_layers}, kv_heads={self.num_key_value_heads}, "
            f"streaming_fraction={self.streaming_fraction:.3f}, scores={self.scores is not None})"
        )

    # ---------------------------------------------------------------------------------- storage
    def to_dict(self) -> dict:
        return {
            "format": PATTERN_FORMAT,
            "version": 1,
            "retrieval": self.retrieval.int().tolist(),
            "scores": None if self.scores is None else self.scores.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "HeadPattern":
        if not isinstance(data, dict) or data.get("format") != PATTERN_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"Not a saved HeadPattern (expected format={PATTERN_FORMAT!r}, got {got!r}).")
        if "retrieval" not in data:
            raise ValueError("A saved HeadPattern needs a 'retrieval' table; this one has none.")
        scores = data.get("scores")
        return cls(
            _table("retrieval", data["retrieval"]),
            None if scores is None else _table("scores", scores),
            data.get("metadata") or {},
        )

    def save(self, path: str | Path) -> Path:
        """Write to ``*.safetensors`` (tensors + JSON metadata in the header) or ``*.json``, by extension."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(_pattern_json(self.to_dict()))
        elif path.suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {"retrieval": self.retrieval.to(torch.uint8).contiguous()}
            if self.scores is not None:
                tensors["scores"] = self.scores.contiguous()
            save_file(tensors, str(path), metadata={"format": PATTERN_FORMAT, "metadata": json.dumps(self.metadata)})
        else:
            raise ValueError(
                f"Unknown pattern file extension {path.suffix!r} in {str(path)!r}; use .safetensors or .json."
            )
        return path

    @classmethod
    def load(cls, path: str | Path, config: Any = None) -> "HeadPattern":
        """Read a pattern written by :meth:`save`; with ``config``, also :meth:`validate` it.

        Raises:
            FileNotFoundError: ``path`` does not exist (named).
            ValueError: an unknown extension, or a file that is not a readable HeadPattern (corrupted, truncated,
                ragged tables, another format); the message names the file.
        """
        path = Path(path)
        if path.suffix not in (".json", ".safetensors"):
            raise ValueError(
                f"Unknown pattern file extension {path.suffix!r} in {str(path)!r}; use .safetensors or .json."
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"HeadPattern file {str(path)!r} does not exist"
                + (" (it is a directory)" if path.is_dir() else "")
                + "; make one with `hf-sinks duo score` or HeadPattern.save."
            )
        try:
            pattern = cls._read(path)
        except ValueError as e:
            raise ValueError(f"HeadPattern file {str(path)!r} is not a valid pattern: {e}") from None
        if config is None:
            return pattern
        try:
            return pattern.validate(config)
        except ValueError as e:
            raise ValueError(f"HeadPattern file {str(path)!r}: {e}") from None

    @classmethod
    def _read(cls, path: Path) -> "HeadPattern":
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e})") from None
            return cls.from_dict(data)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                names = set(f.keys())
                if header.get("format") != PATTERN_FORMAT:
                    raise ValueError(f"its header has format={header.get('format')!r}, expected {PATTERN_FORMAT!r}")
                if "retrieval" not in names:
                    raise ValueError(f"it has no 'retrieval' tensor (tensors: {sorted(names)})")
                retrieval = f.get_tensor("retrieval")
                scores = f.get_tensor("scores") if "scores" in names else None
        except ValueError:
            raise
        except Exception as e:  # safetensors_rust.SafetensorError and I/O errors: a corrupted or truncated file
            raise ValueError(f"not a readable .safetensors file ({type(e).__name__}: {e})") from None
        try:
            metadata = json.loads(header.get("metadata") or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"its metadata is not valid JSON ({e})") from None
        return cls(retrieval, scores, metadata)


def _table(name: str, rows: Any) -> torch.Tensor:
    """A rectangular table of numbers as a tensor; ``ValueError`` naming ``name`` and the first ragged row otherwise."""
    if isinstance(rows, torch.Tensor):
        return rows
    if isinstance(rows, list) and rows and all(isinstance(r, list) for r in rows):
        widths = [len(r) for r in rows]
        if len(set(widths)) > 1:
            row = next(i for i, w in enumerate(widths) if w != widths[0])
            raise ValueError(
                f"{name} is ragged: row 0 has {widths[0]} entries but row {row} has {widths[row]}; it must be a "
                f"[num_layers, num_key_value_heads] table."
            )
    try:
        return torch.tensor(rows)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} is not a [num_layers, num_key_value_heads] table of numbers ({e}).") from None


def _check_finite(name: str, scores: torch.Tensor) -> None:
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite (no NaN or inf), but {name}[{', '.join(map(str, index))}] = {scores[index].item()}."
        )


def _pattern_json(data: dict) -> str:
    """JSON with one line per layer for the [L, KVH] tables (readable diffs), the rest indented."""

    def table(rows):
        return "null" if rows is None else "[\n" + ",\n".join("  " + json.dumps(row) for row in rows) + "\n ]"

    parts = [
        f" {json.dumps(k)}: "
        + (table(v) if k in ("retrieval", "scores") else json.dumps(v, indent=1).replace("\n", "\n "))
        for k, v in data.items()
    ]
    return "{\n" + ",\n".join(parts) + "\n}\n"
