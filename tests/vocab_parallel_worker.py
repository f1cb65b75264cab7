"""One rank of the vocabulary-parallel tests (spawned by tests/test_vocab_parallel.py, gloo on CPU, world size 2).

Usage: python vocab_parallel_worker.py OUT.json CASE [CASE ...], with torchrun's
environment. Every rank draws the same random inputs, computes the loss with its
rows of the head (the explicit ``VocabParallel`` option, or a DTensor head) and
compares the loss, the TokenStats and every gradient (d(weight) and d(bias)
gathered over the ranks) with the loss over the whole vocabulary computed in
this same process on the same backend. Error cases expect the same exception on
every rank. Rank 0 writes {case: {"errors": {quantity: relative error}},
{"raised": message} or {"error": traceback}} to OUT.json.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # the Triton cases run on the interpreter, as in tests/conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dft_ops
from dft_ops import VocabParallel, objectives
from helpers import make_inputs, rel_err  # tests/ is this script's directory, so first on sys.path
from rank_harness import serve

V, D, SHAPE = 131, 32, (3, 9)  # not multiples of any block size; rank 0 holds rows [0, 70) unless said
CUT = 70

# one-pass chunks of 8 tokens: the calls of "auto" (one-pass where it applies) span several chunks, each
# chunk's statistics all-gathered across the ranks
dft_ops.backends.one_pass.MIN_CHUNK = dft_ops.backends.one_pass.GRANULE = 8


def inputs(dtype=torch.float32, shape=SHAPE, vocab=V):
    """The same random hidden (*shape, D), weight (vocab, D), labels, bias on every rank; logits of order 3."""
    torch.manual_seed(1234)
    hidden, weight, labels, bias = make_inputs(shape, D, vocab, dtype, "cpu", bias=True, scale=3.0)
    return hidden, weight, labels, bias


def gather_rows(local, start, stop, total):
    """The whole (total, ...) tensor from each rank's rows [start, stop) (the slices tile it: an exact sum)."""
    full = torch.zeros(total, *local.shape[1:], dtype=torch.float64)
    full[start:stop] = local.double()
    dist.all_reduce(full)
    return full


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def loss_stats_grads(hidden, weight, bias, labels, upstream_seed=7, **options):
    """(loss, stats or None, [d hidden, d weight, d bias]) of one call, on fresh leaves."""
    h, w, b = leaves(hidden, weight, bias)
    out = dft_ops.linear_cross_entropy(h, w, labels, bias=b, **options)
    loss, stats = out if isinstance(out, tuple) else (out, None)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed))
    (loss * upstream).sum().backward()
    return loss.detach(), stats, [h.grad, w.grad, None if b is None else b.grad]


def stats_errors(stats, ref) -> dict:
    if stats is None:
        return {}
    return {"logprob": rel_err(stats.logprob, ref.logprob), "entropy": rel_err(stats.entropy, ref.entropy),
            "is_top1_mismatches": float((stats.is_top1 != ref.is_top1).sum()),
            "mask_mismatches": float((stats.mask != ref.mask).sum())}


def errors_against_whole(loss, stats, grads, ref, start, stop, *, hidden_grad=None) -> dict:
    """Relative errors of the rank's results vs the whole-vocabulary run ``ref``; row gradients gathered first."""
    ref_loss, ref_stats, (rh, rw, rb) = ref
    gh, gw, gb = grads
    out = {"loss": rel_err(loss, ref_loss), "hidden": rel_err(gh if hidden_grad is None else hidden_grad, rh),
           "weight": rel_err(gather_rows(gw, start, stop, rw.shape[0]), rw)}
    if rb is not None:
        out["bias"] = rel_err(gather_rows(gb, start, stop, rb.shape[0]), rb)
    return {**out, **stats_errors(stats, ref_stats)}


def judge(run, errors):
    return {"errors": errors}


# ---------------------------------------------------------------------------------------- the explicit option


def explicit(bounds=((0, CUT), (CUT, V)), *, dtype=torch.float32, all_ignored=False, objective="dft",
             make_batch=None, **options):
    """The explicit option: rank r passes weight[start:stop], bias[start:stop] and VocabParallel(*bounds[r]).

    ``make_batch``: builds this batch's per-token call arguments (drawn when the case runs)."""

    def run(rank, world):
        hidden, weight, labels, bias = inputs(dtype)
        if all_ignored:
            labels.fill_(-100)
        batch = {} if make_batch is None else make_batch()
        ref = loss_stats_grads(hidden, weight, bias, labels, objective=objective, **batch, **options)
        start, stop = bounds[rank]
        got = loss_stats_grads(hidden, weight[start:stop], bias[start:stop], labels, objective=objective,
                               vocab_parallel=VocabParallel(start, stop), **batch, **options)
        return (errors_against_whole(*got, ref, start, stop),)

    return run


def old_logprobs():
    torch.manual_seed(99)
    return {"old_logprobs": torch.randn(SHAPE) - 3.0}


def packed_position_ids():
    ids = torch.arange(SHAPE[1]).repeat(SHAPE[0], 1)
    ids[:, 5:] -= 5  # two packed documents per row
    return ids


class GatherTokens(torch.autograd.Function):
    """A sequence-parallel all-gather along dim 1 (forward) whose backward reduce-scatters: what a caller
    brings with ``reduce_hidden_grad=False``."""

    @staticmethod
    def forward(ctx, shard):
        world = dist.get_world_size()
        parts = shard.transpose(0, 1).contiguous()
        full = parts.new_empty(world * parts.shape[0], *parts.shape[1:])
        dist.all_gather_into_tensor(full, parts)
        return full.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size()
        parts = grad.transpose(0, 1).contiguous()
        mine = parts.new_empty(parts.shape[0] // world, *parts.shape[1:])
        dist.reduce_scatter_tensor(mine, parts)
        return mine.transpose(0, 1)


def explicit_sequence_parallel():
    """Hidden states split along the sequence (10 positions, 5 per rank), gathered by the caller's GatherTokens;
    the loss leaves d(hidden) unreduced and the gather's backward reduce-scatters it."""

    def run(rank, world):
        hidden, weight, labels, bias = inputs(shape=(3, 10))
        ref = loss_stats_grads(hidden, weight, bias, labels, shift=True, return_stats=True)
        start, stop = (0, CUT) if rank == 0 else (CUT, V)
        chunk = 10 // world
        shard = hidden[:, rank * chunk:(rank + 1) * chunk].clone().requires_grad_()
        w, b = leaves(weight[start:stop], bias[start:stop])
        loss, stats = dft_ops.linear_cross_entropy(
            GatherTokens.apply(shard), w, labels, bias=b, shift=True, return_stats=True,
            vocab_parallel=VocabParallel(start, stop, reduce_hidden_grad=False))
        (loss * torch.randn(loss.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
        d_hidden = torch.zeros_like(hidden, dtype=torch.float64)
        d_hidden[:, rank * chunk:(rank + 1) * chunk] = shard.grad
        dist.all_reduce(d_hidden)
        return (errors_against_whole(loss, stats, [None, w.grad, b.grad], ref, start, stop, hidden_grad=d_hidden),)

    return run


def peer_options():
    """The peers' options under vocabulary parallelism: class_weight is the whole (V,) vector on every rank."""
    torch.manual_seed(3)
    class_weight = torch.rand(V) + 0.5
    class_weight[::9] = 0.0
    return dict(label_smoothing=0.1, z_loss=1e-3, temperature=1.7, class_weight=class_weight)


# --------------------------------------------------------------------------------------------------- DTensors


def dtensor(weight_placement="shard", hidden_placement=None, backend="torch"):
    """A DTensor weight and bias (distribute_tensor; "shard": Shard(0), "replicate"); hidden plain or a DTensor
    ("replicate", or "sequence": Shard(1) with 9 positions, an uneven split). Each gradient must come back with
    its input's placement; its full value is compared."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        placement = {"shard": Shard(0), "replicate": Replicate()}
        hidden, weight, labels, bias = inputs()
        options = dict(objective="dft", shift=True, return_stats=True, reduction="none", backend=backend)
        ref = loss_stats_grads(hidden, weight, bias, labels, **options)
        w = distribute_tensor(weight, mesh, [placement[weight_placement]]).requires_grad_()
        b = distribute_tensor(bias, mesh, [placement[weight_placement]]).requires_grad_()
        h = hidden.clone()
        if hidden_placement is not None:
            h = distribute_tensor(h, mesh, [{"replicate": Replicate(), "sequence": Shard(1)}[hidden_placement]])
        h.requires_grad_()
        loss, stats = dft_ops.linear_cross_entropy(h, w, labels, bias=b, **options)
        assert type(loss) is torch.Tensor and type(stats.logprob) is torch.Tensor, "results are plain tensors"
        (loss * torch.randn(loss.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
        for name, leaf in (("weight", w), ("bias", b), ("hidden", h)):
            got = getattr(leaf.grad, "placements", None)
            if got != getattr(leaf, "placements", None):
                raise AssertionError(f"d({name}) placements {got}, its input's {getattr(leaf, 'placements', None)}")
        full = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in (h.grad, w.grad, b.grad)]
        ref_loss, ref_stats, ref_grads = ref
        errors = {"loss": rel_err(loss, ref_loss), **stats_errors(stats, ref_stats)}
        errors.update({n: rel_err(g, r) for n, g, r in zip(("hidden", "weight", "bias"), full, ref_grads)})
        return (errors,)

    return run


def dtensor_refused(what):
    """DTensor inputs the rules refuse, each with its error."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        hidden, weight, labels, bias = inputs()
        w = distribute_tensor(weight, mesh, [Shard(1 if what == "shard1-weight" else 0)])
        b = distribute_tensor(bias, mesh, [Shard(0)])
        options = {}
        if what == "plain-bias":
            b = bias
        elif what == "with-option":
            options["vocab_parallel"] = VocabParallel(0, CUT) if rank == 0 else VocabParallel(CUT, V)
        elif what == "hidden-features":
            hidden = distribute_tensor(hidden, mesh, [Shard(2)])
        dft_ops.linear_cross_entropy(hidden, w, labels, bias=b, **options)

    run.expect_error = {"shard1-weight": (ValueError, r"^weight: a DTensor with placements \(Shard\(dim=1\),\)"),
                        "plain-bias": (TypeError, r"^bias: with a weight sharded over the vocabulary"),
                        "with-option": (ValueError, r"^vocab_parallel: given together with a Shard\(0\)"),
                        "hidden-features": (ValueError, r"^hidden: a DTensor with placements")}[what]
    return run


# --------------------------------------------------------------------------------------- errors of the option


def refused(expect, *, bounds=((0, CUT), (CUT, V)), rows=None, labels_of_rank1=None, vocab_size=None,
            hidden_of_rank1=None, options_of_rank1=None, bias_of_rank1=None):
    """A call the group check must refuse on every rank (never a hang, never a wrong loss)."""

    def run(rank, world):
        hidden, weight, labels, bias = inputs()
        start, stop = bounds[rank]
        w = weight[start:stop] if rows is None or rank == 0 else weight[:rows]
        options, b = {}, None
        if rank == 1 and labels_of_rank1 is not None:
            labels = labels_of_rank1(labels)
        if rank == 1 and hidden_of_rank1 is not None:
            hidden = hidden_of_rank1(hidden)
        if rank == 1 and options_of_rank1 is not None:
            options = options_of_rank1()
        if rank == 1 and bias_of_rank1 is not None:
            b = bias_of_rank1(bias)
        dft_ops.linear_cross_entropy(hidden, w, labels, bias=b,
                                     vocab_parallel=VocabParallel(start, stop, vocab_size=vocab_size), **options)

    run.expect_error = expect
    return run


def fsdp_like_shard():
    """An FSDP2-sharded head read outside its module's forward looks like this: a Shard(0) DTensor weight,
    and each rank its own batch. Read as a vocabulary-parallel head, every rank must say what that means."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        hidden, weight, labels, _ = inputs()
        if rank == 1:  # data parallelism: another batch on the other rank
            hidden, labels = hidden + 1.0, _relabel(labels)
        dft_ops.linear_cross_entropy(hidden, distribute_tensor(weight, mesh, [Shard(0)]), labels)

    run.expect_error = (ValueError, r"^weight: a Shard\(0\) DTensor weight is read as a vocabulary-parallel head.*"
                                    r"FSDP2-sharded head read outside its module's forward")
    return run


def fsdp2_head_outside_its_forward():
    """The real thing: a head sharded by FSDP2's fully_shard, its weight read outside the head's forward."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        hidden, weight, labels, _ = inputs()
        head = torch.nn.Linear(D, V, bias=False)
        with torch.no_grad():
            head.weight.copy_(weight)
        fully_shard(head, mesh=init_device_mesh("cpu", (world,)))
        if rank == 1:
            hidden, labels = hidden + 1.0, _relabel(labels)
        dft_ops.linear_cross_entropy(hidden, head.weight, labels)

    run.expect_error = (ValueError, r"^weight: a Shard\(0\) DTensor weight .*Call the loss from the head's forward")
    return run


def _relabel(labels):
    labels = labels.clone()
    labels[0, 0] = (labels[0, 0] + 1) % V if labels[0, 0] >= 0 else 3
    return labels


def group_of_one():
    """A group holding rank 0 only: there, the whole vocabulary on one rank (exact); rank 1 is not a member and
    passing that group is refused."""

    def run(rank, world):
        group = dist.new_group([0])  # every rank takes part in creating it
        hidden, weight, labels, bias = inputs()
        if rank == 1:
            try:
                dft_ops.linear_cross_entropy(hidden, weight, labels, vocab_parallel=VocabParallel(0, V, group=group))
            except ValueError as exc:
                if str(exc).startswith("group: this process is not a member"):
                    return ({},)
                raise
            raise AssertionError("a rank outside the group was not refused")
        # two passes: the very same computation as without the option (one-pass merges its statistics in
        # float64 across the group, which rounds differently from one rank's own log-probs)
        (ref_loss, ref_stats, ref_grads) = loss_stats_grads(hidden, weight, bias, labels, return_stats=True,
                                                            backward_mode="gemm")
        loss, stats, grads = loss_stats_grads(hidden, weight, bias, labels, return_stats=True, backward_mode="gemm",
                                              vocab_parallel=VocabParallel(0, V, group=group))
        # no gather: rank 1 is not in this group, and holds every row anyway
        errors = {n: rel_err(g, r) for n, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads)}
        return ({"loss": rel_err(loss, ref_loss), **errors, **stats_errors(stats, ref_stats)},)

    return run


CASES = {}
for backend in ("torch", "triton"):
    CASES.update({
        f"{backend}-ce": explicit(objective="ce", backend=backend),
        f"{backend}-dft-bias-softcap-shift": explicit(softcap=4.0, shift=True, backend=backend),
        f"{backend}-chord-none-upstream-stats": explicit(objective="chord", reduction="none", return_stats=True,
                                                         backend=backend),
        f"{backend}-psft-per-token-input": explicit(objective=objectives.PSFT(), make_batch=old_logprobs,
                                                    return_stats=True, backend=backend),
        f"{backend}-sequence-dft-packed": explicit(objective=objectives.SequenceDFT("geometric"),
                                                   position_ids=packed_position_ids(), backend=backend),
        f"{backend}-dft-empty-slice": explicit(((0, V), (V, V)), return_stats=True, backend=backend),
        f"{backend}-dft-peer-options-stats": explicit(softcap=5.0, return_stats=True, backend=backend,
                                                      **peer_options()),
        f"{backend}-dft-bias-softcap-shift-two-pass": explicit(softcap=4.0, shift=True, backend=backend,
                                                               backward_mode="gemm"),
        f"{backend}-dft-empty-slice-two-pass": explicit(((0, V), (V, V)), return_stats=True, backend=backend,
                                                        backward_mode="gemm"),
    })
CASES.update({
    "torch-dft-reversed-slices": explicit(((61, V), (0, 61)), return_stats=True),
    "torch-dft-all-ignored": explicit(all_ignored=True, return_stats=True, reduction="sum"),
    "torch-dft-bf16": explicit(dtype=torch.bfloat16, return_stats=True),
    "torch-explicit-sequence-parallel": explicit_sequence_parallel(),
    "dtensor-shard0": dtensor("shard"),
    "dtensor-shard0-replicated-hidden": dtensor("shard", "replicate", backend="triton"),
    "dtensor-shard0-sequence-parallel": dtensor("shard", "sequence"),
    "dtensor-replicate": dtensor("replicate", "replicate"),
    "dtensor-refused-shard1-weight": dtensor_refused("shard1-weight"),
    "dtensor-refused-plain-bias": dtensor_refused("plain-bias"),
    "dtensor-refused-with-option": dtensor_refused("with-option"),
    "dtensor-refused-hidden-features": dtensor_refused("hidden-features"),
    "refused-overlap": refused((ValueError, r"^vocab_parallel: .* do not tile \[0, V\): an overlap"),
                               bounds=((0, CUT), (CUT - 10, V))),
    "refused-gap": refused((ValueError, r"^vocab_parallel: .* do not tile \[0, V\): a gap"),
                           bounds=((0, CUT - 10), (CUT, V))),
    "refused-weight-rows": refused((ValueError, r"^weight: rank 1 .* holds 50 rows"), rows=50),
    "refused-labels-differ": refused((ValueError, r"^labels: the ranks .* disagree"), labels_of_rank1=_relabel),
    "refused-hidden-differs": refused((ValueError, r"^hidden: the ranks .* disagree on the token count"),
                                      hidden_of_rank1=lambda h: h[:2], labels_of_rank1=lambda y: y[:2]),
    "refused-vocab-size": refused((ValueError, r"^vocab_size: 140, but the group's slices tile \[0, 131\)"),
                                  vocab_size=140),
    "refused-label-outside-vocabulary": refused((ValueError, r"^labels: \d+ value\(s\) outside \[0, 100\)"),
                                                bounds=((0, CUT), (CUT, 100))),
    "group-of-one": group_of_one(),
    # options, class weights or validity that differ between the ranks: every rank raises the same error
    "refused-options-differ": refused((ValueError, r"^label_smoothing: the ranks of the vocabulary-parallel group "
                                                   r"disagree"), options_of_rank1=lambda: dict(label_smoothing=0.1)),
    "refused-class-weight-differs": refused(
        (ValueError, r"^class_weight: the ranks of the vocabulary-parallel group disagree"),
        options_of_rank1=lambda: dict(class_weight=torch.ones(V))),
    "refused-invalid-on-one-rank": refused(
        (ValueError, r"^(bias: expected shape \(61,\)|vocab_parallel: rank 1 of the vocabulary-parallel group "
                     r"refused this call, so every rank does: ValueError: bias: expected shape)"),
        bias_of_rank1=lambda bias: bias),
    "refused-bad-option-on-one-rank": refused(
        (ValueError, r"^(label_smoothing: must be in \[0, 1\)|vocab_parallel: rank 1 .* refused this call.*"
                     r"label_smoothing: must be in)"), options_of_rank1=lambda: dict(label_smoothing=1.5)),
    "refused-fsdp-like-shard": fsdp_like_shard(),
    "refused-fsdp2-head-outside-its-forward": fsdp2_head_outside_its_forward(),
})


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:], CASES, judge)
