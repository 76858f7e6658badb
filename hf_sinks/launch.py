"""Helpers for programs launched as several processes (``torchrun``, ``accelerate launch``).

Library code: no command-line imports; used by ``python -m hf_sinks.cli`` and the multi-process examples.
"""

from __future__ import annotations

import os
import sys


def exit_process(status: int) -> None:
    """Leave the process with ``status``.

    A rank of a multi-process run (``WORLD_SIZE`` > 1) leaves through ``os._exit`` after flushing stdout and stderr:
    with torch 2.13 on CPU a gloo rank that finished, passed the final barrier and destroyed its process group still
    aborts now and then while the interpreter shuts down ("terminate called without an active exception", SIGABRT,
    ~1 run in 25 here), which fails the whole ``torchrun``. Nothing is left to do at that point. A single process
    leaves through ``sys.exit(status)`` as usual.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


__all__ = ["exit_process"]
