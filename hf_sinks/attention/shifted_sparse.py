"""Training-time sparse attentions: LongLoRA S²-Attn (``sink_s2attn``) and SinkLoRA SF-Attn (``sink_sfattn``).

Pure PyTorch (one SDPA call per head half, differentiable by autograd; no flex, which has no CPU backward).

Visibility (``G`` = group size, ``s = G // 2``, ``S`` = number of sink tokens; ``i``, ``j`` = indices of real
tokens of one row, padding removed):

* **plain heads** (the first ``H - H // 2`` heads): ``i`` sees ``j`` iff ``j <= i`` and ``i // G == j // G``
  (groups ``[0, G), [G, 2G), ...``).
* **shifted heads** (the last ``H // 2``): ``i`` sees ``j`` iff ``j <= i`` and both are in the same group of the
  partition shifted by ``s``: ``[0, s), [s, s + G), [s + G, s + 2G), ...``. The first group is the partial head
  of the sequence; *nothing wraps*. (The public LongLoRA ``roll`` puts the first ``s`` tokens into one group with the
  last ``s`` and lets them see those future tokens; its FA-varlen path uses the partition above, as do we.)
* ``sink_sfattn`` only: additionally ``i`` sees every ``j < S`` with ``j <= i`` (global, causal attention to the
  first ``S`` tokens, SinkLoRA's sink tokens; their query rows stay causal, never global). SinkLoRA's "segmentation
  and reassembly" puts the wrapped part of the shifted heads back in its unshifted place; the non-wrapping partition
  above already is that, so ``sink_sfattn`` = ``sink_s2attn`` + global sinks.
* The last group of either partition may be shorter (any ``T``, no divisibility needed). When the batch length
  ``T`` (padding included) is ``<= G`` all heads use plain causal attention (the dense fallback).
* Padding (a 2D mask from the model, left, right or anywhere): padding keys are never seen, and groups and sinks are
  counted over the *real* tokens of each row (real tokens are packed to the front, attended, and put back), so a
  left-padded row is split exactly like its unpadded version. Padding queries see only themselves (their outputs
  are meaningless; give them label ``-100``).
* A Mistral-style ``sliding_window`` passed by the model further requires ``i - j < sliding_window`` for group
  keys; sink keys are exempt.
* Learned per-head sink logits (gpt-oss style, unrelated to sink *tokens*): if the attention module has an attribute
  ``sink_logits`` (a ``[num_heads]`` tensor/parameter, or a module such as
  :class:`hf_sinks.training.AttentionSinkLogits` whose call returns
  one; a module survives PEFT's ``modules_to_save`` wrapping), one extra logit per head joins every softmax
  denominator, with no value attached.

When they apply: only in training mode (``module.training``) on a full sequence without a cache. Otherwise
(``model.eval()``, or keys longer than queries, i.e. a cache) they run plain causal attention: exactly
transformers' ``sdpa`` (with the learned sink logits, if any), or, with a :class:`~hf_sinks.cache.SinkCache`, the
``sink_sdpa`` streaming path. S²/SF-Attn are training-time approximations; LongLoRA and SinkLoRA evaluate and serve
with full (or sink-cache) attention. ``torch.is_grad_enabled()`` is deliberately *not* consulted: reentrant
gradient checkpointing runs the first forward under ``no_grad`` and must compute the same function as its recompute.

Configuration, read from ``module.config`` at every call:

* ``s2attn_group_size`` (int >= 2): fixed group size ``G``; or
* ``s2attn_group_size_ratio`` (float in (0, 1], default ``0.25``, LongLoRA's 1/4): ``G = max(2, int(T * ratio))``
  for a batch of length ``T``. Setting both is an error.
* ``sfattn_num_sink_tokens`` (int >= 0), else ``config.attention_sinks["num_sink_tokens"]`` (the streaming setup, so
  training and serving keep the same sinks), else 4.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..cache import SinkCacheLayer
from ..cache_layers import layer_of
from ..config import CONFIG_ATTRIBUTE
from ..validation import check_int, check_number
from .masks import is_sink_mask, new_token_validity
from .preamble import default_scaling, to_model_layout
from .sink_logits import SINK_LOGITS_ATTRIBUTE, sink_logits_of

#: ``module.config`` attributes read by the shifted-sparse attentions.
GROUP_SIZE_ATTRIBUTE = "s2attn_group_size"
GROUP_RATIO_ATTRIBUTE = "s2attn_group_size_ratio"
NUM_SINKS_ATTRIBUTE = "sfattn_num_sink_tokens"
DEFAULT_GROUP_RATIO = 0.25
DEFAULT_NUM_SINK_TOKENS = 4


# ------------------------------------------------------------------------------------------- configuration
def group_size_for(config: Any, length: int) -> int:
    """The S² group size for a sequence of ``length`` tokens, from ``config`` (see the module docstring)."""
    size = getattr(config, GROUP_SIZE_ATTRIBUTE, None)
    ratio = getattr(config, GROUP_RATIO_ATTRIBUTE, None)
    if size is not None and ratio is not None:
        raise ValueError(
            f"config.{GROUP_SIZE_ATTRIBUTE}={size!r} and config.{GROUP_RATIO_ATTRIBUTE}={ratio!r} are both set; "
            "set only one of them."
        )
    if size is not None:
        return check_int(f"config.{GROUP_SIZE_ATTRIBUTE}", size, 2)
    ratio = DEFAULT_GROUP_RATIO if ratio is None else ratio
    check_number(f"config.{GROUP_RATIO_ATTRIBUTE}", ratio, 0, 1, exclusive_minimum=True)
    return max(2, int(length * ratio))


def num_sink_tokens_for(config: Any) -> int:
    """Sink tokens of ``sink_sfattn``: ``config.sfattn_num_sink_tokens``, else ``config.attention_sinks``, else 4."""
    value = getattr(config, NUM_SINKS_ATTRIBUTE, None)
    if value is not None:
        return check_int(f"config.{NUM_SINKS_ATTRIBUTE}", value, 0)
    recorded = getattr(config, CONFIG_ATTRIBUTE, None)
    if recorded is not None:
        from ..config import SinkConfig  # validates the streaming setup the same way everywhere

        return SinkConfig.from_model_config(config).num_sink_tokens
    return DEFAULT_NUM_SINK_TOKENS


# ----------------------------------------------------------------------------------------------- kernel
def _padding_of(attention_mask: Any, batch: int, length: int) -> torch.Tensor | None:
    """``[B, T]`` bool validity of the tokens (``None``: no padding) from what the model handed over."""
    if attention_mask is None:
        return None
    if is_sink_mask(attention_mask):  # built by transformers through the sink mask function: carries the padding
        return new_token_validity(attention_mask, length)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = (
            tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        )
        raise ValueError(
            f"sink_s2attn/sink_sfattn build their own visibility and take only a 2D padding mask [batch, seq_len]; "
            f"got {shape}. Pass attention_mask as a [batch, seq_len] 0/1 tensor (not a 4D mask)."
        )
    valid = attention_mask[:, -length:].bool()
    if tuple(valid.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{batch}, {length}].")
    return None if bool(valid.all()) else valid


def _kv_for_heads(key, value, h0, h1, n_rep):
    """Keys/values of query heads ``h0..h1-1`` and whether SDPA must broadcast them (GQA)."""
    if h0 % n_rep == 0 and (h1 - h0) % n_rep == 0:
        return key[:, h0 // n_rep : h1 // n_rep], value[:, h0 // n_rep : h1 // n_rep], n_rep > 1
    idx = torch.arange(h0, h1, device=key.device) // n_rep  # a half that splits a KV group: repeat explicitly
    return key.index_select(1, idx), value.index_select(1, idx), False


def _grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor,
    group_size: int,
    offset: int,
    num_sink_tokens: int,
    sink_logits: torch.Tensor | None,
    sliding_window: int | None,
    scaling: float,
    dropout: float,
    gqa: bool,
) -> torch.Tensor:
    """Causal attention inside groups ``[kG - offset, (k+1)G - offset)`` (clipped to ``[0, T)``) + sink prefix keys.

    ``query`` ``[B, h, T, D]``, ``key``/``value`` ``[B, hk, T, D]``, ``valid`` ``[B, T]`` (True = real key; real
    tokens first). Each group becomes a batch element of one SDPA call with a ``[G, S + G]`` mask. Returns
    ``[B, h, T, D]``.
    """
    batch, heads, length, _ = query.shape
    device = query.device
    n = -(-(offset + length) // group_size)
    back = n * group_size - offset - length

    def grouped(x):  # [B, h, T, D] -> [B * n, h, G, D]; dummy positions padded with zeros at both ends
        x = F.pad(x, (0, 0, offset, back))
        return x.unflatten(2, (n, group_size)).transpose(1, 2).flatten(0, 1)

    q, k, v = grouped(query), grouped(key), grouped(value)
    t = (torch.arange(n * group_size, device=device) - offset).view(n, group_size)  # token index of each slot
    key_ok = F.pad(valid, (offset, back), value=False).view(batch, n, 1, group_size)
    visible = (t[:, None, :] <= t[:, :, None])[None] & key_ok  # [B, n, G, G]
    if sliding_window is not None:  # sinks are exempt even inside the query's own group
        near = (t[:, :, None] - t[:, None, :] < sliding_window) | (t[:, None, :] < num_sink_tokens)
        visible &= near[None]
    # every row keeps its own (possibly dummy) key: no empty softmax row, so no NaN in forward or backward
    visible |= torch.eye(group_size, dtype=torch.bool, device=device)

    sinks = min(num_sink_tokens, length)
    if sinks:
        j = torch.arange(sinks, device=device)
        group_start = (torch.arange(n, device=device) * group_size - offset).clamp(min=0)
        # a sink inside the query's own group is already a group key: count it once
        sink_visible = (j[None, None, :] <= t[:, :, None]) & (j[None, None, :] < group_start[:, None, None])
        sink_visible = sink_visible[None] & valid[:, None, None, :sinks]  # [B, n, G, S]
        visible = torch.cat([sink_visible, visible], dim=-1)

        def with_sinks(x, s):  # prepend the first S keys/values to every group
            s = s[:, :, :sinks].unsqueeze(1).expand(-1, n, -1, -1, -1).flatten(0, 1)
            return torch.cat([s, x], dim=2)

        k, v = with_sinks(k, key), with_sinks(v, value)

    mask: torch.Tensor = visible.flatten(0, 1).unsqueeze(1)  # [B * n, 1, G, keys]
    if sink_logits is not None:
        # one zero key/value column whose additive mask entry is the head's sink logit (exact, autograd-friendly)
        k = F.pad(k, (0, 0, 0, 1))
        v = F.pad(v, (0, 0, 0, 1))
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=device).masked_fill(~mask, float("-inf"))
        column = sink_logits.to(query.dtype)[None, :, None, None].expand(mask.shape[0], heads, group_size, 1)
        mask = torch.cat([mask.expand(-1, heads, -1, -1), column], dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    out = out.unflatten(0, (batch, n)).transpose(1, 2).flatten(2, 3)  # [B, h, n * G, D]
    return out[:, :, offset : offset + length]


def shifted_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    num_sink_tokens: int = 0,
    padding_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sink_logits: torch.Tensor | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """S²-Attn (``num_sink_tokens=0``) or SF-Attn (``> 0``) over full sequences; the visibility of the module docstring.

    Args:
        query: ``[B, H, T, D]``; key, value: ``[B, H_kv, T, D]`` (GQA: ``H`` a multiple of ``H_kv``).
        group_size: ``G >= 2``; ``T <= G`` gives plain causal attention.
        num_sink_tokens: ``S``, the first real tokens every query also sees (causally).
        padding_mask: ``[B, T]`` (True/1 = real token) or ``None``.
        scaling: softmax scale, default ``D ** -0.5``.
        dropout: attention dropout probability (applied as given; pass 0 in eval).
        sink_logits: optional ``[H]`` learned per-head sink logits.
        sliding_window: optional window limiting group keys (sinks exempt).
        backend: ``"auto"`` (the fused Triton kernel ``hf_sinks.kernels.shifted_sparse_attention`` for CUDA tensors
            when it can run, this module's SDPA path otherwise), ``"triton"`` (the kernel; a ``RuntimeError`` says
            why when it cannot run, e.g. on CPU without ``TRITON_INTERPRET=1``) or ``"torch"`` (this module). The
            kernel has no dropout and needs an even ``G``: those cases always take the SDPA path.

    Returns:
        ``[B, H, T, D]``.
    """
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise ValueError(
            f"shifted-sparse attention needs keys for exactly the queries; "
            f"got {key.shape[2]} keys for {length} queries."
        )
    if heads % key.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {key.shape[1]} key/value heads.")
    check_int("group_size", group_size, 2)
    check_int("num_sink_tokens", num_sink_tokens, 0)
    n_rep = heads // key.shape[1]
    scaling = default_scaling(query, scaling)
    valid = _padding_of(padding_mask, batch, length) if padding_mask is not None else None

    order = None
    if valid is not None:  # pack real tokens to the front (stable), so groups and sinks count real tokens only
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
        gather = order[:, None, :, None]
        query = query.gather(2, gather.expand_as(query))
        key = key.gather(2, gather.expand(-1, key.shape[1], -1, head_dim))
        value = value.gather(2, gather.expand(-1, value.shape[1], -1, value.shape[-1]))
        valid = torch.arange(length, device=query.device)[None] < valid.sum(1, keepdim=True)
    else:
        valid = torch.ones(batch, length, dtype=torch.bool, device=query.device)

    split = heads - heads // 2  # plain heads first (as LongLoRA's chunk(2) of an odd head count)
    if _use_kernel(query.device, backend, dropout, group_size):
        # the fused kernel shifts its last heads by G // 2 (= this module's offset for an even G); the dense fallback
        # is one even group >= T with every head plain. Packed rows: real tokens are the columns [0, count).
        dense = length <= group_size
        from .shifted_sparse_kernel import dispatch_shifted_sparse_attention as fused

        out, _ = fused(
            query,
            key,
            value,
            length + length % 2 if dense else group_size,
            num_sink_tokens,
            scaling,
            sink_logits,
            valid_end=valid.sum(1).to(torch.int32),
            first_shifted_head=heads if dense else split,
            sliding_window=sliding_window,
            backend="auto" if backend == "auto" else "triton",
        )
        if order is not None:
            out = torch.empty_like(out).scatter(2, order[:, None, :, None].expand_as(out), out)
        return out

    if length <= group_size:  # dense fallback: one causal group for every head
        halves = [(0, heads, length, 0)]
    else:
        halves = [(0, split, group_size, 0), (split, heads, group_size, group_size - group_size // 2)]
    outs = []
    for h0, h1, size, offset in halves:
        if h1 == h0:
            continue
        k, v, gqa = _kv_for_heads(key, value, h0, h1, n_rep)
        logits = None if sink_logits is None else sink_logits[h0:h1]
        outs.append(
            _grouped_attention(
                query[:, h0:h1],
                k,
                v,
                valid,
                size,
                offset,
                num_sink_tokens,
                logits,
                sliding_window,
                scaling,
                dropout,
                gqa,
            )
        )
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if order is not None:  # back to the original token order
        out = torch.empty_like(out).scatter(2, order[:, None, :, None].expand_as(out), out)
    return out


def _use_kernel(device: torch.device, backend: str, dropout: float, group_size: int) -> bool:
    """Whether :func:`shifted_sparse_attention` runs the fused Triton kernel (see its ``backend`` argument)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not one of 'auto', 'triton', 'torch'.")
    if backend == "torch" or dropout or group_size % 2:
        return False
    if backend == "auto" and device.type != "cuda":  # the CPU interpreter is a test tool, never chosen by itself
        return False
    from .shifted_sparse_kernel import select_backend

    return select_backend(device, backend) == "triton"


# ------------------------------------------------------------------------------------- inference paths
def _make(name: str, sinks: bool):
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        config = module.config
        heads = query.shape[1]
        sink_logits = sink_logits_of(module, heads)
        if layer_of(key, SinkCacheLayer) is not None:  # a SinkCache: the streaming path (learned logits too)
            from .functions import sink_sdpa_attention_forward

            return sink_sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )

        scaling = default_scaling(query, scaling)
        if not module.training or key.shape[2] != query.shape[2]:  # inference or a cache: plain causal attention
            from .functions import without_sink_cache

            return without_sink_cache(
                module, query, key, value, attention_mask, dropout, scaling, sink_logits, **kwargs
            )

        length = query.shape[2]
        out = shifted_sparse_attention(
            query,
            key,
            value,
            group_size=group_size_for(config, length),
            num_sink_tokens=num_sink_tokens_for(config) if sinks else 0,
            padding_mask=_padding_of(attention_mask, query.shape[0], length),
            scaling=scaling,
            dropout=dropout,
            sink_logits=sink_logits,
            sliding_window=kwargs.get("sliding_window"),
        )
        return to_model_layout(out), None

    attention.__name__ = attention.__qualname__ = f"{name}_attention_forward"
    attention.__doc__ = (
        f"``attn_implementation={name!r}``: {'SF-Attn (S² + global sinks)' if sinks else 'S²-Attn'} in training, "
        "plain causal attention otherwise (see hf_sinks.attention.shifted_sparse)."
    )
    return attention


sink_s2attn_attention_forward = _make("sink_s2attn", sinks=False)
sink_sfattn_attention_forward = _make("sink_sfattn", sinks=True)

__all__ = [
    "SINK_LOGITS_ATTRIBUTE",
    "group_size_for",
    "num_sink_tokens_for",
    "shifted_sparse_attention",
    "sink_logits_of",
    "sink_s2attn_attention_forward",
    "sink_sfattn_attention_forward",
]
