"""Vocabulary (tensor) parallelism: each rank holds rows [start, stop) of the head; the loss is the whole vocabulary's.

``VocabParallel(start, stop, group)`` is the option (``LossOptions.vocab_parallel``):
the weight (and bias) passed to the loss are the rank's rows [start, stop) of
the whole head, the labels are global ids, and every rank of ``group`` passes
the same hidden states and labels (a ``Shard(0)`` DTensor head says all this by
itself: :mod:`dft_ops.dtensor_inputs`).

:class:`ShardedBackend` wraps a backend (``dft_ops.kernels`` or
``dft_ops.torch_backend``) with the same two functions:

- ``lse_forward`` runs the local backend on the rank's rows with the targets
  shifted by ``start`` (a label owned by another rank is outside [0, stop -
  start): no label logit, no one-hot term), then all-gathers every rank's
  per-token partials (max logit, sum-exp, entropy term, argmax, label logit,
  smoothing sum) and merges them with the same :func:`combine_partials` that
  merges vocabulary chunks inside one backend. The objective table runs on
  these global statistics, so DFT's p and every other objective's weight are
  the whole vocabulary's.
- ``grad_backward`` runs the local backend with the global log-sum-exp and
  coefficients: d(weight) and d(bias) are the rank's own rows, d(hidden) is
  this rank's share and is all-reduced over the group (or left to the caller,
  ``reduce_hidden_grad=False``, whose sequence-parallel gather reduce-scatters it).

Communication per call: one all-gather of a few int64 per rank when the call
is checked (:func:`check_group`), one all-gather of ``k x M`` float64 per rank in
the forward (k = 3 to 6 statistics, M computed tokens), one all-reduce of
``N x D`` fp32 d(hidden) in the backward.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .backend_contract import ForwardStats, combine_partials

__all__ = ["VocabParallel", "ShardedBackend", "check_group", "shard_partials", "merge_partials"]


@dataclass(frozen=True)
class VocabParallel:
    """This rank's slice of a vocabulary split over a process group (``LossOptions.vocab_parallel``).

    Attributes:
        start, stop: the rows [start, stop) of the whole head that this rank's
            weight, bias (and class weights) hold; ``0 <= start <= stop``. The
            slices of the group's ranks must tile [0, V) (any order; empty
            slices allowed).
        group: the ``torch.distributed`` process group of the ranks splitting
            the vocabulary (Megatron-Core's ``tp_group``), or None for the default group.
        reduce_hidden_grad: True: d(hidden) is all-reduced over the group, so
            every rank gets the whole gradient. False: each rank gets its own
            vocabulary slice's share, for a caller that reduces it itself (under
            sequence parallelism, the backward of the all-gather of the hidden
            states reduce-scatters it).
        vocab_size: V, the whole vocabulary, or None: the largest ``stop`` of the
            group, filled in when a call checks the group (:func:`check_group`).

    Raises TypeError / ValueError starting with the field's name on construction.
    """

    start: int
    stop: int
    group: Any = None
    reduce_hidden_grad: bool = True
    vocab_size: int | None = None

    def __post_init__(self):
        for name in ("start", "stop", "vocab_size"):
            value = getattr(self, name)
            if value is None and name == "vocab_size":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
            object.__setattr__(self, name, int(value))
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"start: expected 0 <= start <= stop, got start={self.start}, stop={self.stop}")
        if self.vocab_size is not None and self.vocab_size < self.stop:
            raise ValueError(f"vocab_size: {self.vocab_size} is smaller than stop={self.stop}")
        if not isinstance(self.reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad: expected a bool, got {type(self.reduce_hidden_grad).__name__}")
        if self.group is not None:
            if self.group is dist.GroupMember.NON_GROUP_MEMBER:
                raise ValueError("group: this process is not a member of it (new_group() gives the ranks left out "
                                 "GroupMember.NON_GROUP_MEMBER); pass the group of the ranks this one splits the "
                                 "vocabulary with")
            if not isinstance(self.group, dist.ProcessGroup):
                raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got "
                                f"{type(self.group).__name__}")

    @property
    def rows(self) -> int:
        """Rows of the head this rank holds: ``stop - start``."""
        return self.stop - self.start


# ------------------------------------------------------------------------------------------------- checking


def _group_of(vp: VocabParallel):
    """(group, rank in it, its size); ValueError starting with 'vocab_parallel' when there is none to use."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel: torch.distributed is not initialized: a vocabulary split over ranks needs "
                         "a process group (call torch.distributed.init_process_group first)")
    group = vp.group if vp.group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("vocab_parallel: this process is not a member of the given group")
    return group, rank, dist.get_world_size(group)


def _checked(vp: VocabParallel) -> VocabParallel:
    if vp.vocab_size is None:
        raise ValueError("vocab_parallel: not checked against its group (vocab_size is None); call "
                         "dft_ops.vocab_parallel.check_group first (linear_cross_entropy does)")
    return vp


def _all_gather(out: Tensor, mine: Tensor, group) -> None:
    """Every rank's ``mine`` concatenated along dim 0 into ``out`` (all_gather_single where torch has it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def _labels_checksum(labels: Tensor) -> Tensor:
    """An int64 that differs (barring adversarial collisions) when the labels differ in any value or position."""
    flat = labels.reshape(-1).long()
    return (flat * (torch.arange(flat.numel(), device=flat.device) * 2 + 1)).sum()


def check_group(vp: VocabParallel | None, hidden: Tensor, weight: Tensor, labels: Tensor) -> VocabParallel | None:
    """The option with ``vocab_size`` filled in, after checking the call across the group (a collective).

    Every rank of the group must call it (as every rank calls the loss). Each
    rank contributes its slice, the shapes of its inputs and a checksum of its
    labels in one small all-gather; every rank then raises the same error,
    whichever rank is wrong, so no rank is left waiting in a later collective.

    Args:
        vp: the option, or None (returned as is; no communication).
        hidden: (..., D) this rank's hidden states (the same on every rank).
        weight: (stop - start, D) this rank's rows of the head.
        labels: (...) global label ids (the same on every rank).

    Raises:
        ValueError starting with "vocab_parallel" (no process group, slices
        that do not tile [0, V), vocab_size that disagrees), "weight" (rows that
        are not the rank's slice) or "hidden" / "labels" (different on some ranks).
    """
    if vp is None:
        return None
    group, rank, world = _group_of(vp)
    shapes = (vp.start, vp.stop, weight.shape[0], hidden.shape[-1], hidden.numel() // hidden.shape[-1],
              int(vp.reduce_hidden_grad))
    mine = torch.cat([torch.tensor(shapes, dtype=torch.int64, device=hidden.device),
                      _labels_checksum(labels).reshape(1)])
    everyone = torch.empty(world * mine.numel(), dtype=torch.int64, device=hidden.device)
    _all_gather(everyone, mine, group)
    meta = everyone.reshape(world, -1).tolist()
    for r, (start, stop, rows, *_) in enumerate(meta):
        if rows != stop - start:
            raise ValueError(f"weight: rank {r} of the vocabulary-parallel group holds {rows} rows of the head, but "
                             f"its slice [{start}, {stop}) has {stop - start}; pass the rank's rows weight[start:stop]")
    for column, name, what in ((3, "hidden", "hidden size D"), (4, "hidden", "token count"),
                               (5, "vocab_parallel", "reduce_hidden_grad"), (6, "labels", "labels")):
        values = [m[column] for m in meta]
        if len(set(values)) > 1:
            raise ValueError(f"{name}: the ranks of the vocabulary-parallel group disagree on the {what} "
                             f"({values if column != 6 else 'checksums differ'}); every rank computes the loss of "
                             "the same tokens with the same labels and options")
    slices = sorted((start, stop, r) for r, (start, stop, *_) in enumerate(meta))
    covered = 0
    for start, stop, r in slices:
        if start != covered:
            problem = "a gap" if start > covered else "an overlap"
            raise ValueError(f"vocab_parallel: the slices of the group's ranks do not tile [0, V): {problem} at row "
                             f"{min(start, covered)} (rank {r} starts at {start}; slices by rank: "
                             f"{[(m[0], m[1]) for m in meta]})")
        covered = stop
    if covered == 0:
        raise ValueError("vocab_parallel: every rank's slice is empty: the group holds no vocabulary")
    if vp.vocab_size is not None and vp.vocab_size != covered:
        raise ValueError(f"vocab_size: {vp.vocab_size}, but the group's slices tile [0, {covered})")
    if covered >= 2**53:  # the forward all-gathers argmax ids as float64
        raise ValueError(f"vocab_parallel: a vocabulary of {covered} rows is too large")
    return replace(vp, vocab_size=covered)


# ------------------------------------------------------------------------------------------------- the backend


def shard_partials(stats: ForwardStats, start: int, *, with_stats: bool, smoothing: bool) -> Tensor:
    """One rank's forward statistics as online-softmax partials, stacked (k, M) float64 for one all-gather.

    Rows: max, sum-exp relative to it, label logit, then (with_stats) the entropy
    term relative to the max and the global argmax id, then (smoothing) the
    smoothing sum. Without stats the partial is (lse, 1): lse is a max with sum-exp 1.
    An all -inf slice (empty, or masked) is (-inf, 0).
    """
    lse = stats.lse.double()
    top = stats.max_logit.double() if with_stats else lse
    finite = top > float("-inf")
    sumexp = torch.where(finite, torch.exp(lse - torch.where(finite, top, 0.0)), 0.0)
    rows = [top, sumexp, stats.target_logit.double()]
    if with_stats:
        # sum_j e^(z_j - max) (z_j - max) = sumexp * (sum_j s_j z_j - max) = sumexp * (lse - entropy - max)
        ent = torch.where(finite, sumexp * (lse - stats.entropy.double() - torch.where(finite, top, 0.0)), 0.0)
        rows += [ent, stats.argmax.double() + start]
    if smoothing:
        rows.append(stats.smooth_sum.double())
    return torch.stack(rows)


def merge_partials(parts: Tensor, *, with_stats: bool, smoothing: bool) -> ForwardStats:
    """(S, k, M) partials of S vocabulary slices (:func:`shard_partials`) -> the whole vocabulary's ForwardStats."""
    part_max, part_sumexp, target = parts[:, 0], parts[:, 1], parts[:, 2]
    ent = argmax = None
    if with_stats:
        ent, argmax = parts[:, 3], parts[:, 4].long()
    lse, max_logit, entropy, argmax = combine_partials(part_max, part_sumexp, ent, argmax)
    f32 = (lambda t: None if t is None else t.float())
    return ForwardStats(lse=f32(lse), target_logit=f32(target.sum(dim=0)), entropy=f32(entropy),
                        max_logit=f32(max_logit) if with_stats else None, argmax=argmax,
                        smooth_sum=f32(parts[:, -1].sum(dim=0)) if smoothing else None)


def _empty_stats(M: int, device, *, with_stats: bool, smoothing: bool) -> ForwardStats:
    """The statistics of a rank holding no rows (an uneven split): no logit at all."""
    f32 = dict(dtype=torch.float32, device=device)
    zeros = torch.zeros(M, **f32)
    minus_inf = torch.full((M,), float("-inf"), **f32)
    return ForwardStats(lse=minus_inf, target_logit=zeros, entropy=zeros if with_stats else None,
                        max_logit=minus_inf if with_stats else None,
                        argmax=torch.zeros(M, dtype=torch.int64, device=device) if with_stats else None,
                        smooth_sum=zeros if smoothing else None)


class ShardedBackend:
    """A backend over one rank's vocabulary rows whose statistics are the whole vocabulary's.

    Args:
        local: the :class:`~dft_ops.backend_contract.Backend` computing the
            rank's rows (``kernels.TritonBackend`` or ``torch_backend.TorchBackend``).
        vp: a :class:`VocabParallel` checked by :func:`check_group` (``vocab_size`` set).

    ``lse_forward`` / ``grad_backward`` take the arguments of the backend
    contract (:mod:`dft_ops.backend_contract`) with ``weight`` and ``bias`` the
    rank's rows, ``class_weight`` the whole (V,) vector (the rank's rows are
    passed on) and ``targets`` global ids; both are collectives over the group.
    """

    def __init__(self, local, vp: VocabParallel):
        self.local, self.vp = local, _checked(vp)
        self.group, self.rank, self.world = _group_of(vp)
        self.name = f"{local.name} over {self.world} vocabulary shards"

    def _rows_of(self, class_weight: Tensor | None) -> Tensor | None:
        return None if class_weight is None else class_weight[self.vp.start:self.vp.stop]

    def lse_forward(self, hidden, weight, bias, targets, rows=None, *, with_stats=False, smoothing=False,
                    class_weight=None, **options) -> ForwardStats:
        if self.vp.rows:
            stats = self.local.lse_forward(hidden, weight, bias, targets - self.vp.start, rows, with_stats=with_stats,
                                           smoothing=smoothing, class_weight=self._rows_of(class_weight), **options)
        else:
            stats = _empty_stats(targets.shape[0], hidden.device, with_stats=with_stats, smoothing=smoothing)
        mine = shard_partials(stats, self.vp.start, with_stats=with_stats, smoothing=smoothing)
        everyone = mine.new_empty((self.world * mine.shape[0], mine.shape[1]))
        _all_gather(everyone, mine, self.group)
        return merge_partials(everyone.reshape(self.world, *mine.shape), with_stats=with_stats, smoothing=smoothing)

    def grad_backward(self, hidden, weight, bias, targets, rows, lse, coef, *, need_hidden=True, need_weight=True,
                      need_bias=False, class_weight=None, **options):
        if self.vp.rows:
            d_hidden, d_weight, d_bias = self.local.grad_backward(
                hidden, weight, bias, targets - self.vp.start, rows, lse, coef, need_hidden=need_hidden,
                need_weight=need_weight, need_bias=need_bias, class_weight=self._rows_of(class_weight), **options)
        else:
            d_hidden = torch.zeros_like(hidden) if need_hidden else None
            d_weight = torch.zeros_like(weight) if need_weight else None
            d_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        if d_hidden is not None and self.vp.reduce_hidden_grad:
            # summed in fp32 whatever hidden's dtype: the share's own rounding and one more, not one per rank
            total = d_hidden.float()
            dist.all_reduce(total, group=self.group)
            d_hidden = total.to(d_hidden.dtype)
        return d_hidden, d_weight, d_bias
