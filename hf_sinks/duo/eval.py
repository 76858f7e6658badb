"""DuoAttention evaluation: passkey retrieval with a :class:`DuoCache` and the head-pattern plot.

Streaming perplexity with a :class:`~hf_sinks.duo.DuoCache`: ``hf_sinks.eval.streaming_perplexity(model, ids,
cache=DuoCache(...))``. The commands (``hf-sinks duo identify|score|bench|passkey``) are in :mod:`hf_sinks.cli.duo`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .pattern import HeadPattern


def duo_passkey_accuracy(
    model: torch.nn.Module,
    tokenizer,
    pattern: HeadPattern,
    num_sink_tokens: int = 64,
    window_length: int = 256,
    context_lengths=(2048,),
    depths=(0.0, 0.5),
    trials: int = 2,
    chunk_size: int = 512,
    max_new_tokens: int = 8,
    digits: int = 5,
    seed: int = 0,
) -> list[dict]:
    """:func:`hf_sinks.eval.passkey.passkey_accuracy` with ``mode="duo"`` (a :class:`DuoCache`): the same prompts
    and keys (they depend only on ``seed``, length, depth and trial), rows in the same format."""
    from ..eval.passkey import passkey_accuracy

    return passkey_accuracy(
        model,
        tokenizer,
        context_lengths,
        depths,
        trials,
        mode="duo",
        num_sink_tokens=num_sink_tokens,
        window_length=window_length,
        chunk_size=chunk_size,
        max_new_tokens=max_new_tokens,
        digits=digits,
        seed=seed,
        progress=False,
        pattern=pattern,
    )


def plot_head_pattern(pattern: HeadPattern, path: str | Path, title: str = "") -> Path:
    """Heatmap of a pattern's scores (layers x KV heads), streaming heads hatched; the retrieval fraction per layer."""
    from ..eval.plots import pyplot, save_figure

    plt = pyplot()
    scores = pattern.scores if pattern.scores is not None else pattern.retrieval.float()
    layers, kv_heads = scores.shape
    fig, (ax, ax_frac) = plt.subplots(1, 2, figsize=(7, max(3.5, 0.22 * layers)), width_ratios=(kv_heads + 1, 3))
    image = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for layer, head in (~pattern.retrieval).nonzero().tolist():
        ax.text(head, layer, "S", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(kv_heads))
    fig.colorbar(image, ax=ax, label="score (higher = retrieval)")
    ax_frac.barh(range(layers), pattern.retrieval.float().mean(1).numpy(), color="tab:blue")
    ax_frac.set_ylim(layers - 0.5, -0.5)
    ax_frac.set_xlim(0, 1)
    ax_frac.set_xlabel("retrieval fraction")
    ax_frac.set_yticks([])
    fig.suptitle(title or f"{pattern} (S = streaming head)", fontsize=9)
    return save_figure(fig, path)


__all__ = ["duo_passkey_accuracy", "plot_head_pattern"]
