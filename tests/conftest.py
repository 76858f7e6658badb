"""Test setup and fixtures: offline, one torch thread (15x faster here), Triton's interpreter without CUDA.

Shared helpers (tiny models, token ids, padded batches, masks) are in tests/helpers.py: ``from helpers import ...``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Triton kernels (tests/kernels) run under the interpreter without CUDA. It must be on before anything imports triton:
# torch._dynamo does, and hf_sinks imports it. `TRITON_INTERPRET=0 pytest tests/kernels` is the GPU lane.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_sinks  # noqa: E402,F401  (its attention names are registered once transformers' model code imports)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
