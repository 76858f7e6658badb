"""What the benchmark scripts share: where results go, the smoke/CUDA set-up, timing, provenance columns, CSV.

Imported as ``import common`` by the scripts in this folder (``python benchmarks/<script>.py`` puts the folder on the
path). Nothing heavy at import time: :func:`smoke_environment` must run before anything imports triton.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Where the results shown in the docs live (one folder or file pair per measurement; see docs/benchmarks/README.md).
DOCS_RESULTS = ROOT / "docs" / "benchmarks"
#: Where ``--smoke`` runs write instead of the docs.
SMOKE_DIR = Path("/tmp/hf_sinks_benchmark_smoke")
#: ``--dtypes`` names of the kernel benchmarks.
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def smoke_environment(smoke: bool) -> None:
    """``--smoke``: Triton's interpreter on CPU tensors. Call before anything imports triton (torch._dynamo does)."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def exit_without_cuda(script: str, smoke: bool) -> None:
    """Exit 0 with a message when a GPU benchmark runs without CUDA (``--smoke`` checks the script on CPU)."""
    import torch

    if not smoke and not torch.cuda.is_available():
        print(
            f"{script} needs a CUDA GPU (the Triton kernels are timed there, never on CPU); no CUDA device found, "
            "nothing to do. Use --smoke to check the script on CPU."
        )
        sys.exit(0)


def timer(fn, smoke: bool, grads=None) -> tuple[float, float, float]:
    """(median, p20, p80) ms: ``triton.testing.do_bench`` on CUDA; two plain runs in smoke mode."""
    if smoke:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[len(times) // 2], times[0], times[-1]
    import triton

    kwargs = {} if grads is None else {"grad_to_none": grads}
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], **kwargs))


def provenance(device: str) -> dict:
    """The columns every kernel-benchmark row ends with: device, UTC timestamp, package versions."""
    import torch
    import transformers
    import triton

    import hf_sinks

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke, TRITON_INTERPRET=1)",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hf_sinks": hf_sinks.__version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }


def machine() -> str:
    """``"<CPU model>; <n> cores; <OS>"``."""
    from hf_sinks.eval.machine import cpu_name  # here, not at import: smoke_environment() runs before hf_sinks loads

    return f"{cpu_name()}; {os.cpu_count()} cores; {platform.system()}"


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` (dicts with the same keys) as a CSV at ``path``, its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
