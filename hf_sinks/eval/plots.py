"""Figures for the evaluation CLI (matplotlib, headless). Import errors surface as ``ImportError`` with a hint."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

_MIB = 2**20


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: pip install matplotlib (or hf_sinks[demo]).") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, 120 dpi), close it and return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def moving_average(values: torch.Tensor, window: int) -> torch.Tensor:
    """Trailing mean over the last ``window`` values (fewer at the start); float64."""
    v = values.double()
    c = torch.cat([torch.zeros(1, dtype=torch.float64), v.cumsum(0)])
    idx = torch.arange(1, v.numel() + 1)
    lo = (idx - window).clamp(min=0)
    return (c[idx] - c[lo]) / (idx - lo)


def _style(label: str, colors) -> dict:
    """dense: black, drawn on top; window: dashed; sink: solid; recompute: dotted."""
    mode = label.split()[0]
    if mode == "dense":
        return {"color": "black", "linewidth": 1.0, "zorder": 5}
    return {"color": next(colors), "linewidth": 1.3, "linestyle": {"window": "--", "recompute": ":"}.get(mode, "-")}


def plot_perplexity(
    curves: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    path: str | Path,
    title: str = "",
    smooth: int = 512,
    training_length: int | None = None,
) -> Path:
    """Two panels: log-perplexity vs tokens (trailing ``smooth``-token mean of the NLL) and KV-cache MiB vs tokens.

    Args:
        curves: ``(label, nll [N], kv_cache_bytes [N])`` per run.
        training_length: draw a vertical line at the model's training context, if given.
    """
    plt = pyplot()
    fig, (ax_ppl, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][1:] * 4)
    for label, nll, kv in curves:
        x = torch.arange(1, nll.numel() + 1)
        smooth_n = max(1, min(smooth, nll.numel()))
        first = min(smooth_n, nll.numel() // 4)  # skip the first tokens, whose trailing mean covers few tokens
        style = _style(label, colors)
        ax_ppl.plot(x[first:], moving_average(nll, smooth_n)[first:], label=label, **style)
        ax_mem.plot(x, kv.double() / _MIB, label=label, **style)
    ax_ppl.set_xlabel("tokens streamed")
    ax_ppl.set_ylabel(f"log perplexity (mean NLL over the last {smooth} tokens)")
    ax_mem.set_xlabel("tokens streamed")
    ax_mem.set_ylabel("KV cache (MiB)")
    for ax in (ax_ppl, ax_mem):
        if training_length:
            ax.axvline(training_length, color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if training_length:
        ax_ppl.text(training_length, ax_ppl.get_ylim()[1], " training length", va="top", fontsize=8, color="grey")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_bench(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Two panels from ``hf-sinks bench`` rows: ms per decoded token and KV-cache MiB vs stream length (log x)."""
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = [r for r in rows if r["mode"] == mode]
        x = [r["stream_length"] for r in sel]
        ax_t.plot(x, [r["ms_per_token"] for r in sel], marker="o", label=sel[0]["label"])
        ax_m.plot(x, [r["kv_cache_bytes"] / _MIB for r in sel], marker="o", label=sel[0]["label"])
    ax_t.set_ylabel("ms per decoded token (median)")
    ax_m.set_ylabel("KV cache (MiB)")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens already streamed")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


__all__ = ["moving_average", "plot_bench", "plot_perplexity"]
