"""Checks written for a GPU: int64 offsets past 2^31 elements, run-to-run agreement of the fused atomics.

On a GPU the shapes are real (4 GB operands: rows past 2^31 elements, where an int32 offset would
wrap); on a CPU the same code runs at toy sizes under the interpreter, so the checks themselves
are tested where CI runs. Each compares with the float64 reference of the benchmark
(bench/reference.py: materialized logits in token chunks, written from the definitions).
tests/gpu_smoke.py states the error model behind the tolerances.
"""

import sys
from pathlib import Path

import pytest
import torch

import dft_ops
from conftest import ON_GPU
from helpers import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ lives at the repository root
from bench.reference import float64_loss_and_grads  # noqa: E402

BF16 = torch.bfloat16
PAST_2_31 = 2**31 // 256 + 64  # rows of 256 columns: the last rows start past 2^31 elements
MODES = ["gemm", "fused"]


def _case(n_tokens, vocab, dim, device, *, tail_labels=False):
    hidden = torch.randn(n_tokens, dim, device=device).to(BF16)
    weight = (torch.randn(vocab, dim, device=device) * (2.0 / dim**0.5)).to(BF16)
    labels = torch.randint(0, vocab, (n_tokens,), device=device)
    if tail_labels:  # labels in the rows past 2^31 elements of the head
        labels[: n_tokens // 2] = vocab - 1 - torch.arange(n_tokens // 2, device=device)
    return hidden, weight, labels


def _run(mode, hidden, weight, labels, objective="ce"):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = dft_ops.linear_cross_entropy(h, w, labels, objective=objective, backend="triton", backward_mode=mode)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _check(got, want, tail: slice, tail_of: int):
    loss, d_hidden, d_weight = got
    assert abs(loss.double().item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    for name, a, b in (("d(hidden)", d_hidden, want.grad_hidden), ("d(weight)", d_weight, want.grad_weight)):
        assert a.dtype == BF16 and torch.isfinite(a).all(), name
        # G rounded to bf16 once, fp32 accumulation: ~2.6e-3 norm-wise (docs/backward.md)
        assert rel_err(a, b) < 5e-3, (name, rel_err(a, b))
    # the rows past 2^31 elements on their own: an int32 wrap would read or write other rows there
    part = d_hidden if tail_of == 0 else d_weight
    ref = want.grad_hidden if tail_of == 0 else want.grad_weight
    assert rel_err(part[tail], ref[tail]) < 5e-3


@pytest.mark.parametrize("mode", MODES)
def test_hidden_rows_past_2_31_elements(mode, device):
    n_tokens, dim = (PAST_2_31, 256) if ON_GPU else (40, 32)
    hidden, weight, labels = _case(n_tokens, 96, dim, device)
    got = _run(mode, hidden, weight, labels)
    want = float64_loss_and_grads(hidden, weight, labels, "ce")
    _check(got, want, slice(n_tokens - 64, n_tokens), tail_of=0)


@pytest.mark.parametrize("mode", MODES)
def test_vocabulary_rows_past_2_31_elements(mode, device):
    vocab, dim = (PAST_2_31, 256) if ON_GPU else (300, 32)
    hidden, weight, labels = _case(64, vocab, dim, device, tail_labels=True)
    got = _run(mode, hidden, weight, labels, "dft")
    want = float64_loss_and_grads(hidden, weight, labels, "dft", chunk_bytes=2 << 30)
    _check(got, want, slice(vocab - 64, vocab), tail_of=1)


def test_fused_atomics_agree_run_to_run(device):
    """The fused backward's fp32 atomics add in no fixed order: two runs agree to fp32 rounding, and both
    match float64 (a race or a lost update would move far more than rounding)."""
    n_tokens, vocab, dim = (2048, 8192, 512) if ON_GPU else (40, 200, 32)
    hidden, weight, labels = _case(n_tokens, vocab, dim, device)
    first = _run("fused", hidden, weight, labels)
    second = _run("fused", hidden, weight, labels)
    assert torch.equal(first[0], second[0])  # the loss: no atomics in the forward
    for a, b in zip(first[1:], second[1:]):
        # bf16 outputs of fp32 sums: an element may round the other way, ~2^-8 of it, rarely
        assert rel_err(a, b) < 1e-3
    want = float64_loss_and_grads(hidden, weight, labels, "ce")
    assert rel_err(first[2], want.grad_weight) < 5e-3
