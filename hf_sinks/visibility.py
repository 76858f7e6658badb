"""The visibility rule of sink + window attention (docs/design.md §2.1), written once.

Query at real index ``i`` sees key at real index ``j`` iff::

    j >= 0  and  j <= i  and  ( j < num_sink_tokens  or  i - j < window_length )

A negative real index marks padding (or an empty cache slot): a padding key is never visible, and a padding query
sees nothing (``j <= i < 0`` fails for every ``j >= 0``). Every Python backend (the fp64 spec, the ``sink_*``
functions, the PyTorch twin of the Triton kernel, :class:`~hf_sinks.duo.DuoCache`, the recompute oracle and the
evaluation) builds its masks or index lists from :func:`sink_visible`; the Triton kernel
``hf_sinks.kernels.sink_attention`` keeps its own inline copy (Triton cannot call Python) and is tested against this
function (tests/kernels/test_sink_attention_kernel.py).
"""

from __future__ import annotations

import torch


def sink_visible(
    query_real: torch.Tensor | int, key_real: torch.Tensor | int, num_sink_tokens: int, window_length: int
) -> torch.Tensor:
    """Whether each query sees each key: a bool tensor of the broadcast shape of ``query_real`` and ``key_real``.

    Broadcasting does the pairing: ``sink_visible(i[:, None], j[None, :], S, W)`` is the ``[q, k]`` mask.
    Negative indices are padding (never visible, and a padding query sees nothing).
    """
    query_real, key_real = torch.as_tensor(query_real), torch.as_tensor(key_real)
    return (
        (key_real >= 0)
        & (key_real <= query_real)
        & ((key_real < num_sink_tokens) | (query_real - key_real < window_length))
    )


def visible_keys(i: int, num_sink_tokens: int, window_length: int, device=None) -> torch.Tensor:
    """Indices of the keys query ``i`` sees, ascending (``[min(i + 1, S + W)]`` long), by :func:`sink_visible`."""
    keys = torch.arange(i + 1, device=device)
    return keys[sink_visible(i, keys, num_sink_tokens, window_length)]


__all__ = ["sink_visible", "visible_keys"]
