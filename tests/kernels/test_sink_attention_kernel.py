"""Tier 1 for the Triton kernel ``hf_sinks.kernels.sink_attention`` (and its PyTorch fallback) vs the fp64 spec.

Kernel inputs are made from a raw stream exactly as a model without cache would: q/k rotated at their real index,
``q_real = k_real = arange(T)`` (``-1`` on left padding), sink shift ``i - min(i, S + W - 1)``. Forward and all
gradients (dq, dk, dv, d sink_logits, the same random upstream grad) are compared with
``reference_sink_attention`` in fp64, through the differentiable rotation. Then ``sink_triton`` streams through a
``SinkCache`` (ring-ordered slots, decode, chunks, padding), the fallback path and the errors of a forced Triton.

CPU: the kernels run under the Triton interpreter. ``TRITON_INTERPRET=1`` must be set before anything imports triton
(torch._dynamo does, and hf_sinks imports it); tests/conftest.py sets it when there is no CUDA. If triton was
nevertheless imported without it, these tests run again in a fresh subprocess that has it (``test_in_a_subprocess``).
Shapes are tiny and fp32 (the interpreter has no bf16). GPU lane: ``TRITON_INTERPRET=0 pytest tests/kernels`` on a
CUDA machine runs the same tests on the GPU (plus fp16 and bf16).
"""

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'hf_sinks[triton]')", allow_module_level=True)

GPU = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
if not GPU and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # normally done by conftest already

from helpers import random_ids, sink_mask, tiny_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import hf_sinks  # noqa: E402
from hf_sinks.attention import kernel_fallback  # noqa: E402
from hf_sinks.attention import triton as sink_triton  # noqa: E402
from hf_sinks.attention.reference import reference_sink_attention  # noqa: E402
from hf_sinks.compat import cache_kwargs
from hf_sinks.kernels import sink_attention as K  # noqa: E402
from hf_sinks.oracle import reference_logits  # noqa: E402
from hf_sinks.rope import RotaryParams, apply_rotary  # noqa: E402
from hf_sinks.visibility import sink_visible  # noqa: E402

#: Why the kernels cannot run in this process (None: they can).
IN_PROCESS_PROBLEM = K.unavailable_reason(torch.device(DEVICE))

pytestmark = [pytest.mark.interpreter] + ([pytest.mark.gpu] if GPU else [])


@pytest.fixture(autouse=True)
def _needs_runnable_kernels(request):
    if IN_PROCESS_PROBLEM is not None and request.node.originalname != "test_in_a_subprocess":
        pytest.skip(f"kernels cannot run in this process ({IN_PROCESS_PROBLEM}); see test_in_a_subprocess")


def test_in_a_subprocess():
    """Safety net: when triton was imported here without the interpreter, run this file where it is on."""
    if IN_PROCESS_PROBLEM is None:
        pytest.skip("the kernels run in this process")
    if GPU:
        pytest.fail(IN_PROCESS_PROBLEM)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def rotary_for(rotary_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    return RotaryParams(inv_freq.float(), rotary_dim)


def assert_close(name, ref, got, ratio):
    """Relative RMS error (FLA style) with a readable report on failure; max |diff| <= ratio also passes."""
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values"
    diff = (ref - got).abs()
    err = float(diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    if float(diff.max()) <= ratio:  # a (near-)zero reference, e.g. dq of a query that only sees itself
        return
    assert err <= ratio, f"{name}: rel-RMS {err:.2e} > {ratio:.0e}; max |diff| {float(diff.max()):.2e} at {worst}"


# ------------------------------------------------------------------------------------- kernel vs the spec
CASES = [  # B, H, H_kv, T, D, rotary_dim, S, W, pads, sink_logits, num_splits
    pytest.param(1, 2, 2, 1, 32, 32, 4, 6, [0], False, None, id="T1-mha-d32"),
    pytest.param(1, 4, 2, 3, 32, 32, 4, 6, [0], True, None, id="T-below-S-gqa2-sinklogits"),
    pytest.param(1, 4, 1, 10, 64, 64, 4, 6, [0], True, None, id="T-equals-S+W-mqa4-d64"),
    pytest.param(2, 4, 2, 37, 80, 40, 3, 7, [0, 5], True, None, id="T-above-S+W-d80-partial-rotary-padded"),
    pytest.param(2, 2, 2, 19, 32, 32, 0, 5, [3, 0], False, None, id="S0-window-only-padded"),
    pytest.param(1, 2, 1, 9, 32, 32, 2, 1, [0], False, None, id="W1"),
    pytest.param(1, 2, 2, 70, 32, 32, 2, 9, [0], True, 3, id="split-keys-x3"),
]
DTYPES = [pytest.param(torch.float32, 2e-5, id="fp32")]
if GPU:
    DTYPES += [pytest.param(torch.float16, 5e-3, id="fp16"), pytest.param(torch.bfloat16, 3e-2, id="bf16")]


def _stream_kernel_inputs(q, k, rotary, sinks, window, pads):
    """Rotated q/k of a no-cache forward, with real indices and sink shifts (autograd flows back to q, k)."""
    batch, _, length, _ = q.shape
    real = torch.arange(length)[None] - torch.tensor(pads)[:, None]
    real = torch.where(real >= 0, real, torch.full_like(real, -1))
    pos = real.clamp(min=0)
    shift = pos - pos.clamp(max=sinks + window - 1)
    return apply_rotary(q, pos[:, None], rotary), apply_rotary(k, pos[:, None], rotary), real, shift


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,ratio", DTYPES)
@pytest.mark.parametrize("B,H,H_kv,T,D,rotary_dim,S,W,pads,with_sink_logits,num_splits", CASES)
def test_forward_and_gradients_match_spec(
    backend, dtype, ratio, B, H, H_kv, T, D, rotary_dim, S, W, pads, with_sink_logits, num_splits
):
    torch.manual_seed(0)
    rotary = rotary_for(rotary_dim)
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H_kv, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H_kv, T, D, dtype=torch.float64, requires_grad=True)
    sink_logits = torch.randn(H, dtype=torch.float64, requires_grad=True) if with_sink_logits else None
    do = torch.randn(B, H, T, D, dtype=torch.float64)
    leaves = [q, k, v] + ([sink_logits] if with_sink_logits else [])

    # reference: each row's unpadded stream through the fp64 spec
    out_ref = torch.zeros(B, H, T, D, dtype=torch.float64)
    loss = 0
    for row, pad in enumerate(pads):
        r = reference_sink_attention(
            q[row : row + 1, :, pad:],
            k[row : row + 1, :, pad:],
            v[row : row + 1, :, pad:],
            S,
            W,
            rotary,
            scaling=0.3,
            sink_logits=sink_logits,
        )
        out_ref[row, :, pad:] = r[0].detach()
        loss = loss + (r * do[row : row + 1, :, pad:]).sum()
    grads_ref = torch.autograd.grad(loss, leaves)

    qr, kr, real, shift = _stream_kernel_inputs(q, k, rotary, S, W, pads)
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    args = (
        cast(qr),
        cast(kr),
        cast(v),
        real.to(DEVICE),
        real.to(DEVICE),
        shift.to(DEVICE),
        S,
        W,
        rotary.inv_freq.to(DEVICE),
        rotary_dim,
        0.3,
        None if sink_logits is None else cast(sink_logits),
    )
    if backend == "triton":
        out, lse = K.sink_attention(*args, num_splits=num_splits)
    else:
        out, lse = kernel_fallback.sink_attention_torch(*args)
    grads = torch.autograd.grad((out.double().cpu() * do).sum(), leaves)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, T)
    assert_close("out", out_ref, out, ratio)
    for name, ref, got in zip(["dq", "dk", "dv", "dsink_logits"], grads_ref, grads):
        assert_close(name, ref, got, ratio)
    for row, pad in enumerate(pads):  # padding queries: zeros and lse = -inf
        assert (out[row, :, :pad] == 0).all() and (lse[row, :, :pad] == float("-inf")).all()
    assert torch.isfinite(lse[real.to(DEVICE)[:, None, :].expand_as(lse) >= 0]).all()


def test_lse_is_the_log_partition_function():
    """lse = logsumexp over the visible scores (plus the sink logit), checked on a tiny case by hand."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    real = torch.arange(5)[None]
    sink = torch.tensor([0.7])
    _, lse = K.sink_attention(
        q.to(DEVICE),
        k.to(DEVICE),
        v.to(DEVICE),
        real.to(DEVICE),
        real.to(DEVICE),
        None,
        1,
        2,
        None,
        0,
        0.5,
        sink_logits=sink.to(DEVICE),
    )
    for i in range(5):
        cols = [j for j in range(i + 1) if j < 1 or i - j < 2]
        scores = torch.cat([(q[0, 0, i] @ k[0, 0, cols].T) * 0.5, sink])
        torch.testing.assert_close(lse[0, 0, i].cpu(), torch.logsumexp(scores, 0), atol=1e-5, rtol=0)


def test_ring_ordered_columns_and_empty_slots():
    """Columns in any order (the cache's ring), with empty slots (-1): only real indices matter."""
    torch.manual_seed(2)
    S, W, T = 2, 4, 11
    rotary = rotary_for(16)
    q, k, v = (torch.randn(1, 2, T, 16, dtype=torch.float64) for _ in range(3))
    qr, kr, real, shift = _stream_kernel_inputs(q, k, rotary, S, W, [0])
    perm = torch.randperm(T)
    k_perm = torch.cat([kr[:, :, perm], torch.randn(1, 2, 3, 16, dtype=torch.float64)], dim=2)
    v_perm = torch.cat([v[:, :, perm], torch.randn(1, 2, 3, 16, dtype=torch.float64)], dim=2)
    k_real = torch.cat([real[:, perm], torch.full((1, 3), -1)], dim=1)
    out, _ = K.sink_attention(
        qr.float().to(DEVICE),
        k_perm.float().to(DEVICE),
        v_perm.float().to(DEVICE),
        real.to(DEVICE),
        k_real.to(DEVICE),
        shift.to(DEVICE),
        S,
        W,
        rotary.inv_freq.to(DEVICE),
        16,
        0.3,
    )
    assert_close("out", reference_sink_attention(q, k, v, S, W, rotary, scaling=0.3), out, 2e-5)


# ------------------------------------------------------------- kernel vs the one Python visibility rule
def _attention_from_rule(q, k, v, q_real, k_real, s, w, scaling, sink_logits):
    """Dense fp64 attention whose mask is ``hf_sinks.visibility.sink_visible`` (rows that see nothing: 0, -inf)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = sink_visible(q_real[:, None, :, None], k_real[:, None, None, :], s, w)  # [B, 1, Tq, Tk]
    seen = mask.any(-1, keepdim=True)
    scores = ((q @ k.transpose(-1, -2)) * scaling).masked_fill(~mask, float("-inf"))
    if sink_logits is not None:
        scores = torch.cat([scores, sink_logits[None, :, None, None].expand(*scores.shape[:-1], 1)], dim=-1)
    scores = torch.where(seen, scores, torch.zeros_like(scores))  # padding rows: finite, zeroed below
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - lse)
    if sink_logits is not None:
        weights = weights[..., :-1]
    return (weights @ v) * seen, lse.squeeze(-1).masked_fill(~seen.squeeze(-1), float("-inf"))


RULE_CASES = [  # B, H, H_kv, Tq, Tk, S, W, sink_logits, num_splits
    pytest.param(2, 2, 1, 1, 40, 3, 9, False, None, id="decode-ring-empty-slots"),
    pytest.param(1, 4, 2, 1, 64, 2, 20, True, 4, id="decode-split-keys-sinklogits"),
    pytest.param(2, 2, 2, 13, 50, 4, 6, True, None, id="chunk-shuffled-padded"),
    pytest.param(1, 2, 1, 24, 70, 0, 5, False, None, id="S0-window-only"),
    pytest.param(1, 2, 2, 9, 30, 5, 1, False, None, id="W1"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("B,H,H_kv,Tq,Tk,S,W,with_sink_logits,num_splits", RULE_CASES)
def test_kernel_matches_attention_masked_by_the_python_rule(
    backend, B, H, H_kv, Tq, Tk, S, W, with_sink_logits, num_splits
):
    """The kernel keeps its own inline copy of the rule (Triton cannot call Python): pin it to ``sink_visible``.

    Arbitrary real indices (shuffled key columns, ``-1`` empty slots and padding queries), no rotation, so the only
    thing deciding the result is which keys each query sees; outputs, lse and gradients must agree."""
    gen = torch.Generator().manual_seed(Tq * 100 + Tk)
    d = 16
    q = torch.randn(B, H, Tq, d, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(B, H_kv, Tk, d, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(B, H_kv, Tk, d, dtype=torch.float64, generator=gen, requires_grad=True)
    sink_logits = torch.randn(H, dtype=torch.float64, generator=gen, requires_grad=True) if with_sink_logits else None
    k_real, q_real = [], []
    for _ in range(B):  # keys: a shuffled subset of 0..2Tk-1 plus empty slots; queries: real keys (+ padding)
        held = torch.randperm(2 * Tk, generator=gen)[: Tk - 3]
        k_real.append(torch.cat([held, torch.full((3,), -1)])[torch.randperm(Tk, generator=gen)])
        queries = held.sort().values[-Tq:] if Tq == 1 else held[torch.randperm(len(held), generator=gen)[:Tq]]
        q_real.append(queries)
    k_real, q_real = torch.stack(k_real), torch.stack(q_real)
    if Tq > 2:
        q_real[0, :2] = -1  # padding queries
    leaves = [q, k, v] + ([sink_logits] if with_sink_logits else [])
    do = torch.randn(B, H, Tq, d, dtype=torch.float64, generator=gen)

    out_ref, lse_ref = _attention_from_rule(q, k, v, q_real, k_real, S, W, 0.3, sink_logits)
    grads_ref = torch.autograd.grad((out_ref * do).sum(), leaves)
    cast = lambda t: t.to(device=DEVICE, dtype=torch.float32)  # noqa: E731
    args = (
        cast(q),
        cast(k),
        cast(v),
        q_real.to(DEVICE),
        k_real.to(DEVICE),
        None,
        S,
        W,
        None,
        0,
        0.3,
        None if sink_logits is None else cast(sink_logits),
    )
    if backend == "triton":
        out, lse = K.sink_attention(*args, num_splits=num_splits)
    else:
        out, lse = kernel_fallback.sink_attention_torch(*args)
    grads = torch.autograd.grad((out.double().cpu() * do).sum(), leaves)

    assert_close("out", out_ref, out, 2e-5)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu().double()[finite], lse_ref.detach()[finite], atol=1e-5, rtol=0)
    for name, ref, got in zip(["dq", "dk", "dv", "dsink_logits"], grads_ref, grads):
        assert_close(name, ref, got, 2e-5)


# ------------------------------------------------------------------ sink_triton through a SinkCache
MODULE = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))


def run_stream(attention, q, k, v, sinks, window, chunks, rotary, pads=None):
    """Feed [B, H, T, D] raw q/k/v through SinkCache + attention in chunks, as a model does; return [B, H, T, D].

    (Same as ``run_stream`` in tests/attention/test_sink_attention.py.)"""
    batch, _, length, _ = q.shape
    pads = pads or [0] * batch
    cache = hf_sinks.SinkCache(sinks, window, rotary=rotary)
    real = torch.arange(length)[None] - torch.tensor(pads)[:, None]
    valid = real >= 0
    positions = real.clamp(min=0)
    outs, start = [], 0
    for size in chunks:
        sl = slice(start, start + size)
        pos = positions[:, sl]
        qr = apply_rotary(q[:, :, sl], pos[:, None], rotary)
        kr = apply_rotary(k[:, :, sl], pos[:, None], rotary)
        keys, values = cache.update(kr, v[:, :, sl], 0)
        mask = sink_mask(valid[:, : start + size], size)
        out, weights = attention(MODULE, qr, keys, values, mask, scaling=0.3, position_ids=pos)
        assert weights is None
        outs.append(out.transpose(1, 2))
        start += size
    assert cache.get_stored_length() <= sinks + window
    return torch.cat(outs, dim=2)


STREAMS = [
    pytest.param(3, 5, [1] * 14, None, id="decode"),
    pytest.param(4, 6, [20], None, id="one-long-prompt"),
    pytest.param(4, 6, [3, 1, 7, 1, 1, 5, 2], None, id="mixed-chunks"),
    pytest.param(2, 5, [7, 13], None, id="prompt-then-chunk-past-capacity"),
    pytest.param(6, 20, [1, 2], None, id="T-smaller-than-S"),
    pytest.param(3, 5, [14, 1, 1, 1, 6], [0, 4, 9], id="left-padded"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("sinks,window,chunks,pads", STREAMS)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rotary_dim",
    [pytest.param(4, 2, 16, 16, id="gqa2"), pytest.param(2, 2, 20, 8, id="partial-rotary")],
)
def test_sink_triton_streams_like_the_spec(
    monkeypatch, backend, sinks, window, chunks, pads, heads, kv_heads, head_dim, rotary_dim
):
    if backend == "torch":
        monkeypatch.setenv("HF_SINKS_DISABLE_TRITON", "1")
    assert sink_triton.select_backend(DEVICE) == backend
    torch.manual_seed(0)
    batch, length = (3 if pads else 2), sum(chunks)
    q = torch.randn(batch, heads, length, head_dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, head_dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, head_dim, dtype=torch.float64)
    rotary = rotary_for(rotary_dim)
    out = run_stream(
        sink_triton.sink_triton_attention_forward,
        q.float().to(DEVICE),
        k.float().to(DEVICE),
        v.float().to(DEVICE),
        sinks,
        window,
        chunks,
        rotary,
        pads=pads,
    )
    for row, pad in enumerate(pads or [0] * batch):
        sl = (slice(row, row + 1), slice(None), slice(pad, None))
        expected = reference_sink_attention(q[sl], k[sl], v[sl], sinks, window, rotary, scaling=0.3)
        assert_close(f"row {row}", expected, out[sl], 2e-5)


@pytest.mark.parametrize(
    "arch,backend",
    [("llama", "triton"), ("gpt_neox", "triton"), ("falcon_new", "triton"), ("llama", "torch")],
)
def test_tiny_model_generates_like_the_spec(monkeypatch, arch, backend):
    """Interface route (llama), partial rotary (gpt_neox) and the patch route (falcon) through generate()."""
    if backend == "torch":
        monkeypatch.setenv("HF_SINKS_DISABLE_TRITON", "1")
    sinks, window, prompt_len = 2, 6, 11
    model = tiny_model(arch, "sink_triton", layers=2).to(DEVICE)
    prompt = random_ids(1, prompt_len).to(DEVICE)
    out = model.generate(
        prompt,
        **cache_kwargs(hf_sinks.SinkCache(sinks, window, config=model.config)),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    logits = torch.stack(out.logits, dim=1)[0]
    spec = reference_logits(model.cpu(), out.sequences[0, :-1].cpu(), sinks, window)[prompt_len - 1 :]
    torch.testing.assert_close(logits.cpu(), spec, atol=1e-4, rtol=0)


def test_without_sink_cache_it_is_stock_sdpa():
    prompt = random_ids(2, 9)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    logits = []
    for impl in ("sink_triton", "sdpa"):
        model = tiny_model("llama", impl)
        out = model.generate(
            prompt,
            attention_mask=mask,
            **cache_kwargs(DynamicCache(config=model.config)),
            max_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logits.append(torch.stack(out.logits))
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


# ------------------------------------------------------------------------------- backend selection / errors
def _tiny_args():
    q = torch.randn(1, 2, 3, 16)
    real = torch.arange(3)[None]
    return (q, q[:, :1].clone(), q[:, :1].clone(), real, real, real * 0, 1, 4, torch.ones(8), 16, 0.25)


def test_disable_env_selects_the_fallback_with_the_same_results(monkeypatch):
    args = _tiny_args()
    if not GPU:
        assert sink_triton.select_backend("cpu") == "triton"  # the interpreter counts as "can run"
    expected, _ = K.sink_attention(*(a.to(DEVICE) if torch.is_tensor(a) else a for a in args))
    monkeypatch.setenv("HF_SINKS_DISABLE_TRITON", "1")
    assert sink_triton.select_backend(DEVICE) == "torch"
    out, _ = sink_triton.dispatch_sink_attention(*args)
    torch.testing.assert_close(out, expected.cpu(), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match=r"forced \(backend='triton'\).*HF_SINKS_DISABLE_TRITON=1 is set"):
        sink_triton.dispatch_sink_attention(*args, backend="triton")
    monkeypatch.setenv("HF_SINKS_FORCE_TRITON", "1")
    with pytest.raises(RuntimeError, match=r"forced \(HF_SINKS_FORCE_TRITON=1\).*HF_SINKS_DISABLE_TRITON=1"):
        sink_triton.dispatch_sink_attention(*args)


def test_forcing_triton_without_cuda_or_interpreter_names_the_reason(monkeypatch):
    monkeypatch.setattr(K, "INTERPRET", False)  # as if imported without TRITON_INTERPRET on a CPU-only machine
    monkeypatch.setattr(K, "LANGUAGE_INTERPRETED", False)
    args = _tiny_args()  # CPU tensors
    assert sink_triton.select_backend("cpu") == "torch"
    sink_triton.dispatch_sink_attention(*args)  # auto: falls back silently
    with pytest.raises(RuntimeError, match="cannot run: the tensors are on 'cpu': the Triton kernels need CUDA"):
        sink_triton.dispatch_sink_attention(*args, backend="triton")
    monkeypatch.setenv("HF_SINKS_FORCE_TRITON", "1")
    with pytest.raises(RuntimeError, match=r"HF_SINKS_FORCE_TRITON=1\) but cannot run: the tensors are on 'cpu'"):
        sink_triton.dispatch_sink_attention(*args)
    with pytest.raises(RuntimeError, match="cannot run: the tensors are on 'cpu'"):
        K.sink_attention(*args)  # the kernel module's own entry point refuses too


def test_interpreter_set_too_late_is_named(monkeypatch):
    monkeypatch.setattr(K, "LANGUAGE_INTERPRETED", not K.INTERPRET)
    with pytest.raises(RuntimeError, match="set it before anything imports triton"):
        sink_triton.select_backend(DEVICE, backend="triton")


def test_forcing_triton_when_it_is_not_installed_names_the_reason(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        sink_triton.importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    assert sink_triton.select_backend("cpu") == "torch"
    with pytest.raises(RuntimeError, match="triton is not installed"):
        sink_triton.select_backend("cpu", backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        sink_triton.select_backend("cpu", backend="cuda")


def test_dropout_is_refused():
    cache = hf_sinks.SinkCache(1, 4, rotary=rotary_for(16))
    k = torch.randn(1, 1, 3, 16)
    keys, values = cache.update(k, k.clone(), 0)
    with pytest.raises(ValueError, match="sink_triton does not support attention dropout"):
        sink_triton.sink_triton_attention_forward(MODULE, torch.randn(1, 2, 3, 16), keys, values, None, dropout=0.1)
