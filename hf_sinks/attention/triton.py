"""``attn_implementation="sink_triton"``: the Triton kernel ``hf_sinks.kernels.sink_attention`` behind the interface.

A thin adapter over the plumbing of :mod:`hf_sinks.attention.functions` (cache-layer lookup, positions, padding):

* decode: the sinks are shifted to the query in their slots (O(S), as for ``sink_sdpa``), then one kernel call over
  the resident slots with their real indices (empty slots of shorter rows are ``-1``);
* a multi-token chunk: one kernel call over ``stored + q`` columns with per-query real indices and sink shifts; the
  kernel applies the visibility rule and the per-query sink rotation itself and skips invisible key tiles, so there
  is no doubled head dim, no dense mask and no query blocking on the host.

The kernel needs CUDA (or ``TRITON_INTERPRET=1`` set before it is imported). Where it cannot run the pure-PyTorch
twin :func:`~hf_sinks.attention.kernel_fallback.sink_attention_torch` is used instead (:func:`select_backend`).
Environment toggles, read at every call:

=========================== ===========================================================================
``HF_SINKS_DISABLE_TRITON=1`` always use the PyTorch fallback
``HF_SINKS_FORCE_TRITON=1``   always use Triton; raise a ``RuntimeError`` naming the reason if it cannot run
=========================== ===========================================================================

Without a ``SinkCache`` ``sink_triton`` is exactly stock ``sdpa``, like the other ``sink_*`` names.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

from .functions import _stock_sdpa, make_sink_attention_forward, prepare_chunk, prepare_decode
from .kernel_fallback import sink_attention_torch
from .preamble import refuse_dropout

BACKENDS = ("auto", "triton", "torch")
KERNELS_MODULE = "hf_sinks.kernels.sink_attention"


def triton_unavailable_reason(device: torch.device | str, kernels_module: str = KERNELS_MODULE) -> str | None:
    """Why the Triton kernels of ``kernels_module`` cannot run on ``device`` here (``None`` when they can)."""
    device = torch.device(device)
    if os.environ.get("HF_SINKS_DISABLE_TRITON", "0") == "1":
        return "HF_SINKS_DISABLE_TRITON=1 is set"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'hf_sinks[triton]')"
    kernels = sys.modules.get(kernels_module)
    if kernels is None:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            # answer without importing triton (the kernels would be built for CUDA, not the interpreter)
            return (
                f"the tensors are on {device.type!r}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
                f"before triton is imported (CPU, slow)"
            )
        try:
            kernels = importlib.import_module(kernels_module)
        except Exception as error:  # a broken triton install, a missing compiler, ...
            return f"importing the Triton kernels failed ({type(error).__name__}: {error})"
    return kernels.unavailable_reason(device)


def select_backend(
    device: torch.device | str,
    backend: str = "auto",
    kernels_module: str = KERNELS_MODULE,
    what: str = "sink attention",
) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` (the kernels of ``kernels_module``, named ``what``).

    ``backend="auto"`` takes Triton where it can run and the PyTorch fallback otherwise; ``backend="triton"`` (or
    ``HF_SINKS_FORCE_TRITON=1``) raises a ``RuntimeError`` naming the reason when Triton cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = triton_unavailable_reason(device, kernels_module)
    forced = backend == "triton" or os.environ.get("HF_SINKS_FORCE_TRITON", "0") == "1"
    if reason is None:
        return "triton"
    if forced:
        why = "backend='triton'" if backend == "triton" else "HF_SINKS_FORCE_TRITON=1"
        raise RuntimeError(f"hf_sinks: Triton {what} was forced ({why}) but cannot run: {reason}.")
    return "torch"


def dispatch_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_real: torch.Tensor,
    k_real: torch.Tensor,
    q_shift: torch.Tensor | None,
    num_sink_tokens: int,
    window_length: int,
    inv_freq: torch.Tensor | None,
    rotary_dim: int,
    scaling: float | None = None,
    sink_logits: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink+window attention dispatched to the best available backend (:func:`select_backend`): the Triton kernel
    ``hf_sinks.kernels.sink_attention.sink_attention`` or its PyTorch twin
    :func:`~hf_sinks.attention.kernel_fallback.sink_attention_torch`; same arguments as both.

    Returns ``(out [B, H, Tq, Dv], lse [B, H, Tq])``.
    """
    args = (
        q,
        k,
        v,
        q_real,
        k_real,
        q_shift,
        num_sink_tokens,
        window_length,
        inv_freq,
        rotary_dim,
        scaling,
        sink_logits,
    )
    if select_backend(q.device, backend) == "triton":
        from hf_sinks.kernels.sink_attention import sink_attention as triton_sink_attention

        return triton_sink_attention(*args)
    return sink_attention_torch(*args)


# ------------------------------------------------------------------------------- the registered function
def _decode(layer, query, key, value, positions, kernel, scaling, dropout, want_weights, sink_logits=None):
    refuse_dropout(dropout, "sink_triton", "use sink_sdpa or sink_eager for it")
    real = prepare_decode(layer, positions)  # sinks now sit in their slots shifted for this query
    k_real = layer.real_idx[:, : layer.filled]
    q_real = real[:, None].expand(query.shape[0], query.shape[2])
    out, _ = dispatch_sink_attention(
        query,
        key,
        value,
        q_real,
        k_real,
        None,
        layer.num_sink_tokens,
        layer.window_length,
        None,
        0,
        scaling,
        sink_logits,
    )
    return out, None


def _chunk(
    layer, query, key, value, positions, valid, rotary, kernel, scaling, dropout, want_weights, sink_logits=None
):
    refuse_dropout(dropout, "sink_triton", "use sink_sdpa or sink_eager for it")
    if rotary is not None and rotary.interleaved:
        raise ValueError(
            "sink_triton rotates halves (rotate_half); this layer's RoPE pairs neighbouring channels (interleaved, "
            "e.g. Cohere): use sink_sdpa or sink_eager."
        )
    info = prepare_chunk(layer, key, positions, valid)
    inv_freq, rotary_dim = (None, 0) if rotary is None else (rotary.inv_freq, rotary.rotary_dim)
    out, _ = dispatch_sink_attention(
        query,
        key,
        value,
        info.q_real,
        info.k_real,
        info.shift,
        layer.num_sink_tokens,
        layer.window_length,
        inv_freq,
        rotary_dim,
        scaling,
        sink_logits,
    )
    layer.commit(valid, info.positions)
    return out, None


# decode/chunk above call the kernel themselves (kernel=None)
sink_triton_attention_forward = make_sink_attention_forward(None, _stock_sdpa, "sink_triton", _decode, _chunk)
