"""Benchmark the shifted sparse attention kernel (S²-Attn / SF-Attn training, forward and forward + backward).

Providers (the same visibility everywhere: causal, inside the group of each head's partition, plus ``S`` sinks):

==================== ======================================================================================
``triton``           ``hf_sinks.kernels.shifted_sparse_attention`` (skips invisible key tiles: O(T (G + S)))
``torch``            the PyTorch twin ``shifted_sparse_attention_torch`` (half-group blocks, autograd)
``sdpa_mask``        ``F.scaled_dot_product_attention`` with an explicit ``[T, T]`` boolean mask, one call per
                     head half (plain / shifted partition); O(T^2) work and mask memory
``flex``             compiled ``flex_attention`` with a ``BlockMask`` from the same rule (per-head ``mask_mod``)
==================== ======================================================================================

Timing: ``triton.testing.do_bench`` (median, 20th and 80th percentiles, ms); forward+backward times one forward and
one backward with a fixed upstream gradient. TFLOP/s counts only the visible (query, key) pairs (forward ``4 D`` per
pair, backward 2.5x the forward), so every provider is measured against the same useful work; peak memory is
``torch.cuda.max_memory_allocated`` during the timed calls. Results go to a long-format CSV (one row per provider x
mode x dtype x length, with GPU name, versions and timestamp) and a PNG beside it::

    # writes docs/benchmarks/shifted_sparse_attention.{csv,png}
    python benchmarks/benchmark_shifted_sparse_attention.py
    python benchmarks/benchmark_shifted_sparse_attention.py --group-size 2048 --sinks 0 --dtypes bf16
    python benchmarks/benchmark_shifted_sparse_attention.py --smoke      # CPU: check the script only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common

OUT_DIR = common.DOCS_RESULTS
DTYPES = common.DTYPES
PROVIDERS = ("triton", "torch", "sdpa_mask", "flex")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="sequence lengths T")
    p.add_argument("--group-size", type=int, default=None, help="fixed group size G (default: T * --group-ratio)")
    p.add_argument("--group-ratio", type=float, default=0.25, help="G = T * ratio (LongLoRA: 1/4)")
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS, help="subset (default: all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sinks", type=int, default=4, help="num_sink_tokens S (0: plain S²-Attn)")
    p.add_argument(
        "--out", type=Path, default=OUT_DIR / "shifted_sparse_attention.csv", help="CSV path; the PNG goes beside it"
    )
    p.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET, tiny shapes: checks the script only")
    args = p.parse_args(argv)
    if args.smoke:
        args.dtypes, args.sizes, args.group_size = ["fp32"], [48], 16
        args.heads, args.kv_heads, args.head_dim, args.sinks = 4, 2, 32, 2
        if args.providers is None:  # flex on CPU: compile is slow and there is no backward
            args.providers = ["triton", "torch", "sdpa_mask"]
        if args.out == OUT_DIR / "shifted_sparse_attention.csv":
            args.out = common.SMOKE_DIR / "shifted_sparse_attention.csv"
    return args


ARGS = parse_args(sys.argv[1:])
common.smoke_environment(ARGS.smoke)  # before anything imports triton

import torch  # noqa: E402

common.exit_without_cuda("benchmark_shifted_sparse_attention.py", ARGS.smoke)

import torch.nn.functional as F  # noqa: E402

import hf_sinks  # noqa: E402,F401  (registers the attention names)
from hf_sinks.attention.shifted_sparse_kernel import shifted_sparse_attention_torch  # noqa: E402
from hf_sinks.kernels import shifted_sparse_attention as K  # noqa: E402

DEVICE = "cpu" if ARGS.smoke else "cuda"


def timer(fn, grads):
    """(median, p20, p80) ms: do_bench on CUDA; a few plain runs in smoke mode."""
    return common.timer(fn, ARGS.smoke, grads)


def visible_pairs(t, g, s, shifted):
    """Visible (query, key) pairs of one head: the query's group up to itself plus the sinks before the group."""
    i = torch.arange(t, dtype=torch.float64)
    off = g // 2 if shifted else 0
    start = (torch.div(i + off, g, rounding_mode="floor") * g - off).clamp(min=0)
    return int((i - start + 1 + torch.minimum(start, torch.tensor(float(s)))).sum())


def head_masks(t, g, s):
    """``[T, T]`` boolean masks of the plain and the shifted heads (for ``sdpa_mask``)."""
    i = torch.arange(t, device=DEVICE)[:, None]
    j = torch.arange(t, device=DEVICE)[None, :]
    return [
        (j <= i)
        & ((j < s) | (torch.div(i + off, g, rounding_mode="floor") == torch.div(j + off, g, rounding_mode="floor")))
        for off in (0, g // 2)
    ]


def sdpa_fn(g, s, t, heads):
    masks = head_masks(t, g, s)
    half = heads // 2

    def call(q, k, v, scale):
        groups = q.shape[1] // k.shape[1]
        outs = []
        for mask, (h0, h1) in zip(masks, ((0, half), (half, heads))):
            kv = torch.arange(h0, h1, device=q.device) // groups  # each query head's KV head (a copy, as repeat_kv)
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, h0:h1], k.index_select(1, kv), v.index_select(1, kv), attn_mask=mask, scale=scale
                )
            )
        return torch.cat(outs, dim=1)

    return call


def flex_fn(g, s, t, heads):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    half = heads // 2

    def mask_mod(b, h, q_idx, kv_idx):
        off = (h >= half).to(q_idx.dtype) * (g // 2)
        return (kv_idx <= q_idx) & ((kv_idx < s) | ((q_idx + off) // g == (kv_idx + off) // g))

    block_mask = create_block_mask(mask_mod, B=None, H=heads, Q_LEN=t, KV_LEN=t, device=DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, scale: compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def bench(t, dtype, mode, providers):
    b, h, hk, d, s = ARGS.batch, ARGS.heads, ARGS.kv_heads, ARGS.head_dim, ARGS.sinks
    g = ARGS.group_size or max(2, int(t * ARGS.group_ratio) // 2 * 2)
    scale = d**-0.5
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    backward = mode == "fwd+bwd"
    q = torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, generator=gen).requires_grad_(backward)
    k = torch.randn(b, hk, t, d, device=DEVICE, dtype=dtype, generator=gen).requires_grad_(backward)
    v = torch.randn(b, hk, t, d, device=DEVICE, dtype=dtype, generator=gen).requires_grad_(backward)
    do = torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, generator=gen)
    pairs = (h // 2) * visible_pairs(t, g, s, False) + (h - h // 2) * visible_pairs(t, g, s, True)
    flops = 4 * b * d * pairs * (3.5 if backward else 1.0)
    forwards = {
        "triton": lambda: K.shifted_sparse_attention(q, k, v, g, s, scale)[0],
        "torch": lambda: shifted_sparse_attention_torch(q, k, v, g, s, scale)[0],
    }
    if "sdpa_mask" in providers:
        sdpa = sdpa_fn(g, s, t, h)
        forwards["sdpa_mask"] = lambda: sdpa(q, k, v, scale)
    if "flex" in providers:
        flex = flex_fn(g, s, t, h)
        forwards["flex"] = lambda: flex(q, k, v, scale)
    with torch.no_grad():  # sanity: the kernel agrees with SDPA + the dense mask (or the PyTorch twin)
        other = "sdpa_mask" if "sdpa_mask" in forwards else "torch"
        err = float((forwards["triton"]().float() - forwards[other]().float()).abs().max())
    rows = []
    for name in providers:
        if name not in forwards:
            continue
        forward = forwards[name]
        fn = (lambda f=forward: f().backward(do)) if backward else forward
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            ms = timer(fn, [q, k, v] if backward else None)
        except torch.OutOfMemoryError:
            print(f"{mode:>7} {t:>6} {name:<10} out of memory", flush=True)
            torch.cuda.empty_cache()
            continue
        peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else float("nan")
        tflops = flops / (ms[0] * 1e-3) / 1e12
        rows.append(_row(mode, name, dtype, t, g, ms, tflops, peak, err))
    return rows


# ---------------------------------------------------------------------------------------------------- output
def _row(mode, provider, dtype, t, g, ms, tflops, peak, err):
    return {
        "kernel_name": "shifted_sparse_attention",
        "mode": mode,
        "provider": provider,
        "dtype": str(dtype).replace("torch.", ""),
        "x_name": "seq_len",
        "x_value": t,
        "group_size": g,
        "ms_50": round(ms[0], 5),
        "ms_20": round(ms[1], 5),
        "ms_80": round(ms[2], 5),
        "metric_name": "TFLOP/s",
        "metric_value": round(tflops, 4),
        "peak_mem_mib": round(peak, 1),
        "max_abs_diff_triton_vs_ref": f"{err:.2e}",
        "batch": ARGS.batch,
        "heads": ARGS.heads,
        "kv_heads": ARGS.kv_heads,
        "head_dim": ARGS.head_dim,
        "num_sink_tokens": ARGS.sinks,
        **common.provenance(DEVICE),
    }


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        for provider in dict.fromkeys(r["provider"] for r in sel):
            for dtype in dict.fromkeys(r["dtype"] for r in sel):
                pts = sorted(
                    (r["x_value"], r["ms_50"]) for r in sel if r["provider"] == provider and r["dtype"] == dtype
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{provider} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("ms (median)")
        group = f"G={ARGS.group_size}" if ARGS.group_size else f"G=T*{ARGS.group_ratio:g}"
        ax.set_title(f"{mode}: {group}, S={sel[0]['num_sink_tokens']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(
        f"shifted sparse attention, B={first['batch']} H={first['heads']} H_kv={first['kv_heads']} "
        f"D={first['head_dim']}; {first['device']}; torch {first['torch']}, triton {first['triton']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    providers = [p for p in PROVIDERS if ARGS.providers is None or p in ARGS.providers]
    rows = []
    for dtype_name in ARGS.dtypes:
        dtype = getattr(torch, DTYPES[dtype_name])
        for mode in ARGS.modes:
            for t in ARGS.sizes:
                new = bench(t, dtype, mode, providers)
                for r in new:
                    print(
                        f"{r['mode']:>7} {r['dtype']:>8} {r['x_value']:>6} G={r['group_size']:<6} "
                        f"{r['provider']:<10} {r['ms_50']:>10.4f} ms {r['metric_value']:>9.2f} TFLOP/s "
                        f"{r['peak_mem_mib']:>9.1f} MiB  (triton vs ref max|diff| "
                        f"{r['max_abs_diff_triton_vs_ref']})",
                        flush=True,
                    )
                rows += new
    common.write_csv(rows, ARGS.out)
    plot(rows, ARGS.out.with_suffix(".png"))
    print(f"wrote {ARGS.out} and {ARGS.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
