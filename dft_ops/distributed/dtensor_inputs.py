"""DTensor inputs of ``linear_cross_entropy``: placements become local tensors and, for a sharded head, the option.

The rules (anything else is a ValueError / TypeError naming the argument;
never a silent slice, never ``.full_tensor()`` of the head):

- weight ``Shard(0)`` over one mesh dimension (``ColwiseParallel``, a
  vocabulary-sharded head), other mesh dimensions ``Replicate()``: the
  vocabulary-parallel loss over that dimension's process group. The rank's
  slice follows DTensor's ``torch.chunk`` split; the bias must be a DTensor
  with the same placements (or None). The hidden states are replicated over
  the group: a plain tensor, a ``Replicate()`` DTensor, or a DTensor sharded
  over the same mesh dimension along a token dimension (sequence
  parallelism: all-gathered here, and their gradient reduce-scattered).
- weight ``Replicate()`` (every mesh dimension): computed on its local tensor.
- every other DTensor input (hidden, bias, labels) must be ``Replicate()``
  and is computed on its local tensor.

``to_local`` is differentiable, so each gradient reaches the DTensor with its
placement (the weight's: ``Shard(0)`` rows of the rank, or replicated).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from torch import Tensor

from typing import NamedTuple

from .vocab_parallel import VocabParallel


def _dtensor_type():
    # no DTensor can exist before torch.distributed.tensor is imported: plain calls never pay for importing it
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """``t``'s local tensor if it is a DTensor (differentiably), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


class LocalInputs(NamedTuple):
    """The loss's inputs as local tensors; ``vocab_parallel`` the option, from a ``Shard(0)`` weight when
    ``from_dtensor``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    vocab_parallel: VocabParallel | None
    from_dtensor: bool = False


def localize(hidden, weight, bias, labels, vocab_parallel: VocabParallel | None) -> LocalInputs:
    """The inputs with every DTensor replaced by its local tensor (module rules).

    Plain tensors pass through unchanged (no DTensor import cost beyond the check).
    """
    if not any(is_dtensor(t) for t in (hidden, weight, bias, labels)):
        return LocalInputs(hidden, weight, bias, labels, vocab_parallel)
    vocab_dim = _vocab_dim(weight) if is_dtensor(weight) else None
    if vocab_dim is None:
        return LocalInputs(*(replicated_local(name, t) for name, t in (
            ("hidden", hidden), ("weight", weight), ("bias", bias), ("labels", labels))), vocab_parallel)
    if vocab_parallel is not None:
        raise ValueError("vocab_parallel: given together with a Shard(0) DTensor weight, whose placement already says "
                         "how the vocabulary is split; pass the DTensor or the option with the local rows, not both")
    mesh = weight.device_mesh
    V, parts, coordinate = weight.shape[0], mesh.size(vocab_dim), mesh.get_local_rank(vocab_dim)
    chunk = -(-V // parts)  # DTensor's Shard follows torch.chunk: ceil-sized slices, the last ones short or empty
    start = min(coordinate * chunk, V)
    vocab_parallel = VocabParallel(start, min(start + chunk, V), group=mesh.get_group(vocab_dim), vocab_size=V)
    if bias is not None:
        if not is_dtensor(bias) or bias.placements != weight.placements or bias.device_mesh != mesh:
            raise TypeError(f"bias: with a weight sharded over the vocabulary ({weight.placements}) the bias must be a "
                            f"DTensor with the same placements on the same mesh (a plain bias is ambiguous: the "
                            f"whole vector or this rank's rows?); got "
                            f"{bias.placements if is_dtensor(bias) else 'a plain tensor'}")
        bias = bias.to_local()
    if _sequence_sharded(hidden, vocab_dim):
        hidden = _gather_tokens(hidden, weight, vocab_dim)
        vocab_parallel = replace(vocab_parallel, reduce_hidden_grad=False)
    else:
        hidden = replicated_local("hidden", hidden)
    return LocalInputs(hidden, weight.to_local(), bias, replicated_local("labels", labels), vocab_parallel,
                       from_dtensor=True)


def _vocab_dim(weight) -> int | None:
    """The mesh dimension a DTensor weight is split over the vocabulary along, or None when it is replicated."""
    from torch.distributed.tensor import Shard

    split = [(i, p) for i, p in enumerate(weight.placements) if not p.is_replicate()]
    if not split:
        return None
    if len(split) == 1 and type(split[0][1]) is Shard and split[0][1].dim % weight.ndim == 0:
        return split[0][0]
    raise ValueError(f"weight: a DTensor with placements {weight.placements} is not supported: expected Shard(0) "
                     "over one mesh dimension (a vocabulary-parallel head, e.g. ColwiseParallel) or Replicate()")


def replicated_local(name: str, t):
    """The local tensor of a DTensor replicated over its whole mesh; a plain tensor or None as is."""
    if not is_dtensor(t):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"{name}: a DTensor with placements {t.placements} is not supported here: expected "
                         "Replicate() (or a plain tensor)" + (
                             "; hidden states sharded along a token dimension need a weight sharded with Shard(0) "
                             "over the same mesh dimension (sequence parallelism)" if name == "hidden" else ""))
    return t.to_local()


def _sequence_sharded(hidden, vocab_dim: int) -> bool:
    """hidden is a DTensor sharded along a token dimension over the vocabulary's mesh dimension only."""
    from torch.distributed.tensor import Shard

    if not is_dtensor(hidden):
        return False
    for i, p in enumerate(hidden.placements):
        if i == vocab_dim:
            if not (type(p) is Shard and p.dim % hidden.ndim < hidden.ndim - 1):
                return False
        elif not p.is_replicate():
            return False
    return True


def _gather_tokens(hidden, weight, vocab_dim: int) -> Tensor:
    """All-gather token-sharded hidden states; their gradient comes back reduce-scattered.

    The local result is marked ``Partial`` for the backward: each rank's
    d(hidden) is its vocabulary slice's share, which the redistribution back to
    the token shards sums (a reduce-scatter), so the loss does not all-reduce it.
    """
    from torch.distributed.tensor import Partial, Replicate

    if hidden.device_mesh != weight.device_mesh:
        raise ValueError("hidden: sharded over a different device mesh than the weight")
    replicated = [Replicate()] * hidden.device_mesh.ndim
    grads = [Partial() if i == vocab_dim else Replicate() for i in range(len(replicated))]
    return hidden.redistribute(placements=replicated).to_local(grad_placements=grads)


def like_linear_output(out: Tensor, hidden, weight):
    """``out``, a local tensor of the shape of the head's output, as the head's ``nn.Linear`` would return it.

    A DTensor when the head's input is one (tensor-parallel output hooks
    redistribute it): sharded on the last dimension over the mesh dimensions
    the weight is sharded over, replicated over the others. ``out`` must have
    the global shape (an empty ``(..., 0)`` tensor has it on every rank).
    """
    if not is_dtensor(hidden):
        return out
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = hidden.device_mesh
    split = {i for i, p in enumerate(weight.placements) if not p.is_replicate()} if is_dtensor(weight) else set()
    placements = [Shard(out.ndim - 1) if i in split else Replicate() for i in range(mesh.ndim)]
    return DTensor.from_local(out, mesh, placements, run_check=False)
