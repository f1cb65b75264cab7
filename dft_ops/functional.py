"""The public functional API: ``dft_ops.linear_cross_entropy``.

Validates inputs (a clear TypeError/ValueError naming the argument, never a
kernel reading out of bounds), applies the causal shift on the labels (the
hidden states are never copied or sliced), drops ignored tokens from the work,
runs the autograd Function on the chosen backend, and reduces.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from . import objectives as _objectives
from . import torch_backend
from .autograd import LinearCrossEntropyFunction

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "triton", "torch")


class TokenStats(NamedTuple):
    """Per-token statistics computed in the same pass as the loss, without logits.

    Each has the shape of the loss positions (labels, or labels[..., 1:] with
    shift), is 0 / False at ignored positions and carries no gradient.
    ``stats["entropy"]`` works as well as ``stats.entropy``.

    Attributes:
        logprob: float32, log-probability of the label.
        entropy: float32, entropy (nats) of the predicted distribution.
        is_top1: bool, the label has the largest logit (ties count as a hit).
    """

    logprob: Tensor
    entropy: Tensor
    is_top1: Tensor

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)

    def keys(self):
        return self._fields


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    objective: str | _objectives.Objective = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
    shift: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    filter_eps: float | None = None,
    position_ids: Tensor | None = None,
):
    """Loss of ``softmax(hidden @ weight.T + bias)`` against ``labels``, without materializing logits.

    Args:
        hidden: (..., D) float32 / bfloat16 / float16 final hidden states.
        weight: (V, D) output head, same dtype as hidden.
        labels: (...) integer labels, the leading shape of hidden;
            ``ignore_index`` marks positions that contribute nothing.
        bias: (V,) head bias, same dtype as weight, or None.
        objective: "dft" (``-sg(p) log p``), "ce" (``-log p``), or an
            instance from :mod:`dft_ops.objectives`.
        ignore_index: label value to ignore.
        reduction: "mean" (sum over non-ignored tokens divided by their count,
            or by ``num_items_in_batch``), "sum", or "none" (one value per
            loss position, 0 where ignored).
        num_items_in_batch: positive int or 0-d tensor: the "mean" divisor
            (gradient accumulation: the token count of the whole batch).
        softcap: positive float: logits <- softcap * tanh(logits / softcap).
        shift: position t predicts labels[..., t+1] (Hugging Face causal
            shift); needs labels with a sequence dimension (ndim >= 2).
        return_stats: also return :class:`TokenStats`.
        backend: "triton" (CUDA), "torch" (chunked PyTorch, any device) or
            "auto" (triton on CUDA, torch elsewhere).
        filter_eps: gradient filtering for the Triton backward: skip a
            (tokens x vocabulary) tile when every gradient entry in it is below
            ``filter_eps * max|upstream x weight|``. None (default) is exact.
        position_ids: (...) integer positions, the shape of labels, for packed
            batches: a new sequence starts wherever it is 0 (and at every row).
            Only sequence-level objectives use it; without it the sequences
            are the rows of labels.

    Returns:
        loss: float32 scalar, or (...) per position with reduction="none";
        ``(loss, stats)`` when ``return_stats``.

    Raises:
        TypeError / ValueError naming the offending argument.
    """
    obj = _objectives.resolve(objective)
    _check_tensors(hidden, weight, labels, bias)
    _check_options(reduction=reduction, softcap=softcap, num_items_in_batch=num_items_in_batch,
                   ignore_index=ignore_index, backend=backend, return_stats=return_stats,
                   filter_eps=filter_eps)
    if shift and labels.ndim < 2:
        raise ValueError(
            f"shift: needs labels with a sequence dimension, shape (batch, seq) or (..., seq); got shape "
            f"{tuple(labels.shape)}. Flattened tokens of several sequences cannot be shifted safely: "
            "shift them yourself or pass 2-D labels."
        )
    if position_ids is not None:
        if not isinstance(position_ids, Tensor) or position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise TypeError("position_ids: expected an integer tensor of the labels' shape or None")
        if tuple(position_ids.shape) != tuple(labels.shape):
            raise ValueError(f"position_ids: shape {tuple(position_ids.shape)} does not match labels' {tuple(labels.shape)}")
        if position_ids.device != hidden.device:
            raise ValueError(f"position_ids: on {position_ids.device} but hidden is on {hidden.device}")
    impl = _backend_module(backend, hidden.device)

    D, V = hidden.shape[-1], weight.shape[0]
    labels = labels.long()
    if shift:
        # position t predicts labels[t + 1]; the last position predicts nothing
        pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
        targets = torch.cat([labels[..., 1:], pad], dim=-1)
    else:
        targets = labels
    loss_shape = (*labels.shape[:-1], labels.shape[-1] - 1) if shift else tuple(labels.shape)

    flat = targets.reshape(-1)
    n_tokens = flat.numel()
    valid = flat != ignore_index
    n_bad, n_valid, n_items = _read_counts(flat, valid, V, num_items_in_batch)
    if n_bad:
        raise ValueError(
            f"labels: {n_bad} value(s) outside [0, {V}) (vocabulary size from weight) that are not "
            f"ignore_index={ignore_index}"
        )
    if n_items is not None and not n_items > 0:
        raise ValueError(f"num_items_in_batch: must be positive, got {n_items}")

    rows = None if n_valid == n_tokens else valid.nonzero().squeeze(1)
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    inputs = {name: pick(_align_token_input(obj, name, t, loss_shape, shift, hidden.device))
              for name, t in obj.token_tensors().items()}
    segments = _renumber(pick(_segments(targets, position_ids))) if obj.needs_segments else None

    value, logprob, entropy, is_top1 = LinearCrossEntropyFunction.apply(
        hidden.reshape(-1, D), weight, bias, pick(flat), rows, n_tokens, obj, inputs, segments,
        impl, None if softcap is None else float(softcap), return_stats, filter_eps,
    )

    if reduction == "none":
        loss = _loss_positions(value, targets.shape, shift)
    elif reduction == "sum":
        loss = value.sum()
    else:
        if num_items_in_batch is None:
            loss = value.sum() / max(n_valid, 1)
        else:
            loss = value.sum() / torch.as_tensor(num_items_in_batch, device=value.device).to(torch.float32)
    if not return_stats:
        return loss
    stats = TokenStats(*(_loss_positions(t, targets.shape, shift) for t in (logprob, entropy, is_top1)))
    return loss, stats


def _loss_positions(values: Tensor, targets_shape, shift: bool) -> Tensor:
    values = values.reshape(targets_shape)
    return values[..., :-1] if shift else values


def _segments(targets: Tensor, position_ids: Tensor | None) -> Tensor:
    """(N,) int64 sequence id of each flattened position.

    Sequences are the rows of the labels (last dimension), split further where
    ``position_ids`` restarts at 0 (packed documents). Position t belongs to
    the sequence of its own token, whose next token it predicts under shift.
    """
    starts = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    if targets.ndim >= 1 and targets.shape[-1] > 0:
        starts[..., 0] = True
    if position_ids is not None:
        starts |= position_ids == 0
    return torch.cumsum(starts.reshape(-1).long(), dim=0) - 1


def _renumber(segments: Tensor) -> Tensor:
    """Non-decreasing sequence ids -> 0, 1, 2, ... in order (TokenBatch.segments' contract).

    Dropping ignored tokens leaves gaps (a fully ignored sequence, or ids up to
    N for M < N tokens); consecutive ids keep per-sequence sums in an (M,)
    buffer without asking the device how many sequences there are.
    """
    if segments.numel() == 0:
        return segments
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[1:] = segments[1:] != segments[:-1]
    return torch.cumsum(starts.long(), dim=0) - 1


def _align_token_input(obj, name: str, t, loss_shape, shift: bool, device) -> Tensor:
    """An objective's per-token tensor (loss-position shape) -> (N,) float32 in the internal layout."""
    where = f"objective: {type(obj).__name__}.{name}"
    if t is None:
        raise ValueError(f"{where} is None: pass this batch's tensor (objective.with_token_tensors({name}=...), "
                         f"or the forward keyword {name}=... of a model patched with dft_ops.patch)")
    if not isinstance(t, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(loss_shape):
        raise ValueError(f"{where} has shape {tuple(t.shape)}; expected the loss positions' shape {tuple(loss_shape)}"
                         + (" (labels[..., 1:] with shift=True)" if shift else ""))
    if t.device != device:
        raise ValueError(f"{where} is on {t.device} but hidden is on {device}")
    t = t.detach().to(torch.float32)
    if shift:
        t = torch.cat([t, t.new_zeros((*t.shape[:-1], 1))], dim=-1)
    return t.reshape(-1)


def _read_counts(flat: Tensor, valid: Tensor, vocab: int, num_items_in_batch) -> tuple[int, int, float | None]:
    """(labels out of range, labels not ignored, num_items_in_batch's value) in one device sync.

    The Trainer passes num_items_in_batch as a device tensor every step: reading it
    with the label counts keeps validation at a single synchronisation.
    """
    bad = valid & ((flat < 0) | (flat >= vocab))
    values = [bad.sum(), valid.sum()]
    if isinstance(num_items_in_batch, Tensor):
        values.append(num_items_in_batch.detach().reshape(()).to(flat.device))
    read = torch.stack([v.to(torch.float64) for v in values]).tolist()
    n_items = read[2] if len(read) == 3 else num_items_in_batch
    return int(read[0]), int(read[1]), n_items


def _backend_module(backend: str, device: torch.device):
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return torch_backend
    from . import kernels  # imports triton: only when asked for

    if device.type != "cuda" and not kernels.interpreting():
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
            f"interpreter); hidden is on {device}. Use backend='torch' or 'auto'."
        )
    return kernels


def _check_tensors(hidden, weight, labels, bias) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden: dtype {hidden.dtype} is not supported; use float32, bfloat16 or float16")
    if hidden.ndim < 2:
        raise ValueError(f"hidden: expected shape (..., D) with at least one token dimension, got {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError("hidden: hidden size D (last dimension) is 0")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected shape (V, D), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match hidden size D={hidden.shape[-1]}; "
                         "expected (V, D)")
    if weight.shape[0] == 0:
        raise ValueError("weight: vocabulary size V (first dimension) is 0")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}; cast one of them")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels: expected an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) (V,), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} differs from weight's {weight.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: on {t.device} but hidden is on {hidden.device}; put all inputs on one device")


def _check_options(*, reduction, softcap, num_items_in_batch, ignore_index, backend, return_stats, filter_eps) -> None:
    """Checks that need no tensor data (shared with the nn.Module constructor)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {type(return_stats).__name__}")
    if softcap is not None:
        if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
            raise TypeError(f"softcap: expected a positive float or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap: must be a positive finite number, got {softcap}")
    if filter_eps is not None:
        if not isinstance(filter_eps, numbers.Real) or isinstance(filter_eps, bool):
            raise TypeError(f"filter_eps: expected a float in (0, 1) or None, got {type(filter_eps).__name__}")
        if not 0 < filter_eps < 1:
            raise ValueError(f"filter_eps: must be in (0, 1), got {filter_eps}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, bool):
            raise TypeError("num_items_in_batch: expected a positive int or a 0-d tensor, got bool")
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch: expected a single number, got a tensor of shape "
                                 f"{tuple(num_items_in_batch.shape)}")
        elif not isinstance(num_items_in_batch, numbers.Real):
            raise TypeError(f"num_items_in_batch: expected a positive int or a 0-d tensor, got "
                            f"{type(num_items_in_batch).__name__}")

