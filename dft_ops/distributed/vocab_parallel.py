"""Vocabulary (tensor) parallelism: each rank holds rows [start, stop) of the head; the loss is the whole vocabulary's.

``VocabParallel(start, stop, group)`` is the option (``LossOptions.vocab_parallel``):
the weight (and bias) passed to the loss are the rank's rows [start, stop) of
the whole head, the labels are global ids, and every rank of ``group`` passes
the same hidden states, labels and options (a ``Shard(0)`` DTensor head says
all this by itself: :mod:`dft_ops.distributed.dtensor_inputs`).

:func:`check_group` checks one call across the group before any other
collective (every rank raises the same error, whichever rank is wrong); the
backend wrapper that makes the two passes collectives is
:class:`dft_ops.backends.sharded.ShardedBackend`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["VocabParallel", "check_group", "checksum"]


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



# ------------------------------------------------------------------------------------------------- the group


def group_of(vp: VocabParallel):
    """(group, rank in it, its size); ValueError starting with 'vocab_parallel' when there is none to use."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel: torch.distributed is not initialized: a vocabulary split over ranks needs "
                         "a process group (call torch.distributed.init_process_group first)")
    group = vp.group if vp.group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("vocab_parallel: this process is not a member of the given group")
    return group, rank, dist.get_world_size(group)


def checked(vp: VocabParallel) -> VocabParallel:
    """``vp`` after :func:`check_group` filled in ``vocab_size`` (an assertion for the layers below)."""
    assert vp.vocab_size is not None, "vocab_parallel: check_group fills in vocab_size before a backend runs"
    return vp


def all_gather(out: Tensor, mine: Tensor, group) -> None:
    """Every rank's ``mine`` concatenated along dim 0 into ``out`` (all_gather_single where torch has it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def checksum(t: Tensor | None) -> Tensor | int:
    """An int64 (0-d tensor) that differs, barring adversarial collisions, when ``t`` differs in any value
    (bit for bit) or position; 0 for None. Computed on t's device, read with the group check."""
    if t is None:
        return 0
    flat = t.detach().reshape(-1)
    if flat.dtype.is_floating_point:
        flat = flat.float().view(torch.int32)  # exact for every float dtype: compares bits, not values
    flat = flat.long()
    return (flat * (torch.arange(flat.numel(), device=flat.device) * 2 + 1)).sum()


_MESSAGE_BYTES = 480  # of a rank's validation error, shown by the other ranks


def _gather_device(group, hidden) -> torch.device:
    if isinstance(hidden, Tensor) and not hidden.is_meta:
        return hidden.device
    backend = str(dist.get_backend(group))
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def check_group(vp: VocabParallel, *, hidden=None, weight=None, labels=None, settings: Mapping[str, int] = {},
                tensors: Mapping[str, Tensor | None] = {}, sharded_dtensor: bool = False,
                error: BaseException | None = None) -> VocabParallel:
    """The option with ``vocab_size`` filled in, after checking the call across the group (a collective).

    Every rank of the group calls it once per loss call, before any other
    collective, also a rank whose own validation failed (``error``): the ranks
    exchange their slices, input shapes, checksums and validity in one small
    all-gather, and then every rank raises the same kind of error (the failing
    rank its own), so no rank is left waiting in a later collective.

    Args:
        vp: the option.
        hidden: (..., D) this rank's hidden states (the same on every rank).
        weight: (stop - start, D) this rank's rows of the head.
        labels: (...) global label ids (the same on every rank).
        settings: per loss option, a digest of its value (``LossOptions.digests()``):
            the same keys in the same order on every rank.
        tensors: per-call tensors that must be equal on every rank (class
            weights, position ids, per-token objective inputs), by name; None for absent.
        sharded_dtensor: the slice came from a ``Shard(0)`` DTensor weight (the
            error for ranks with different inputs then says what that usually means).
        error: this rank's validation error, or None.

    Raises:
        ``error`` on the rank it happened; ValueError starting with "vocab_parallel"
        on the others (naming the rank and its message). Else ValueError naming what
        differs: "weight" (rows that are not the rank's slice), "hidden" / "labels" /
        an option / a tensor (different on some ranks), "vocab_parallel" (slices that
        do not tile [0, V), vocab_size that disagrees).
    """
    group, rank, world = group_of(vp)
    names = [*settings, *tensors]
    ok = error is None
    message = b""
    if ok:
        shapes = [vp.start, vp.stop, weight.shape[0], hidden.shape[-1], hidden.numel() // max(hidden.shape[-1], 1),
                  int(vp.reduce_hidden_grad)]
        sums = [checksum(labels), *settings.values(), *(checksum(t) for t in tensors.values())]
    else:
        shapes, sums = [0] * 6, [0] * (1 + len(names))
        message = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
    device = _gather_device(group, hidden)
    fixed = torch.tensor([int(not ok), *shapes, len(message)], dtype=torch.int64, device=device)
    variable = torch.stack([torch.as_tensor(s, dtype=torch.int64, device=device).reshape(()) for s in sums])
    text = torch.zeros(_MESSAGE_BYTES, dtype=torch.int64, device=device)
    if message:
        text[:len(message)] = torch.tensor(list(message), dtype=torch.int64, device=device)
    mine = torch.cat([fixed, variable, text])
    everyone = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
    all_gather(everyone, mine, group)
    meta = everyone.reshape(world, -1).tolist()
    n_fixed, n_sums = fixed.numel(), variable.numel()
    if not ok:
        raise error
    for r, row in enumerate(meta):
        if row[0]:
            length = row[n_fixed - 1]
            text_r = bytes(row[n_fixed + n_sums:n_fixed + n_sums + length]).decode(errors="replace")
            raise ValueError(f"vocab_parallel: rank {r} of the vocabulary-parallel group refused this call, so every "
                             f"rank does: {text_r}")
    slices = [(row[1], row[2]) for row in meta]
    for r, row in enumerate(meta):
        start, stop, rows = row[1:4]
        if rows != stop - start:
            raise ValueError(f"weight: rank {r} of the vocabulary-parallel group holds {rows} rows of the head, but "
                             f"its slice [{start}, {stop}) has {stop - start}; pass the rank's rows weight[start:stop]")
    columns = [(4, "hidden", "hidden size D"), (5, "hidden", "token count"), (6, "vocab_parallel", "reduce_hidden_grad"),
               (n_fixed, "labels", "labels"), *((n_fixed + 1 + i, name, "value") for i, name in enumerate(names))]
    for column, name, what in columns:
        values = [row[column] for row in meta]
        if len(set(values)) == 1:
            continue
        if sharded_dtensor and name in ("hidden", "labels"):
            raise ValueError(
                f"weight: a Shard(0) DTensor weight is read as a vocabulary-parallel head (tensor parallelism: every "
                f"rank of its mesh computes the same tokens over its own rows), but the ranks pass different {name} "
                f"({what}). An FSDP2-sharded head read outside its module's forward looks exactly like this: FSDP2 "
                "gathers the whole weight only inside the head's forward. Call the loss from the head's forward (as "
                "dft_ops.patch does), or pass the rank's rows with vocab_parallel=dft_ops.VocabParallel(...) "
                "explicitly if the vocabulary really is split")
        shown = values if column < n_fixed else "checksums differ"
        raise ValueError(f"{name}: the ranks of the vocabulary-parallel group disagree on the {what} ({shown}); "
                         "every rank computes the loss of the same tokens with the same labels and options")
    covered = 0
    for start, stop, r in sorted((start, stop, r) for r, (start, stop) in enumerate(slices)):
        if start != covered:
            problem = "a gap" if start > covered else "an overlap"
            raise ValueError(f"vocab_parallel: the slices of the group's ranks do not tile [0, V): {problem} at row "
                             f"{min(start, covered)} (rank {r} starts at {start}; slices by rank: {slices})")
        covered = stop
    if covered == 0:
        raise ValueError("vocab_parallel: every rank's slice is empty: the group holds no vocabulary")
    if vp.vocab_size is not None and vp.vocab_size != covered:
        raise ValueError(f"vocab_size: {vp.vocab_size}, but the group's slices tile [0, {covered})")
    if covered >= 2**53:  # the forward all-gathers argmax ids as float64
        raise ValueError(f"vocab_parallel: a vocabulary of {covered} rows is too large")
    return replace(vp, vocab_size=covered)
