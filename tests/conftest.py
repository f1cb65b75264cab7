"""Test setup: Triton kernels run on the CPU interpreter unless a CUDA GPU is present.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it is set here,
before any test imports dft_ops.kernels. The compile-for-GPU checks need the
opposite and run in a subprocess without it (test_compile.py).

On a GPU machine every test's tensors go to the GPU through the ``device`` fixture
(``DEVICE`` for module-level code); tests/gpu_smoke.py lists the curated GPU set
(``pytest -m gpu_smoke``, marked here) and the error model of hardware arithmetic.
"""

import os
import zlib

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    """Mark the curated GPU set (tests/gpu_smoke.py) so that ``-m gpu_smoke`` selects it; under pytest-xdist
    (``-n 6 --dist loadgroup``: the window's compiles in parallel) the tests holding tens of GB of the GPU
    share one worker, so two of them never run at once."""
    from gpu_smoke import GPU_SMOKE, ONE_AT_A_TIME

    wanted = set(GPU_SMOKE)
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if item.nodeid in wanted:
            item.add_marker(pytest.mark.gpu_smoke)
        if xdist and item.nodeid.split("[")[0] in ONE_AT_A_TIME:
            item.add_marker(pytest.mark.xdist_group("large-gpu-memory"))


@pytest.fixture(autouse=True)
def _seed(request):
    # a different draw for every test, the same on every run (str hash() is salted per process);
    # DFT_OPS_TEST_SEED=k shifts every draw, to run the suite on fresh inputs
    offset = int(os.environ.get("DFT_OPS_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + offset)
