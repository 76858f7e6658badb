"""Memory measurements for the streaming evaluations: KV-cache bytes (exact) and process memory (peak growth).

Two numbers, because on CPU only one of them is exact:

* **KV-cache bytes** (:func:`cache_bytes`): the bytes of every tensor the cache object holds (keys, values, and a
  ``SinkCache``'s sink originals and small index tensors), i.e. what a cache occupies after a step. Deterministic,
  cheap, identical on CPU and GPU. A ``SinkCache`` allocates its ``S + W`` slots on the first token, so its curve
  is flat from the start; a ``DynamicCache`` grows linearly.
* **Peak memory growth** (:class:`MemoryMeter`): on CUDA, ``torch.cuda.max_memory_allocated()`` over the run minus
  what was allocated when it started (weights excluded; transient activations included). On CPU, the growth of
  the process resident set size (RSS, ``/proc/self/statm`` or ``psutil``) over its value at the start, sampled after
  every step/chunk: it includes the cache and whatever the allocator keeps, but can miss transient peaks inside a
  forward and depends on what the allocator returns to the OS. Treat it as indicative.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def cache_bytes(cache: Any) -> int:
    """Bytes of all tensors held by ``cache``'s layers (0 for ``None``); distinct storages counted once."""
    return sum(cache_layer_bytes(cache))


def cache_layer_bytes(cache: Any) -> list[int]:
    """Bytes held by each layer of ``cache`` (docs/design.md §2.3: memory follows the layers, so a ``SinkCache``
    sliding layer whose window fits the cache holds only that window, a global layer ``S + W`` slots)."""
    if cache is None:
        return []
    seen: set[int] = set()
    out = []
    for layer in getattr(cache, "layers", ()):
        total = 0
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                key = value.untyped_storage().data_ptr()
                if key in seen:
                    continue
                seen.add(key)
                total += value.untyped_storage().nbytes()
        out.append(total)
    return out


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (``/proc/self/statm``, else ``psutil``, else 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 (psutil missing or unsupported platform)
        return 0


class MemoryMeter:
    """Peak memory growth over a run: CUDA allocated bytes on a CUDA device, process RSS on CPU.

    ``kind`` says which: ``"cuda_max_allocated"`` or ``"cpu_rss"``.
    """

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_rss"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        else:
            self.start = rss_bytes()
        self.peak = 0

    def sample(self) -> int:
        """Current growth over the start (CPU: RSS now; CUDA: allocated now); updates the peak."""
        if self.cuda:
            now = torch.cuda.memory_allocated(self.device) - self.start
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self.start)
        else:
            now = rss_bytes() - self.start
            self.peak = max(self.peak, now)
        return now

    def peak_bytes(self) -> int:
        self.sample()
        return max(0, int(self.peak))


__all__ = ["MemoryMeter", "cache_bytes", "rss_bytes"]
