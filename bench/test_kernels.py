"""pytest-benchmark suite: dft-ops forward, backward and both, for regressions between commits.

Not part of ``make test`` (tests/ only). Run it from the repository root::

    pytest bench/test_kernels.py --benchmark-autosave      # store this commit's run in .benchmarks/
    pytest bench/test_kernels.py --benchmark-compare       # run again, compare with the last stored run
    pytest-benchmark compare 0001 0002 --columns=median,iqr --group-by=name

On a CUDA GPU: the llama3-8b head (D 4096, V 128256), bf16, Triton backend, at
4k and 16k tokens, synchronized around each call. Without one: the tiny head,
fp32, the chunked PyTorch backend (what runs on CPU), in seconds. Inputs are the
benchmark's peaked ones (bench.cases.make_inputs).
"""

from __future__ import annotations

import pytest
import torch

import dft_ops
from bench.cases import DTYPES, HEADS, Case, make_inputs

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BACKEND = "triton" if ON_GPU else "torch"
DTYPE = DTYPES["bf16" if ON_GPU else "fp32"]
SIZES = [("llama3-8b", 4096), ("llama3-8b", 16384)] if ON_GPU else [("tiny", 512)]
ROUNDS = 20 if ON_GPU else 5


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}-N{s[1]}")
def inputs(request):
    head, tokens = request.param
    case = Case(HEADS[head], tokens, "dft", "peaked", DTYPE, ("forward+backward",))
    made = make_inputs(case, DEVICE)
    yield made.leaves() + (made.labels,)
    del made
    if ON_GPU:
        torch.cuda.empty_cache()


def _loss(inputs, objective):
    hidden, weight, labels = inputs
    return dft_ops.linear_cross_entropy(hidden, weight, labels, objective=objective, backend=BACKEND)


@pytest.mark.parametrize("objective", ["ce", "dft"])
def test_forward(benchmark, inputs, objective):
    benchmark.extra_info.update(backend=BACKEND, dtype=str(DTYPE), device=str(DEVICE))

    def forward():
        loss = _loss(inputs, objective)  # a training forward: the graph is built, then dropped
        _sync()
        return loss

    loss = benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("objective", ["ce", "dft"])
def test_backward(benchmark, inputs, objective):
    benchmark.extra_info.update(backend=BACKEND, dtype=str(DTYPE), device=str(DEVICE))
    hidden, weight, _ = inputs

    def setup():  # a fresh forward outside the timed call
        hidden.grad = weight.grad = None
        loss = _loss(inputs, objective)
        _sync()
        return (loss,), {}

    def backward(loss):
        loss.backward()
        _sync()

    benchmark.pedantic(backward, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("objective", ["ce", "dft"])
def test_forward_backward(benchmark, inputs, objective):
    benchmark.extra_info.update(backend=BACKEND, dtype=str(DTYPE), device=str(DEVICE))
    hidden, weight, _ = inputs

    def step():
        hidden.grad = weight.grad = None
        _loss(inputs, objective).backward()
        _sync()

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
