"""Tier 1 for the Triton kernel ``hf_sinks.kernels.shifted_sparse_attention`` (and its PyTorch twin) vs an fp64 spec.

The spec is written here from the visibility rule with plain comparisons (an explicit ``[H, T, T]`` boolean mask and
a float64 softmax), and is itself checked against plain causal attention (groups covering the sequence) and against
LongLoRA's roll-based S²-Attn (Algorithm 1 of the paper), which it must equal except for the wrapped rows of the
shifted heads, the roll's future leak. Then the kernel (under ``TRITON_INTERPRET=1`` on CPU) and the PyTorch
fallback are each compared with the spec: forward, lse and all gradients (dq, dk, dv, d sink_logits, the same random
upstream grad), causality, padding, argument errors and backend selection.

CPU: as tests/kernels/test_sink_attention_kernel.py (``TRITON_INTERPRET=1`` set by tests/conftest.py before triton is
imported; a subprocess safety net otherwise). Shapes are tiny and fp32. GPU lane: ``TRITON_INTERPRET=0 pytest
tests/kernels`` on a CUDA machine runs the same tests there (plus fp16 and bf16).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'hf_sinks[triton]')", allow_module_level=True)

GPU = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
if not GPU and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # normally done by conftest already

from hf_sinks.attention import shifted_sparse_kernel as dispatch  # noqa: E402
from hf_sinks.kernels import shifted_sparse_attention as K  # noqa: E402

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


def assert_close(name, ref, got, ratio):
    """Relative RMS error (FLA style) with a readable report on failure; max |diff| <= ratio also passes."""
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert (torch.isfinite(got) == finite).all(), f"{name}: non-finite values differ from the reference"
    ref, got = ref.where(finite, 0), got.where(finite, 0)
    diff = (ref - got).abs()
    err = float(diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    if float(diff.max()) <= ratio:  # a (near-)zero reference, e.g. dq of a query that only sees itself
        return
    assert err <= ratio, f"{name}: rel-RMS {err:.2e} > {ratio:.0e}; max |diff| {float(diff.max()):.2e} at {worst}"


# ------------------------------------------------------------------------------------------------- the spec
def visibility_mask(length, heads, group_size, num_sink_tokens, first_shifted_head=None, sliding_window=None):
    """``[H, T, T]``: query i sees key j iff j <= i and (j < S or floor((i + off_h) / G) == floor((j + off_h) / G))."""
    first = heads // 2 if first_shifted_head is None else first_shifted_head
    mask = torch.zeros(heads, length, length, dtype=torch.bool)
    for h in range(heads):
        off = group_size // 2 if h >= first else 0
        for i in range(length):
            for j in range(i + 1):
                same_group = (i + off) // group_size == (j + off) // group_size
                near = sliding_window is None or i - j < sliding_window
                mask[h, i, j] = j < num_sink_tokens or (same_group and near)
    return mask


def reference(
    q,
    k,
    v,
    group_size,
    num_sink_tokens,
    scaling,
    sink_logits=None,
    starts=None,
    ends=None,
    first_shifted_head=None,
    sliding_window=None,
):
    """fp64 S²/SF-Attn: out ``[B, H, T, Dv]`` and lse ``[B, H, T]``; row b's real tokens are ``[starts[b], ends[b])``
    (zeros and ``-inf`` elsewhere). Differentiable."""
    batch, heads, length, _ = q.shape
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs, lses = [], []
    for b in range(batch):
        s0 = 0 if starts is None else starts[b]
        s1 = length if ends is None else ends[b]
        n = s1 - s0
        out = torch.zeros(heads, length, v.shape[-1], dtype=q.dtype)
        lse = torch.full((heads, length), float("-inf"), dtype=q.dtype)
        if n > 0:
            mask = visibility_mask(n, heads, group_size, num_sink_tokens, first_shifted_head, sliding_window)
            scores = (q[b, :, s0:s1] @ k[b, :, s0:s1].transpose(-1, -2)) * scaling
            scores = scores.masked_fill(~mask, float("-inf"))
            if sink_logits is not None:
                scores = torch.cat([scores, sink_logits[:, None, None].expand(heads, n, 1)], dim=-1)
            weights = torch.softmax(scores, dim=-1)[..., :n]
            out = torch.cat([out[:, :s0], weights @ v[b, :, s0:s1], out[:, s1:]], dim=1)
            lse = torch.cat([lse[:, :s0], torch.logsumexp(scores, -1), lse[:, s1:]], dim=1)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def causal_attention(q, k, v, scaling):
    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, -1) @ v


def roll_s2attn(q, k, v, group_size, scaling):
    """LongLoRA Algorithm 1 (eager): roll the second half of the heads by -G/2, causal attention inside each group
    of G tokens, roll back. MHA only, ``T % G == 0``."""
    batch, heads, length, dim = q.shape
    half = group_size // 2

    def roll(x, shift):
        return torch.cat([x[:, : heads // 2], x[:, heads // 2 :].roll(shift, dims=2)], dim=1)

    def grouped(x):
        return roll(x, -half).reshape(batch, heads, length // group_size, group_size, dim)

    out = causal_attention(grouped(q), grouped(k), grouped(v), scaling).reshape(batch, heads, length, dim)
    return roll(out, half)


def test_reference_is_causal_attention_when_groups_cover_the_sequence():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    causal = causal_attention(q, k, v, 0.4)
    out, _ = reference(q, k, v, 18, 0, 0.4)  # G >= 2T: the shifted heads' first group [0, G/2) covers T too
    torch.testing.assert_close(out, causal, atol=1e-12, rtol=0)
    out, _ = reference(q, k, v, 10, 0, 0.4)  # T <= G < 2T: only the plain heads are causal
    torch.testing.assert_close(out[:, :2], causal[:, :2], atol=1e-12, rtol=0)
    assert not torch.allclose(out[:, 2:], causal[:, 2:])
    out, _ = reference(q, k, v, 2, 9, 0.4)  # every key a sink
    torch.testing.assert_close(out, causal, atol=1e-12, rtol=0)


def test_reference_matches_roll_based_s2attn_except_the_wrapped_rows():
    """Plain heads: identical. Shifted heads: identical except rows [0, G/2), which the roll puts at the end of the
    last group so that they see the last G/2 tokens (the future leak); the index-space shift has no such group."""
    torch.manual_seed(1)
    group = 6
    q, k, v = (torch.randn(2, 4, 24, 8, dtype=torch.float64) for _ in range(3))
    out, _ = reference(q, k, v, group, 0, 0.3)
    rolled = roll_s2attn(q, k, v, group, 0.3)
    torch.testing.assert_close(out[:, :2], rolled[:, :2], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[:, 2:, group // 2 :], rolled[:, 2:, group // 2 :], atol=1e-12, rtol=0)
    assert (out[:, 2:, : group // 2] - rolled[:, 2:, : group // 2]).abs().amin() > 1e-6  # the leak, fixed here


# ---------------------------------------------------------------------------------- kernel / fallback vs the spec
CASES = [  # B, H, H_kv, T, D, G, S, sink_logits, starts, ends
    pytest.param(1, 2, 2, 1, 16, 4, 2, False, None, None, id="T1"),
    pytest.param(1, 4, 2, 3, 16, 4, 5, True, None, None, id="T-below-S-gqa2-sinklogits"),
    pytest.param(1, 4, 2, 19, 16, 6, 2, False, None, None, id="T-not-multiple-of-G"),
    pytest.param(1, 2, 1, 7, 16, 12, 1, True, None, None, id="G-above-T-mqa"),
    pytest.param(1, 4, 4, 21, 20, 8, 0, True, None, None, id="plain-S2-odd-head-dim-20"),
    pytest.param(1, 4, 1, 26, 16, 8, 3, False, None, None, id="gqa4"),
    pytest.param(1, 3, 1, 18, 16, 6, 2, True, None, None, id="H-odd"),
    pytest.param(2, 4, 2, 23, 16, 8, 3, True, [0, 5], [23, 21], id="batch2-left-and-right-padding"),
    pytest.param(1, 2, 1, 70, 16, 8, 4, True, None, None, id="many-tiles-skipped"),
    pytest.param(1, 2, 2, 40, 16, 6, 18, False, None, None, id="sinks-span-two-tiles"),
]
DTYPES = [pytest.param(torch.float32, 2e-5, id="fp32")]
if GPU:
    DTYPES += [pytest.param(torch.float16, 5e-3, id="fp16"), pytest.param(torch.bfloat16, 3e-2, id="bf16")]


def run(backend, *args, **kwargs):
    if backend == "triton":
        return K.shifted_sparse_attention(*args, **kwargs)
    return dispatch.shifted_sparse_attention_torch(*args, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,ratio", DTYPES)
@pytest.mark.parametrize("B,H,H_kv,T,D,G,S,with_sink_logits,starts,ends", CASES)
def test_forward_and_gradients_match_spec(
    backend, dtype, ratio, B, H, H_kv, T, D, G, S, with_sink_logits, starts, ends
):
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H_kv, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H_kv, T, D, dtype=torch.float64, requires_grad=True)
    sink_logits = torch.randn(H, dtype=torch.float64, requires_grad=True) if with_sink_logits else None
    do = torch.randn(B, H, T, D, dtype=torch.float64)
    leaves = [q, k, v] + ([sink_logits] if with_sink_logits else [])

    out_ref, lse_ref = reference(q, k, v, G, S, 0.3, sink_logits, starts, ends)
    grads_ref = torch.autograd.grad((out_ref * do).sum(), leaves)

    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    bounds = (
        {}
        if starts is None
        else dict(valid_start=torch.tensor(starts, device=DEVICE), valid_end=torch.tensor(ends, device=DEVICE))
    )
    out, lse = run(backend, cast(q), cast(k), cast(v), G, S, 0.3, cast(sink_logits), **bounds)
    grads = torch.autograd.grad((out.double().cpu() * do).sum(), leaves)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, T)
    assert_close("out", out_ref, out, ratio)
    assert_close("lse", lse_ref, lse, ratio)
    for name, ref, got in zip(["dq", "dk", "dv", "dsink_logits"], grads_ref, grads):
        assert_close(name, ref, got, ratio)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_first_shifted_head_and_sliding_window(backend):
    """The two extras the registered sink_s2attn / sink_sfattn need: "plain heads first" and a sliding window."""
    torch.manual_seed(3)
    q = torch.randn(1, 3, 22, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 3, 22, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    do = torch.randn(1, 3, 22, 16, dtype=torch.float64)
    out_ref, _ = reference(q, k, v, 8, 2, 0.3, first_shifted_head=2, sliding_window=5)
    grads_ref = torch.autograd.grad((out_ref * do).sum(), [q, k, v])
    out, _ = run(backend, *(x.float().to(DEVICE) for x in (q, k, v)), 8, 2, 0.3, first_shifted_head=2, sliding_window=5)
    grads = torch.autograd.grad((out.double().cpu() * do).sum(), [q, k, v])
    assert_close("out", out_ref, out, 2e-5)
    for name, ref, got in zip(["dq", "dk", "dv"], grads_ref, grads):
        assert_close(name, ref, got, 2e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_causality(backend):
    """Changing tokens after t0 changes neither the outputs nor dq of the rows up to t0 (nothing wraps)."""
    torch.manual_seed(4)
    t0, length = 13, 29
    q, k, v = (torch.randn(1, 4, length, 16, device=DEVICE) for _ in range(3))
    do = torch.randn(1, 4, length, 16, device=DEVICE)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t0 + 1 :] = torch.randn_like(x[:, :, t0 + 1 :]) * 3
    results = []
    for tensors in ((q, k, v), (q2, k2, v2)):
        leaves = [x.clone().requires_grad_() for x in tensors]
        out, _ = run(backend, *leaves, 8, 2, None, torch.zeros(4, device=DEVICE))
        (dq,) = torch.autograd.grad((out * do).sum(), leaves[:1])
        results.append((out.detach(), dq))
    (out1, dq1), (out2, dq2) = results
    torch.testing.assert_close(out1[:, :, : t0 + 1], out2[:, :, : t0 + 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(dq1[:, :, : t0 + 1], dq2[:, :, : t0 + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(out1[:, :, t0 + 1 :], out2[:, :, t0 + 1 :])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_invisible_key_tiles_are_skipped(backend):
    """Work is O(T (G + S)): NaN in tokens a tile cannot see never reaches it (a visited tile would turn the NaN
    into NaN outputs through 0 * NaN). T = 70, G = 8, S = 4, tiles of 16: rows >= 48 visit the sink tile [0, 16) and
    their groups (from 44), never [16, 40); keys [16, 32) are seen by queries < 40 only."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 70, 16, device=DEVICE) for _ in range(3))
    do = torch.randn(1, 2, 70, 16, device=DEVICE)
    for x in (k, v):
        x[:, :, 16:40] = float("nan")
    out, _ = run(backend, q, k, v, 8, 4)
    assert torch.isfinite(out[:, :, 48:]).all() and torch.isnan(out[:, :, 20]).all()
    k, v = (torch.randn(1, 2, 70, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    q = torch.randn(1, 2, 70, 16, device=DEVICE)
    q[:, :, 48:] = float("nan")
    q.requires_grad_()
    out, _ = run(backend, q, k, v, 8, 4)
    dq, dk, dv = torch.autograd.grad((out * do).sum(), [q, k, v])
    assert torch.isfinite(dk[:, :, 16:32]).all() and torch.isfinite(dv[:, :, 16:32]).all()
    assert torch.isfinite(dq[:, :, :48]).all() and torch.isnan(dk[:, :, 0]).all()


def test_dispatcher_key_padding_mask_and_chunked_fallback(monkeypatch):
    """A 2D padding mask becomes per-row bounds; the fallback gives the same result in one-half-group chunks."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 17, 16, device=DEVICE) for _ in range(3))
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 15:] = False  # right padding
    out_ref, _ = reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), 4, 1, 16**-0.5, None, [4, 0], [17, 15])
    for backend in ("triton", "torch"):
        out, _ = dispatch.dispatch_shifted_sparse_attention(
            q, k, v, 4, 1, key_padding_mask=mask.to(DEVICE), backend=backend
        )
        assert_close(f"out ({backend})", out_ref, out, 2e-5)
    monkeypatch.setattr(dispatch, "CHUNK_ELEMENTS", 1)
    out, _ = dispatch.dispatch_shifted_sparse_attention(
        q, k, v, 4, 1, key_padding_mask=mask.to(DEVICE), backend="torch"
    )
    assert_close("out (torch, chunked)", out_ref, out, 2e-5)
    holes = mask.clone()
    holes[1, 3] = False
    with pytest.raises(ValueError, match="row 1 is not one contiguous run"):
        dispatch.dispatch_shifted_sparse_attention(q, k, v, 4, key_padding_mask=holes.to(DEVICE), backend="torch")
    start, end = dispatch.padding_bounds(torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]]))
    assert start.tolist() == [2, 0, 0] and end.tolist() == [4, 0, 3]


COMPILE_FOR_SM90 = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hf_sinks.kernels import shifted_sparse_attention as K

pointers = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
pointers.update({n: "*fp32" for n in ("LSE", "DELTA", "SINKS")}, VS="*i32", VE="*i32")
common = dict(GROUPS=4, HEAD_DIM=80, HEAD_DIM_V=80, BLOCK_D=128, BLOCK_DV=128, PRECISION="tf32")
jobs = [(K._shifted_sparse_attn_fwd_kernel, dict(BLOCK_M=64, BLOCK_N=64, HAS_SINK_LOGITS=True), 2),
        (K._shifted_sparse_attn_bwd_dkdv_kernel, dict(BLOCK_M=32, BLOCK_N=32), 1),
        (K._shifted_sparse_attn_bwd_dq_kernel, dict(BLOCK_M=32, BLOCK_N=32), 1)]
for fn, extra, stages in jobs:
    consts = {k: v for k, v in {**common, **extra}.items() if k in fn.arg_names}
    signature = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in ("qk_scale", "scaling") else "i32")
                 for n in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=stages))
    print("compiled", fn.__name__)
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: build the bf16 kernels for an H100 (sm_90) here, ahead
    of time, with the launchers' tile sizes and a head dim that is not a power of two (ptxas ships with triton)."""
    if GPU:
        pytest.skip("on a GPU the other tests compile the kernels")
    root = Path(__file__).resolve().parents[2]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("compiled") == 3


# --------------------------------------------------------------------------------------------------- errors
BAD = [
    pytest.param(dict(group_size=0), r"group_size must be a positive even int.*got 0", id="G0"),
    pytest.param(dict(group_size=-4), r"group_size.*got -4", id="G-negative"),
    pytest.param(dict(group_size=7), r"group_size must be a positive even int.*got 7", id="G-odd"),
    pytest.param(dict(num_sink_tokens=-1), r"num_sink_tokens must be an int >= 0; got -1", id="S-negative"),
    pytest.param(dict(k=torch.randn(1, 2, 9, 16)), r"k \(1, 2, 9, 16\).*do not match q \(1, 4, 8, 16\)", id="T-k"),
    pytest.param(dict(v=torch.randn(1, 2, 8, 16, 1)), r"must be \[B, H, T, D\]", id="v-5d"),
    pytest.param(
        dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)),
        r"query heads \(4\) must be a multiple of key/value heads \(3\)",
        id="heads",
    ),
    pytest.param(dict(sink_logits=torch.zeros(3)), r"sink_logits must be \[H\] = \[4\]; got \(3,\)", id="sinks"),
    pytest.param(
        dict(valid_start=torch.zeros(2, dtype=torch.long)), r"valid_start must be \[B\] = \[1\]", id="valid-start"
    ),
    pytest.param(
        dict(valid_end=torch.tensor([9])),
        r"valid_end <= T = 8 in every row; got valid_start \[0\], "
        r"valid_end \[9\]",
        id="valid-end-past-T",
    ),
    pytest.param(
        dict(valid_start=torch.tensor([3]), valid_end=torch.tensor([2])),
        r"valid_start <= valid_end",
        id="valid-start-after-end",
    ),
    pytest.param(dict(first_shifted_head=5), r"first_shifted_head must be an int in \[0, 4\]; got 5", id="first"),
]


@pytest.mark.parametrize("entry", ["kernel", "dispatcher", "fallback"])
@pytest.mark.parametrize("override,message", BAD)
def test_bad_arguments_name_the_value(entry, override, message):
    args = dict(
        q=torch.randn(1, 4, 8, 16),
        k=torch.randn(1, 2, 8, 16),
        v=torch.randn(1, 2, 8, 16),
        group_size=4,
        num_sink_tokens=1,
    )
    args.update(override)
    args = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in args.items()}
    fn = {
        "kernel": K.shifted_sparse_attention,
        "dispatcher": dispatch.dispatch_shifted_sparse_attention,
        "fallback": dispatch.shifted_sparse_attention_torch,
    }[entry]
    with pytest.raises(ValueError, match=message):
        fn(**args)


# ------------------------------------------------------------------------------------------ backend selection
def _tiny():
    return [torch.randn(1, 2, 5, 16, device=DEVICE) for _ in range(3)] + [4]


def test_disable_and_force_triton(monkeypatch):
    args = _tiny()
    expected, _ = K.shifted_sparse_attention(*args)
    monkeypatch.setenv("HF_SINKS_DISABLE_TRITON", "1")
    assert dispatch.select_backend(DEVICE) == "torch"
    out, _ = dispatch.dispatch_shifted_sparse_attention(*args)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match=r"forced \(backend='triton'\).*HF_SINKS_DISABLE_TRITON=1 is set"):
        dispatch.dispatch_shifted_sparse_attention(*args, backend="triton")
    monkeypatch.setenv("HF_SINKS_FORCE_TRITON", "1")
    with pytest.raises(RuntimeError, match=r"forced \(HF_SINKS_FORCE_TRITON=1\).*HF_SINKS_DISABLE_TRITON=1"):
        dispatch.dispatch_shifted_sparse_attention(*args)


def test_forcing_triton_without_cuda_or_interpreter_names_the_reason(monkeypatch):
    monkeypatch.setattr(K, "INTERPRET", False)  # as if imported without TRITON_INTERPRET on a CPU-only machine
    monkeypatch.setattr(K, "LANGUAGE_INTERPRETED", False)
    args = [x.cpu() for x in _tiny()[:3]] + [4]
    assert dispatch.select_backend("cpu") == "torch"
    dispatch.dispatch_shifted_sparse_attention(*args)  # auto: falls back silently
    with pytest.raises(RuntimeError, match="shifted sparse attention was forced .* the tensors are on 'cpu'"):
        dispatch.dispatch_shifted_sparse_attention(*args, backend="triton")
    monkeypatch.setenv("HF_SINKS_FORCE_TRITON", "1")
    with pytest.raises(RuntimeError, match=r"HF_SINKS_FORCE_TRITON=1\) but cannot run: the tensors are on 'cpu'"):
        dispatch.dispatch_shifted_sparse_attention(*args)
    with pytest.raises(RuntimeError, match="cannot run: the tensors are on 'cpu'"):
        K.shifted_sparse_attention(*args)  # the kernel module's own entry point refuses too
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.select_backend("cpu", backend="cuda")


def test_interpreter_set_too_late_is_named(monkeypatch):
    monkeypatch.setattr(K, "LANGUAGE_INTERPRETED", not K.INTERPRET)
    with pytest.raises(RuntimeError, match="set it before anything imports triton"):
        dispatch.select_backend(DEVICE, backend="triton")
