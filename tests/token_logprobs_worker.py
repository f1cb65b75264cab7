"""One rank of the two-rank tests of dft_ops.token_logprobs (spawned by tests/test_token_logprobs_vocab_parallel.py).

Usage: python token_logprobs_worker.py OUT.json CASE [CASE ...], with torchrun's environment (gloo on CPU,
world size 2). Every rank draws the same inputs, computes the per-token log-probs and entropies with its
rows of the head and the same random upstream gradients of both, and compares them and every gradient
(d(weight), d(bias) gathered over the ranks) with the whole vocabulary in this same process on the same
backend. Rank 0 writes {case: {"errors": {...}} | {"raised": ...} | {"error": traceback}}.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # the Triton cases run on the interpreter, as in tests/conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dft_ops
from dft_ops import VocabParallel
from dft_ops.integrations import verl
from helpers import make_inputs, rel_err
from rank_harness import serve
from vocab_parallel_worker import gather_rows, leaves

V, D, SHAPE, CUT = 131, 32, (3, 9), 70


def inputs(dtype=torch.float32):
    torch.manual_seed(4321)
    return make_inputs(SHAPE, D, V, dtype, "cpu", bias=True, scale=3.0)


def outputs_and_grads(fn, hidden, weight, bias, seed=11):
    """(logprob, entropy, [d hidden, d weight, d bias]) of ``fn(h, w, b)`` for fixed random upstream gradients."""
    h, w, b = leaves(hidden, weight, bias)
    logprob, entropy = fn(h, w, b)
    g = torch.Generator().manual_seed(seed)
    ((logprob * torch.randn(logprob.shape, generator=g)).sum()
     + (entropy * torch.randn(entropy.shape, generator=g)).sum()).backward()
    return logprob.detach(), entropy.detach(), [h.grad, w.grad, None if b is None else b.grad]


def errors(got, ref, start, stop, *, hidden_grad=None) -> dict:
    (lp, ent, (gh, gw, gb)), (rlp, rent, (rh, rw, rb)) = got, ref
    out = {"logprob": rel_err(lp, rlp), "entropy": rel_err(ent, rent),
           "hidden": rel_err(gh if hidden_grad is None else hidden_grad, rh),
           "weight": rel_err(gather_rows(gw, start, stop, rw.shape[0]), rw)}
    if rb is not None:
        out["bias"] = rel_err(gather_rows(gb, start, stop, rb.shape[0]), rb)
    return out


def explicit(bounds=((0, CUT), (CUT, V)), dtype=torch.float32, all_ignored=False, **options):
    """The explicit option, with a temperature per token, soft-cap, bias, shift and ignored tokens (or, with
    ``all_ignored``, every token: zeros out and zero gradients on every rank, the collectives still matched)."""

    def run(rank, world):
        hidden, weight, labels, bias = inputs(dtype)
        if all_ignored:
            labels.fill_(-100)
        temperature = torch.rand(SHAPE[0], SHAPE[1] - 1, generator=torch.Generator().manual_seed(2)) + 0.5
        kwargs = dict(temperature=temperature, softcap=4.0, shift=True, **options)
        ref = outputs_and_grads(lambda h, w, b: dft_ops.token_logprobs(h, w, labels, bias=b, **kwargs),
                                hidden, weight, bias)
        start, stop = bounds[rank]
        got = outputs_and_grads(lambda h, w, b: dft_ops.token_logprobs(
            h, w, labels, bias=b, vocab_parallel=VocabParallel(start, stop), **kwargs),
            hidden, weight[start:stop], bias[start:stop])
        out = errors(got, ref, start, stop)
        if all_ignored:  # not only equal to the whole vocabulary's: zero, on this rank
            lp, ent, grads = got
            out["all_ignored_max_abs"] = max(t.abs().max().item() for t in (lp, ent, *grads) if t.numel())
        return (out,)

    return run


def dtensor_head():
    """A Shard(0) DTensor head (ColwiseParallel's): the vocabulary-parallel call by its placement alone."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        hidden, weight, labels, bias = inputs()
        ref = outputs_and_grads(lambda h, w, b: dft_ops.token_logprobs(h, w, labels, bias=b, shift=True),
                                hidden, weight, bias)
        h = hidden.clone().requires_grad_()
        w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
        logprob, entropy = dft_ops.token_logprobs(h, w, labels, bias=b, shift=True)
        g = torch.Generator().manual_seed(11)
        ((logprob * torch.randn(logprob.shape, generator=g)).sum()
         + (entropy * torch.randn(entropy.shape, generator=g)).sum()).backward()
        full = [h.grad, w.grad.full_tensor(), b.grad.full_tensor()]
        rlp, rent, rgrads = ref
        out = {"logprob": rel_err(logprob, rlp), "entropy": rel_err(entropy, rent)}
        out.update({n: rel_err(g_, r) for n, g_, r in zip(("hidden", "weight", "bias"), full, rgrads)})
        return (out,)

    return run


def verl_process_group(reduction="none"):
    """verl's dist_process_group: equal slices by rank, d(hidden) left as this rank's share (summed here)."""

    def run(rank, world):
        hidden, weight, labels, _ = inputs()
        labels = labels.clamp(min=0)  # verl: every label is a class
        weight = weight[:130]  # equal slices of 65
        labels = labels % 130
        ref = outputs_and_grads(lambda h, w, b: verl.linear_cross_entropy(h, w, labels, 0.8, reduction),
                                hidden, weight, None)
        local = 130 // world
        start, stop = rank * local, (rank + 1) * local
        got = outputs_and_grads(lambda h, w, b: verl.linear_cross_entropy(h, w, labels, 0.8, reduction,
                                                                          dist.group.WORLD),
                                hidden, weight[start:stop], None)
        share = got[2][0].clone()
        dist.all_reduce(share)  # what verl's tensor-parallel region does with d(hidden)
        return (errors(got, ref, start, stop, hidden_grad=share),)

    return run


def refused_temperature_differs():
    def run(rank, world):
        hidden, weight, labels, bias = inputs()
        start, stop = ((0, CUT), (CUT, V))[rank]
        dft_ops.token_logprobs(hidden, weight[start:stop], labels, temperature=0.5 + rank,
                               vocab_parallel=VocabParallel(start, stop))

    run.expect_error = (ValueError, r"^temperature: the ranks of the vocabulary-parallel group disagree")
    return run


def refused_bad_temperature_on_one_rank():
    def run(rank, world):
        hidden, weight, labels, bias = inputs()
        start, stop = ((0, CUT), (CUT, V))[rank]
        t = torch.ones(3, 1) if rank == 0 else torch.ones(2, 1)
        dft_ops.token_logprobs(hidden, weight[start:stop], labels, temperature=t,
                               vocab_parallel=VocabParallel(start, stop))

    run.expect_error = (ValueError, r"^(temperature: shape \(2, 1\)|vocab_parallel: rank 1 .* refused this call.*"
                                    r"temperature: shape)")
    return run


def judge(run, errs):
    return {"errors": errs}


CASES = {
    "torch": explicit(),
    "triton-gemm": explicit(backend="triton", backward_mode="gemm"),
    "triton-fused": explicit(backend="triton", backward_mode="fused"),
    "torch-bf16": explicit(dtype=torch.bfloat16),
    "torch-uneven-empty-slice": explicit(((0, V), (V, V))),
    "torch-all-ignored": explicit(all_ignored=True),
    "triton-fused-all-ignored": explicit(all_ignored=True, backend="triton", backward_mode="fused"),
    "dtensor-shard0": dtensor_head(),
    "verl-process-group": verl_process_group(),
    "verl-process-group-mean": verl_process_group("mean"),
    "refused-temperature-differs": refused_temperature_differs(),
    "refused-bad-temperature-on-one-rank": refused_bad_temperature_on_one_rank(),
}


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:], CASES, judge)
