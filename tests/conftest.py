"""Test setup: Triton kernels run on the CPU interpreter unless a CUDA GPU is present.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it is set here,
before any test imports dft_ops.kernels. The compile-for-GPU checks need the
opposite and run in a subprocess without it (test_compile.py).
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed(request):
    # a different, reproducible draw for every test
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
