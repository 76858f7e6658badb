"""Sink diagnostics: which layers/heads dump attention on the first token(s), and which later tokens act as sinks.

Two measurements from one forward pass over a text (no cache):

* **Sink score** of head ``(layer, head)`` (Gu et al. 2024, "When Attention Sink Emerges in Language Models"): the mean,
  over queries, of the attention probability on the first ``sink_tokens`` tokens. A head is a *sink head* when its
  score exceeds ``epsilon`` (default 0.3, the paper's ε); the paper's metric is the fraction of sink heads. Queries
  ``0..sink_tokens-1`` see only the sinks (score 1 trivially) and are left out of the mean (with ``sink_tokens=1``
  this differs from the paper's mean over all ``T`` queries by at most ``1/T``).
* **Secondary sinks**: later tokens that receive outsized attention. For key ``j`` and head ``(layer, head)``,
  ``received`` is the mean probability ``j`` gets from the queries at least ``min_distance`` tokens after it (so a
  head that only looks at its neighbours does not count), and ``ratio`` divides it by what uniform causal attention
  would give (query ``i`` spreads ``1/(i+1)`` over every earlier token). A key is a secondary sink in a head when
  ``ratio > secondary_factor``; a token is reported when it is one in at least ``secondary_min_heads`` heads. Keys
  seen by fewer than ``min_distance`` such queries (the last ``2 * min_distance`` tokens) are not scored.

The model is not changed: for the duration of the pass it runs a temporary attention implementation that computes
exactly what eager attention computes (logits, mask, fp32 softmax, ``P @ V``), in blocks of queries, and only
accumulates per-key column sums of the probabilities. Memory is bounded by one ``block x T`` score matrix per head;
no layer's full ``T x T`` matrix is kept (``output_attentions=True`` would keep all of them).

::

    analysis = hf_sinks.analyze(model, tokenizer, num_tokens=1024)
    print(analysis.summary())
    analysis.save("sink_analysis/")            # CSVs + heatmap + per-layer plot

From the command line: ``hf-sinks analyze --num-tokens 1024 --output-dir sink_analysis/`` (:mod:`hf_sinks.cli.analyze`).
"""

from __future__ import annotations

import csv
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .validation import check_int, check_number

#: ``attn_implementation`` name used (temporarily) during :func:`analyze`.
ANALYSIS_ATTENTION = "hf_sinks_sink_analysis"
#: Queries per block in the accumulating attention: bounds the score matrix to ``H x QUERY_BLOCK x T``.
QUERY_BLOCK = 256

_ACCUMULATORS: list["_Accumulator"] = []  # the running analyze() call (the attention function reads the last one)


# ------------------------------------------------------------------------------------------ results
@dataclass
class SecondarySink:
    """A non-initial token that receives outsized attention in some heads (see the module docstring).

    Attributes:
        token_index: position of the token in the analysed sequence.
        token_id: its id.
        token_text: its decoded text (``""`` when no tokenizer was given).
        heads: ``(layer, head)`` pairs where its ratio exceeds ``secondary_factor``.
        max_ratio: largest ratio to uniform attention over those heads.
        max_received: largest mean attention probability it receives (from queries ``>= min_distance`` after it).
    """

    token_index: int
    token_id: int
    token_text: str
    heads: list[tuple[int, int]]
    max_ratio: float
    max_received: float

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})


@dataclass
class SinkAnalysis:
    """What :func:`analyze` measured.

    Attributes:
        sink_scores: ``[layers, heads]`` float64, mean attention on the first ``sink_tokens`` tokens per head.
        epsilon: threshold for a sink head (``sink_scores > epsilon``).
        sink_tokens: how many initial tokens count as the sink.
        token_ids: ``[T]`` the analysed token ids.
        key_ratio: ``[layers, heads, T]`` float32, attention received by each key relative to uniform attention
            (NaN for keys that are not scored: the sinks and the last ``2 * min_distance`` tokens).
        key_received: ``[layers, heads, T]`` float32, the mean probability each key receives from queries at least
            ``min_distance`` after it (NaN where not scored).
        secondary_sinks: tokens with ``key_ratio > secondary_factor`` in ``>= secondary_min_heads`` heads, most
            heads first.
        secondary_factor, secondary_min_heads, min_distance: the secondary-sink criterion used.
        token_texts: decoded text of every token (empty when ids were given without a tokenizer).
        secondary_mass: ``[layers, heads]`` float64, share of the attention from queries at least ``min_distance``
            after a key that lands on the reported secondary sinks (how much a head relies on them).
    """

    sink_scores: torch.Tensor
    epsilon: float
    sink_tokens: int
    token_ids: torch.Tensor
    key_ratio: torch.Tensor
    key_received: torch.Tensor
    secondary_sinks: list[SecondarySink]
    secondary_factor: float
    secondary_min_heads: int
    min_distance: int
    token_texts: list[str] = field(default_factory=list)
    secondary_mass: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.sink_scores.shape[0]

    @property
    def num_heads(self) -> int:
        return self.sink_scores.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def is_sink(self) -> torch.Tensor:
        """``[layers, heads]`` bool: ``sink_scores > epsilon``."""
        return self.sink_scores > self.epsilon

    @property
    def sink_ratio(self) -> float:
        """Fraction of all heads that are sink heads (Gu et al.'s metric)."""
        return float(self.is_sink.double().mean())

    @property
    def layer_mean(self) -> torch.Tensor:
        """``[layers]`` mean sink score over the heads of each layer."""
        return self.sink_scores.mean(-1)

    @property
    def layer_sink_ratio(self) -> torch.Tensor:
        """``[layers]`` fraction of sink heads per layer."""
        return self.is_sink.double().mean(-1)

    def sink_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of every sink head."""
        return [tuple(x) for x in self.is_sink.nonzero().tolist()]

    def rows(self) -> list[dict[str, Any]]:
        """One row per head: ``layer, head, sink_score, is_sink`` (the CSV)."""
        return [
            {
                "layer": layer_idx,
                "head": h,
                "sink_score": float(self.sink_scores[layer_idx, h]),
                "is_sink": bool(self.is_sink[layer_idx, h]),
            }
            for layer_idx in range(self.num_layers)
            for h in range(self.num_heads)
        ]

    def summary(self, max_secondary: int = 10) -> str:
        """Human-readable report: sink ratio, per-layer means, sink heads, the top secondary sinks."""
        lines = [
            f"{self.num_tokens} tokens, {self.num_layers} layers x {self.num_heads} heads; sink = first "
            f"{self.sink_tokens} token(s), epsilon = {self.epsilon}",
            f"sink heads: {int(self.is_sink.sum())}/{self.is_sink.numel()} ({100 * self.sink_ratio:.1f} %); "
            f"mean sink score {float(self.sink_scores.mean()):.3f}",
            "per layer (mean score, sink heads"
            + (", share of far attention on the secondary sinks" if self.secondary_mass is not None else "")
            + "):",
        ]
        for layer_idx in range(self.num_layers):
            heads = [h for h in range(self.num_heads) if bool(self.is_sink[layer_idx, h])]
            extra = (
                ""
                if self.secondary_mass is None
                else f"  secondary-sink mass {float(self.secondary_mass[layer_idx].mean()):.2f}"
            )
            lines.append(
                f"  layer {layer_idx:>3}: {float(self.layer_mean[layer_idx]):.3f}  "
                f"{len(heads)}/{self.num_heads}{extra}  {heads}"
            )
        lines.append(
            f"secondary sinks (ratio to uniform > {self.secondary_factor:g} in >= {self.secondary_min_heads} heads): "
            f"{len(self.secondary_sinks)}"
        )
        for s in self.secondary_sinks[:max_secondary]:
            lines.append(
                f"  token {s.token_index:>5} {s.token_text!r:<14} {len(s.heads):>3} heads "
                f"in layers {_ranges(s.layers)}; "
                f"max ratio {s.max_ratio:.1f}, max received {s.max_received:.3f}"
            )
        return "\n".join(lines)

    def save(self, output_dir: str | Path, title: str = "", plots: bool = True) -> dict[str, Path]:
        """Write ``sink_scores.csv``, ``secondary_sinks.csv``, ``layer_summary.csv`` and (``plots``) two PNGs.

        Returns:
            name -> path of every file written.
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "sink_scores": out / "sink_scores.csv",
            "secondary_sinks": out / "secondary_sinks.csv",
            "layer_summary": out / "layer_summary.csv",
        }
        with paths["sink_scores"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["layer", "head", "sink_score", "is_sink"])
            writer.writeheader()
            for row in self.rows():
                writer.writerow({**row, "sink_score": f"{row['sink_score']:.6f}", "is_sink": int(row["is_sink"])})
        with paths["layer_summary"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["layer", "mean_sink_score", "sink_heads", "num_heads", "sink_head_fraction", "secondary_sink_mass"]
            )
            for layer_idx in range(self.num_layers):
                secondary = "" if self.secondary_mass is None else f"{float(self.secondary_mass[layer_idx].mean()):.4f}"
                writer.writerow(
                    [
                        layer_idx,
                        f"{float(self.layer_mean[layer_idx]):.6f}",
                        int(self.is_sink[layer_idx].sum()),
                        self.num_heads,
                        f"{float(self.layer_sink_ratio[layer_idx]):.4f}",
                        secondary,
                    ]
                )
        (out / "summary.txt").write_text(self.summary(max_secondary=30) + "\n")
        paths["summary"] = out / "summary.txt"
        with paths["secondary_sinks"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["token_index", "token_id", "token_text", "num_heads", "max_ratio", "max_received", "layers", "heads"]
            )
            for s in self.secondary_sinks:
                writer.writerow(
                    [
                        s.token_index,
                        s.token_id,
                        s.token_text,
                        len(s.heads),
                        f"{s.max_ratio:.3f}",
                        f"{s.max_received:.5f}",
                        " ".join(map(str, s.layers)),
                        " ".join(f"{layer_idx}:{h}" for layer_idx, h in s.heads),
                    ]
                )
        if plots:
            paths["heatmap"] = plot_sink_heatmap(self, out / "sink_heatmap.png", title=title)
            paths["layers"] = plot_sink_layers(self, out / "sink_layers.png", title=title)
        return paths


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev > start else str(start))
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(parts)


# ------------------------------------------------------------------------------------- accumulation
class _Accumulator:
    """Per-layer sums the attention function adds into (float64; a few ``[H, T]`` tensors per layer)."""

    def __init__(self, num_tokens: int, sink_tokens: int, min_distance: int, block: int, progress_bar=None):
        self.num_tokens = num_tokens
        self.sink_tokens = sink_tokens
        self.min_distance = min_distance
        self.block = block
        self.sink_mass: dict[int, torch.Tensor] = {}  # layer -> [H]
        self.far_mass: dict[int, torch.Tensor] = {}  # layer -> [H, T]
        self.bar = progress_bar

    def add(self, layer: int, probs: torch.Tensor, t0: int) -> None:
        """``probs``: ``[H, b, T]`` probabilities of queries ``t0..t0+b-1`` over every key."""
        heads, b, n = probs.shape
        p = probs.double()
        rows = torch.arange(t0, t0 + b, device=probs.device)
        if layer not in self.sink_mass:
            self.sink_mass[layer] = torch.zeros(heads, dtype=torch.float64, device=probs.device)
            self.far_mass[layer] = torch.zeros(heads, n, dtype=torch.float64, device=probs.device)
        counted = rows >= self.sink_tokens  # queries inside the sink set see only the sinks: left out
        self.sink_mass[layer] += (p[:, :, : self.sink_tokens].sum(-1) * counted).sum(-1)
        far = rows[:, None] - torch.arange(n, device=probs.device)[None, :] >= self.min_distance  # [b, T]
        self.far_mass[layer] += (p * far).sum(1)


def _analysis_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention computed in query blocks; adds each block's probabilities to the running accumulator."""
    acc = _ACCUMULATORS[-1]
    batch, heads, length, head_dim = query.shape
    if batch != 1:
        raise ValueError(f"Sink analysis runs one sequence at a time, got batch size {batch}.")
    groups = heads // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else head_dim**-0.5
    n = key.shape[2]
    offset = n - length  # 0 without a cache
    out = query.new_empty(batch, heads, length, value.shape[-1])
    layer = getattr(module, "layer_idx", None)
    for t0 in range(0, length, acc.block):
        t1 = min(length, t0 + acc.block)
        scores = torch.matmul(query[:, :, t0:t1], key.transpose(2, 3)) * scaling
        if attention_mask is None:  # the mask builder skipped a plain causal mask
            causal = (
                torch.arange(n, device=query.device)[None, :]
                <= offset + torch.arange(t0, t1, device=query.device)[:, None]
            )
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        else:
            block_mask = attention_mask[:, :, t0:t1, :n]
            if block_mask.dtype == torch.bool:
                scores = scores.masked_fill(~block_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + block_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # as eager attention does
        out[:, :, t0:t1] = torch.matmul(probs, value)
        if layer is not None and offset == 0:
            acc.add(layer, probs[0], t0)
    if acc.bar is not None:
        acc.bar.update(1)
    return out.transpose(1, 2).contiguous(), None


def _register_analysis_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ANALYSIS_ATTENTION, _analysis_attention)
    AttentionMaskInterface.register(ANALYSIS_ATTENTION, sdpa_mask)  # boolean mask (or None for plain causal)


# ------------------------------------------------------------------------------------------- entry
def _check_args(
    epsilon: float,
    sink_tokens: int,
    num_tokens: int | None,
    secondary_factor: float,
    secondary_min_heads: int,
    min_distance: int,
) -> None:
    check_number("epsilon", epsilon, 0, 1, exclusive_minimum=True, exclusive_maximum=True)
    check_int("sink_tokens", sink_tokens, 1)
    if num_tokens is not None:
        check_int("num_tokens", num_tokens, 2)
    check_number(
        "secondary_factor", secondary_factor, 1, exclusive_minimum=True, hint="a multiple of uniform attention"
    )
    check_int("secondary_min_heads", secondary_min_heads, 1)
    check_int("min_distance", min_distance, 1)


def _token_ids(tokenizer_or_ids: Any, text: str | None, num_tokens: int | None) -> tuple[torch.Tensor, Any]:
    """``([T] ids, tokenizer or None)`` from a tokenizer (+ text or the default text) or from ids."""
    if isinstance(tokenizer_or_ids, (torch.Tensor, list, tuple)):
        if text is not None:
            raise ValueError("text=... needs a tokenizer; got token ids as tokenizer_or_ids.")
        ids = torch.as_tensor(tokenizer_or_ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"token ids must be [T] or [1, T] integers, got shape {tuple(ids.shape)}, dtype {ids.dtype}."
            )
        tokenizer = None
    else:
        tokenizer = tokenizer_or_ids
        if text is None:
            from .eval.data import read_text

            text = read_text(None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text={text!r} is empty; pass some text (or text=None for the default text).")
        ids = torch.tensor(tokenizer(text, add_special_tokens=True, return_attention_mask=False)["input_ids"])
    if num_tokens is not None:
        if ids.numel() < num_tokens:
            raise ValueError(
                f"num_tokens={num_tokens} is more than the {ids.numel()} tokens available; pass a longer "
                f"text or a smaller num_tokens."
            )
        ids = ids[:num_tokens]
    if ids.numel() < 2:
        raise ValueError(f"The input has {ids.numel()} token(s); sink analysis needs at least 2.")
    return ids.long(), tokenizer


@torch.no_grad()
def analyze(
    model: torch.nn.Module,
    tokenizer_or_ids: Any,
    text: str | None = None,
    num_tokens: int | None = 1024,
    epsilon: float = 0.3,
    sink_tokens: int = 1,
    output_dir: str | Path | None = None,
    progress: bool = True,
    *,
    secondary_factor: float = 20.0,
    secondary_min_heads: int = 2,
    min_distance: int = 16,
    query_block: int = QUERY_BLOCK,
) -> SinkAnalysis:
    """Per-layer/per-head sink scores and secondary sinks of ``model`` over a text (see the module docstring).

    Args:
        model: a causal LM routed through ``AttentionInterface`` (Llama, Mistral, GPT-NeoX, ...; Falcon is patched
            for the duration). Its attention implementation and weights are left as they were.
        tokenizer_or_ids: a tokenizer (then ``text`` is tokenized, or the default evaluation text when ``text`` is
            ``None``) or token ids (``[T]`` / ``[1, T]``).
        text: the text to analyse (needs a tokenizer).
        num_tokens: analyse the first ``num_tokens`` tokens (``None``: all of them; >= 2).
        epsilon: sink-head threshold, strictly between 0 and 1 (Gu et al. use 0.3).
        sink_tokens: how many initial tokens make up the sink (>= 1).
        output_dir: if given, :meth:`SinkAnalysis.save` writes the CSVs and PNGs there.
        progress: show a tqdm bar (one tick per layer).
        secondary_factor: a key is a secondary sink in a head when it receives more than this multiple of uniform
            attention (> 1).
        secondary_min_heads: report a token when it is a secondary sink in at least this many heads.
        min_distance: only queries at least this far after a key count towards its secondary-sink score.
        query_block: queries per block (memory ``heads x query_block x T`` per layer).

    Returns:
        a :class:`SinkAnalysis`.

    Raises:
        ValueError: ``epsilon`` outside (0, 1), ``sink_tokens < 1``, ``num_tokens < 2`` or more than the text has,
            empty text, ``sink_tokens >= num_tokens``, or bad secondary-sink parameters.
    """
    _check_args(epsilon, sink_tokens, num_tokens, secondary_factor, secondary_min_heads, min_distance)
    ids, tokenizer = _token_ids(tokenizer_or_ids, text, num_tokens)
    from .validation import check_token_ids

    check_token_ids(ids, model)
    length = ids.numel()
    if sink_tokens >= length:
        raise ValueError(f"sink_tokens={sink_tokens} must be smaller than the number of tokens ({length}).")
    from .attention.switch import use_attention
    from .eval.perplexity import _progress

    _register_analysis_attention()
    device = next(model.parameters()).device
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    bar = _progress(num_layers, "sink analysis", progress)
    bar.unit = "layer"
    acc = _Accumulator(length, sink_tokens, min_distance, max(1, int(query_block)), bar)
    _ACCUMULATORS.append(acc)
    try:
        with use_attention(model, ANALYSIS_ATTENTION, route=True):
            model(input_ids=ids[None].to(device), use_cache=False)
    finally:
        _ACCUMULATORS.pop()
        bar.close()
    if not acc.sink_mass:
        raise ValueError(
            f"{type(model).__name__} never called the analysis attention; is it routed through "
            f"transformers' AttentionInterface?"
        )

    layers = sorted(acc.sink_mass)
    sink_scores = torch.stack([acc.sink_mass[layer_idx] for layer_idx in layers]).cpu() / (length - sink_tokens)
    far_mass = torch.stack([acc.far_mass[layer_idx] for layer_idx in layers]).cpu()  # [L, H, T]
    received, ratio = _key_statistics(far_mass, sink_tokens, min_distance)
    texts = [tokenizer.decode([int(t)]) for t in ids] if tokenizer is not None else []
    secondary = _secondary_sinks(ratio, received, ids, texts, secondary_factor, secondary_min_heads)
    hot = torch.tensor([x.token_index for x in secondary], dtype=torch.long)
    secondary_mass = far_mass[:, :, hot].sum(-1) / far_mass.sum(-1).clamp(min=1e-300)
    analysis = SinkAnalysis(
        sink_scores=sink_scores,
        epsilon=float(epsilon),
        sink_tokens=sink_tokens,
        token_ids=ids.cpu(),
        key_ratio=ratio.float(),
        key_received=received.float(),
        secondary_sinks=secondary,
        secondary_factor=float(secondary_factor),
        secondary_min_heads=secondary_min_heads,
        min_distance=min_distance,
        token_texts=texts,
        secondary_mass=secondary_mass,
    )
    if output_dir is not None:
        analysis.save(output_dir)
    return analysis


def _key_statistics(far_mass: torch.Tensor, sink_tokens: int, min_distance: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean received probability and its ratio to uniform attention, per key (NaN where not scored)."""
    length = far_mass.shape[-1]
    j = torch.arange(length, dtype=torch.float64)
    n_far = (length - j - min_distance).clamp(min=0)  # queries i with j + d <= i <= T - 1
    # uniform causal attention: query i gives 1/(i+1) to each key; key j's mean over its far queries
    harmonic = torch.cat(
        [torch.zeros(1, dtype=torch.float64), (1.0 / torch.arange(1, length + 1, dtype=torch.float64)).cumsum(0)]
    )
    first = (j + min_distance).long().clamp(max=length)
    baseline = (harmonic[length] - harmonic[first]) / n_far.clamp(min=1)
    scored = (j >= sink_tokens) & (n_far >= min_distance)
    received = far_mass / n_far.clamp(min=1)
    ratio = received / baseline.clamp(min=1e-300)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return torch.where(scored, received, nan), torch.where(scored, ratio, nan)


def _secondary_sinks(ratio, received, ids, texts, factor, min_heads) -> list[SecondarySink]:
    hot = ratio > factor  # NaN compares False
    counts = hot.sum((0, 1))  # [T]
    found = []
    for j in (counts >= min_heads).nonzero().flatten().tolist():
        heads = [tuple(x) for x in hot[:, :, j].nonzero().tolist()]
        found.append(
            SecondarySink(
                token_index=j,
                token_id=int(ids[j]),
                token_text=texts[j] if texts else "",
                heads=heads,
                max_ratio=float(ratio[:, :, j][hot[:, :, j]].max()),
                max_received=float(received[:, :, j][hot[:, :, j]].max()),
            )
        )
    found.sort(key=lambda s: (-len(s.heads), -s.max_ratio, s.token_index))
    return found


# -------------------------------------------------------------------------------------------- plots
def plot_sink_heatmap(analysis: SinkAnalysis, path: str | Path, title: str = "") -> Path:
    """Layers x heads heatmap of the sink score; sink heads (score > epsilon) are marked with a dot."""
    from .eval.plots import pyplot, save_figure

    plt = pyplot()
    scores = analysis.sink_scores.numpy()
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.5 * analysis.num_heads + 2.5), max(4.0, 0.22 * analysis.num_layers + 1.5))
    )
    im = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="upper")
    rows, cols = analysis.is_sink.nonzero(as_tuple=True)
    ax.scatter(cols.numpy(), rows.numpy(), s=8, c="white", marker="o", label=f"score > {analysis.epsilon:g}")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(analysis.num_heads))
    step = max(1, analysis.num_layers // 15)
    ax.set_yticks(range(0, analysis.num_layers, step))
    fig.colorbar(im, ax=ax, label=f"mean attention on the first {analysis.sink_tokens} token(s)")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    default = (
        f"sink score per head ({analysis.num_tokens} tokens; {100 * analysis.sink_ratio:.0f} % sink heads at "
        f"eps={analysis.epsilon:g})"
    )
    ax.set_title(textwrap.fill(title or default, 60), fontsize=9)
    return save_figure(fig, path)


def plot_sink_layers(analysis: SinkAnalysis, path: str | Path, title: str = "") -> Path:
    """Per layer: mean sink score (with min-max over heads) and the fraction of sink heads."""
    from .eval.plots import pyplot, save_figure

    plt = pyplot()
    x = list(range(analysis.num_layers))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.fill_between(
        x,
        analysis.sink_scores.min(-1).values.numpy(),
        analysis.sink_scores.max(-1).values.numpy(),
        alpha=0.2,
        label="min-max over heads",
    )
    ax.plot(x, analysis.layer_mean.numpy(), marker="o", label="mean sink score")
    ax.plot(
        x,
        analysis.layer_sink_ratio.numpy(),
        marker="s",
        linestyle="--",
        label=f"fraction of heads > {analysis.epsilon:g}",
    )
    if analysis.secondary_mass is not None and len(analysis.secondary_sinks):
        ax.plot(
            x,
            analysis.secondary_mass.mean(-1).numpy(),
            marker="^",
            linestyle=":",
            label=f"share of attention on the {len(analysis.secondary_sinks)} secondary sinks",
        )
    ax.axhline(analysis.epsilon, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"attention on the first {analysis.sink_tokens} token(s) / share")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title or f"sink score per layer ({analysis.num_tokens} tokens)", 100), fontsize=9)
    return save_figure(fig, path)


__all__ = ["ANALYSIS_ATTENTION", "SecondarySink", "SinkAnalysis", "analyze", "plot_sink_heatmap", "plot_sink_layers"]
