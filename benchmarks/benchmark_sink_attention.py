#!/usr/bin/env python
"""Sink attention kernels on CUDA: the Triton kernel vs SDPA with an explicit mask vs flex attention.

Needs a CUDA GPU (on a machine without one it says so and exits 0; ``--smoke`` runs the code paths on CPU under the
Triton interpreter with tiny shapes, to check the script, not to time anything).

Shapes: a Llama-3-8B attention layer (32 query heads, 8 KV heads, head dim 128), batch 1 by default, fp16 and bf16.

* decode (one query over a full cache of N = 1k..64k tokens: 4 sinks + a window of N - 4; all of it visible).
  Reported: achieved bandwidth, ``GB/s = bytes of K and V read / time`` (the floor a decode kernel is bound by).
* prefill (a T = 4k..32k-token prompt in one chunk, 4 sinks + window 1020, the hf_sinks default capacity 1024).
  Reported: ``TFLOP/s = 4 * B * H * D * (visible query-key pairs) / time`` (useful work only, same count for every
  provider, so a dense kernel that computes masked-out blocks scores lower).

Providers (``kernel`` rows take the same raw tensors; ``layer`` rows are the registered attention functions called as
a model calls them, through a ``SinkCache``, bookkeeping included):

==================== ======================================================================================
``triton``           ``hf_sinks.kernels.sink_attention``: visibility from real indices, per-query sink rotation
                     in-kernel (prefill), split-KV decode
``sdpa_mask``        ``F.scaled_dot_product_attention`` with an explicit boolean mask of the visibility rule (no
                     sink re-rotation: a cost floor for a dense masked kernel)
``sdpa_nomask``      decode only: SDPA without a mask (flash kernel; the "plain KV cache" reference)
``flex``             ``torch.compile(flex_attention)`` with a block mask from the sink+window ``mask_mod``
``layer:sink_sdpa``  the registered ``sink_sdpa`` function + SinkCache (doubled head dim, blocked queries)
``layer:sink_triton`` the registered ``sink_triton`` function + SinkCache
==================== ======================================================================================

Timing: ``triton.testing.do_bench`` (median, 20th and 80th percentiles, ms). Results are written as a long-format CSV
(one row per provider x mode x dtype x size, with GPU name, versions and timestamp) and a PNG beside it::

    python benchmarks/benchmark_sink_attention.py           # writes docs/benchmarks/sink_attention.{csv,png}
    python benchmarks/benchmark_sink_attention.py --modes decode --dtypes bf16 --decode-sizes 4096 65536
    python benchmarks/benchmark_sink_attention.py --smoke                 # CPU: check the script only
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import common

OUT_DIR = common.DOCS_RESULTS
DTYPES = common.DTYPES
DECODE_PROVIDERS = ("triton", "sdpa_mask", "sdpa_nomask", "flex", "layer:sink_sdpa", "layer:sink_triton")
PREFILL_PROVIDERS = ("triton", "sdpa_mask", "flex", "layer:sink_sdpa", "layer:sink_triton")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--decode-sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="cache tokens")
    p.add_argument("--prefill-sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="prompt tokens")
    p.add_argument("--providers", nargs="+", default=None, help="subset of providers (default: all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sinks", type=int, default=4, help="num_sink_tokens S")
    p.add_argument("--window", type=int, default=1020, help="window W for prefill (decode uses N - S)")
    p.add_argument("--out", type=Path, default=OUT_DIR / "sink_attention.csv", help="CSV path; the PNG goes beside it")
    p.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET, tiny shapes: checks the script only")
    args = p.parse_args(argv)
    if args.smoke:
        args.dtypes, args.decode_sizes, args.prefill_sizes = ["fp32"], [40], [48]
        args.heads, args.kv_heads, args.head_dim, args.sinks, args.window = 4, 2, 32, 2, 9
        if args.out == OUT_DIR / "sink_attention.csv":
            args.out = common.SMOKE_DIR / "sink_attention.csv"
    return args


ARGS = parse_args(sys.argv[1:])
common.smoke_environment(ARGS.smoke)  # before anything imports triton

import torch  # noqa: E402

common.exit_without_cuda("benchmark_sink_attention.py", ARGS.smoke)

import torch.nn.functional as F  # noqa: E402

import hf_sinks  # noqa: E402,F401  (registers the attention names)
from hf_sinks.attention import sink_sdpa_attention_forward, sink_triton_attention_forward  # noqa: E402
from hf_sinks.kernels import sink_attention as K  # noqa: E402
from hf_sinks.rope import RotaryParams  # noqa: E402

DEVICE = "cpu" if ARGS.smoke else "cuda"
MODULE = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
LAYER_FUNCTIONS = {"layer:sink_sdpa": sink_sdpa_attention_forward, "layer:sink_triton": sink_triton_attention_forward}


def timer(fn):
    """(median, p20, p80) ms: do_bench on CUDA; a few plain runs in smoke mode."""
    return common.timer(fn, ARGS.smoke)


def rotary(head_dim):
    inv_freq = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return RotaryParams(inv_freq.float(), head_dim)


def visible_pairs(t_q_real, t_k_real, s, w):
    """Number of (query, key) pairs the sink+window rule lets through (for the FLOP count)."""
    r = t_q_real[:, None]
    j = t_k_real[None, :]
    return int(((j >= 0) & (j <= r) & ((j < s) | (r - j < w))).sum())


def flex_fn(s, w, q_offset, q_len, kv_len):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        r = q_idx + q_offset
        return (kv_idx <= r) & ((kv_idx < s) | (r - kv_idx < w))

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, scale: compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


# --------------------------------------------------------------------------------------------------- decode
def bench_decode(n, dtype, providers):
    b, h, hk, d, s = ARGS.batch, ARGS.heads, ARGS.kv_heads, ARGS.head_dim, ARGS.sinks
    w = n - s
    scale = d**-0.5
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(b, h, 1, d, device=DEVICE, dtype=dtype, generator=gen)
    k = torch.randn(b, hk, n, d, device=DEVICE, dtype=dtype, generator=gen)
    v = torch.randn(b, hk, n, d, device=DEVICE, dtype=dtype, generator=gen)
    # a full ring: slot i holds real index (sinks, then the last W tokens in ring order) for a stream of n + 37 tokens
    seen = n + 37
    ring = torch.arange(seen - w, seen, device=DEVICE)
    slots = s + (ring - s) % w
    k_real = torch.empty(n, dtype=torch.long, device=DEVICE)
    k_real[:s] = torch.arange(s, device=DEVICE)
    k_real[slots] = ring
    k_real = k_real[None].expand(b, n).contiguous()
    q_real = torch.full((b, 1), seen - 1, device=DEVICE)
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=DEVICE)
    nbytes = 2 * b * hk * n * d * q.element_size()
    fns = {
        "triton": lambda: K.sink_attention(q, k, v, q_real, k_real, None, s, w, None, 0, scale),
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
        "sdpa_nomask": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
    }
    if "flex" in providers:
        flex = flex_fn(s, w, n - 1, 1, n)  # the query sits after the whole (contiguous-order) cache
        fns["flex"] = lambda: flex(q, k, v, scale)
    for name, fn in LAYER_FUNCTIONS.items():
        if name in providers:
            fns[name] = _decode_layer(fn, n, dtype, gen)
    # sanity: the triton kernel and SDPA agree when everything is visible
    out_t, _ = fns["triton"]()
    err = float((out_t.float() - fns["sdpa_nomask"]().float()).abs().max())
    rows = []
    for name in providers:
        if name not in fns:
            continue
        ms = timer(fns[name])
        gbps = nbytes / (ms[0] * 1e-3) / 1e9
        rows.append(_row("decode", name, dtype, "cache_tokens", n, ms, "GB/s", gbps, err, s, w))
    return rows


def _decode_layer(attention, n, dtype, gen):
    b, h, hk, d, s = ARGS.batch, ARGS.heads, ARGS.kv_heads, ARGS.head_dim, ARGS.sinks
    cache = hf_sinks.SinkCache(s, n - s, rotary=rotary(d))
    prompt = n + 16  # full and evicting
    k = torch.randn(b, hk, prompt, d, device=DEVICE, dtype=dtype, generator=gen)
    keys, values = cache.update(k, k.clone(), 0)
    pos = torch.arange(prompt, device=DEVICE)[None]
    sink_triton_attention_forward(
        MODULE,
        torch.randn(b, h, prompt, d, device=DEVICE, dtype=dtype, generator=gen),
        keys,
        values,
        None,
        position_ids=pos,
    )  # prefill (commits the chunk)
    q1 = torch.randn(b, h, 1, d, device=DEVICE, dtype=dtype, generator=gen)
    k1 = torch.randn(b, hk, 1, d, device=DEVICE, dtype=dtype, generator=gen)
    state = {"pos": prompt}

    def step():
        keys, values = cache.update(k1, k1, 0)
        out = attention(MODULE, q1, keys, values, None, position_ids=torch.full((b, 1), state["pos"], device=DEVICE))
        state["pos"] += 1
        return out

    return step


# -------------------------------------------------------------------------------------------------- prefill
def bench_prefill(t, dtype, providers):
    b, h, hk, d, s, w = ARGS.batch, ARGS.heads, ARGS.kv_heads, ARGS.head_dim, ARGS.sinks, ARGS.window
    scale = d**-0.5
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, generator=gen)
    k = torch.randn(b, hk, t, d, device=DEVICE, dtype=dtype, generator=gen)
    v = torch.randn(b, hk, t, d, device=DEVICE, dtype=dtype, generator=gen)
    real = torch.arange(t, device=DEVICE)[None].expand(b, t).contiguous()
    shift = real - real.clamp(max=s + w - 1)
    rp = rotary(d)
    inv_freq = rp.inv_freq.to(DEVICE)
    ar = torch.arange(t, device=DEVICE)
    visible = (ar[None, :] <= ar[:, None]) & ((ar[None, :] < s) | (ar[:, None] - ar[None, :] < w))
    mask = visible[None, None]
    flops = 4 * b * h * d * int(visible.sum())
    fns = {
        "triton": lambda: K.sink_attention(q, k, v, real, real, shift, s, w, inv_freq, d, scale),
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
    }
    if "flex" in providers:
        flex = flex_fn(s, w, 0, t, t)
        fns["flex"] = lambda: flex(q, k, v, scale)
    for name, fn in LAYER_FUNCTIONS.items():
        if name in providers:
            fns[name] = _prefill_layer(fn, q, k, v, rp)
    # sanity: without the sink re-rotation the kernel must equal SDPA with the dense mask
    out_t, _ = K.sink_attention(q, k, v, real, real, None, s, w, None, 0, scale)
    err = float((out_t.float() - fns["sdpa_mask"]().float()).abs().max())
    del visible
    rows = []
    for name in providers:
        if name not in fns:
            continue
        ms = timer(fns[name])
        tflops = flops / (ms[0] * 1e-3) / 1e12
        rows.append(_row("prefill", name, dtype, "prompt_tokens", t, ms, "TFLOP/s", tflops, err, s, w))
    return rows


def _prefill_layer(attention, q, k, v, rp):
    t = q.shape[2]
    pos = torch.arange(t, device=DEVICE)[None]

    def call():
        cache = hf_sinks.SinkCache(ARGS.sinks, ARGS.window, rotary=rp)
        keys, values = cache.update(k, v, 0)
        return attention(MODULE, q, keys, values, None, position_ids=pos)

    return call


# ---------------------------------------------------------------------------------------------------- output
def _row(mode, provider, dtype, x_name, x_value, ms, metric, value, err, s, w):
    return {
        "kernel_name": "sink_attention",
        "mode": mode,
        "provider": provider,
        "dtype": str(dtype).replace("torch.", ""),
        "x_name": x_name,
        "x_value": x_value,
        "ms_50": round(ms[0], 5),
        "ms_20": round(ms[1], 5),
        "ms_80": round(ms[2], 5),
        "metric_name": metric,
        "metric_value": round(value, 3),
        "max_abs_diff_triton_vs_sdpa": f"{err:.2e}",
        "batch": ARGS.batch,
        "heads": ARGS.heads,
        "kv_heads": ARGS.kv_heads,
        "head_dim": ARGS.head_dim,
        "num_sink_tokens": s,
        "window_length": w,
        **common.provenance(DEVICE),
    }


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("decode", "prefill") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        for provider in dict.fromkeys(r["provider"] for r in sel):
            for dtype in dict.fromkeys(r["dtype"] for r in sel):
                pts = sorted(
                    (r["x_value"], r["metric_value"]) for r in sel if r["provider"] == provider and r["dtype"] == dtype
                )
                if pts:
                    style = "-" if dtype == "float16" else "--"
                    ax.plot(*zip(*pts), style, marker="o", label=f"{provider} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(sel[0]["x_name"].replace("_", " "))
        ax.set_ylabel(sel[0]["metric_name"])
        window = "W=N-S" if mode == "decode" else f"W={sel[0]['window_length']}"
        ax.set_title(f"{mode}: S={sel[0]['num_sink_tokens']}, {window}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(
        f"sink attention, B={first['batch']} H={first['heads']} H_kv={first['kv_heads']} "
        f"D={first['head_dim']}; "
        f"{first['device']}; torch {first['torch']}, triton {first['triton']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    rows = []
    for dtype_name in ARGS.dtypes:
        dtype = getattr(torch, DTYPES[dtype_name])
        jobs = []
        if "decode" in ARGS.modes:
            providers = [p for p in DECODE_PROVIDERS if ARGS.providers is None or p in ARGS.providers]
            jobs += [(bench_decode, n, providers) for n in ARGS.decode_sizes]
        if "prefill" in ARGS.modes:
            providers = [p for p in PREFILL_PROVIDERS if ARGS.providers is None or p in ARGS.providers]
            jobs += [(bench_prefill, t, providers) for t in ARGS.prefill_sizes]
        for bench, size, providers in jobs:
            new = bench(size, dtype, providers)
            for r in new:
                print(
                    f"{r['mode']:>7} {r['dtype']:>8} {r['x_value']:>6} {r['provider']:<18} {r['ms_50']:>10.4f} ms "
                    f"{r['metric_value']:>10.2f} {r['metric_name']}  (triton vs sdpa max|diff| "
                    f"{r['max_abs_diff_triton_vs_sdpa']})",
                    flush=True,
                )
            rows += new
    common.write_csv(rows, ARGS.out)
    plot(rows, ARGS.out.with_suffix(".png"))
    print(f"wrote {ARGS.out} and {ARGS.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
