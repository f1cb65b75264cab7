"""The public functional API: ``dft_ops.linear_cross_entropy``.

Validates the tensors (a clear TypeError/ValueError naming the argument, never
a kernel reading out of bounds), builds the :class:`~dft_ops.LossOptions` and
the :class:`~dft_ops.TokenLayout` of the call (causal shift, ignored tokens
dropped from the work; the hidden states are never copied or sliced), runs the
autograd Function on the chosen backend, and reduces.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from . import objectives as _objectives
from .autograd import LinearCrossEntropyFunction
from .layout import TokenLayout, check_dense
from .options import UNSET, LossOptions, resolve_options

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TokenStats(NamedTuple):
    """Per-token statistics computed in the same pass as the loss, without logits.

    Each has the shape of the loss positions (labels, or labels[..., shift:]
    with shift), is 0 / False at ignored positions and carries no gradient.
    ``stats["entropy"]`` works as well as ``stats.entropy``.

    Attributes:
        logprob: float32, log-probability of the label.
        entropy: float32, entropy (nats) of the predicted distribution.
        is_top1: bool, the label has the largest logit (ties count as a hit).
        mask: bool, True at the loss positions whose label is not ignored
            (what to average the other fields over); None only in a TokenStats
            built by hand.
    """

    logprob: Tensor
    entropy: Tensor
    is_top1: Tensor
    mask: Tensor | None = None

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
    objective: str | _objectives.Objective = UNSET["objective"],
    ignore_index: int = UNSET["ignore_index"],
    reduction: str = UNSET["reduction"],
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = UNSET["softcap"],
    shift: bool | int = UNSET["shift"],
    return_stats: bool = UNSET["return_stats"],
    backend: str = UNSET["backend"],
    filter_eps: float | None = UNSET["filter_eps"],
    backward_mode: str = UNSET["backward_mode"],
    workspace_mb: float = UNSET["workspace_mb"],
    position_ids: Tensor | None = None,
    options: LossOptions | None = None,
):
    """Loss of ``softmax(hidden @ weight.T + bias)`` against ``labels``, without materializing logits.

    Args:
        hidden: (..., D) float32 / bfloat16 / float16 final hidden states.
        weight: (V, D) output head, float32 / bfloat16 / float16.
        labels: (...) integer labels, the leading shape of hidden;
            ``ignore_index`` marks positions that contribute nothing.
        bias: (V,) head bias, or None.
        objective: "dft" (``-sg(p) log p``), "ce" (``-log p``), "chord", or an
            instance from :mod:`dft_ops.objectives`.
        ignore_index: label value to ignore (an int64).
        reduction: "mean" (sum over non-ignored tokens divided by their count,
            or by ``num_items_in_batch``), "sum", or "none" (one value per
            loss position, 0 where ignored).
        num_items_in_batch: positive finite number, or a real tensor holding one
            (any device): the "mean" divisor (gradient accumulation: the token
            count of the whole batch).
        softcap: positive float: logits <- softcap * tanh(logits / softcap).
        shift: position t predicts ``labels[..., t + shift]``; True is 1 (the
            Hugging Face causal shift), False is 0. Needs labels with a sequence
            dimension (ndim >= 2) when non-zero.
        return_stats: also return :class:`TokenStats`.
        backend: "triton" (CUDA), "torch" (chunked PyTorch, any device) or
            "auto" (triton on CUDA, torch elsewhere).
        filter_eps: gradient filtering for the Triton backward: skip a
            (tokens x vocabulary) tile when every gradient entry in it is below
            ``filter_eps * max|upstream x weight|``. None (default) is exact.
        backward_mode: the Triton backward: "auto" ("gemm", or "fused" with
            filter_eps), "gemm" (vocabulary splits, cuBLAS products, a bounded
            workspace) or "fused" (one kernel, no workspace); docs/backward.md.
        workspace_mb: bound of the "gemm" backward's workspace, MiB (default 256).
        position_ids: (...) integer positions, the shape of labels, for packed
            batches: a new sequence starts wherever it is 0 (and at every row).
            Only sequence-level objectives use it; without it the sequences
            are the rows of labels.
        options: a :class:`dft_ops.LossOptions` holding the options above;
            option keywords given explicitly override its fields.

    Dtypes: hidden, weight and bias may differ (e.g. bf16 hidden states with an
    fp32 head, as autocast produces them): the loss is computed in the
    16-bit dtype among them (fp32 if none), with fp32 accumulation, and each
    gradient comes back in its own input's dtype. Under ``torch.autocast`` for
    hidden's device, the autocast dtype is used, as ``nn.Linear`` would.

    Returns:
        loss: float32 0-d tensor, or (...) per loss position with
        reduction="none"; ``(loss, stats)`` when ``return_stats``.

    Raises:
        TypeError / ValueError naming the offending argument. RuntimeError on
        double backward (``create_graph=True`` through this loss).
    """
    opts = resolve_options(options, objective=objective, ignore_index=ignore_index, reduction=reduction,
                           softcap=softcap, shift=shift, return_stats=return_stats, backend=backend,
                           filter_eps=filter_eps, backward_mode=backward_mode, workspace_mb=workspace_mb)
    _check_tensors(hidden, weight, labels, bias)
    num_items = _check_num_items(num_items_in_batch)
    layout = TokenLayout(labels, shift=opts.shift, ignore_index=opts.ignore_index, position_ids=position_ids)
    D, V = hidden.shape[-1], weight.shape[0]
    # one device sync: label range, the computed-token count, and the Trainer's num_items_in_batch tensor
    read = layout.compact(V, *([num_items] if isinstance(num_items, Tensor) else []))
    if isinstance(num_items, Tensor):
        num_items = _positive_finite_items(read[0])

    hidden, weight, bias = _to_compute_dtype(hidden, weight, bias)
    value, logprob, entropy, is_top1 = LinearCrossEntropyFunction.apply(
        hidden.reshape(-1, D), weight, bias, layout, opts)

    if opts.reduction == "none":
        loss = layout.to_loss_positions(value)
    elif opts.reduction == "sum":
        loss = value.sum()
    else:
        loss = value.sum() / (max(layout.n_computed, 1) if num_items is None else num_items)
    if not opts.return_stats:
        return loss
    stats = TokenStats(*(layout.to_loss_positions(t) for t in (logprob, entropy, is_top1)), mask=layout.mask)
    return loss, stats


def compute_dtype(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> torch.dtype:
    """The dtype the loss is computed in (see linear_cross_entropy's "Dtypes").

    Under autocast for hidden's device: the autocast dtype (what ``nn.Linear``
    would compute in). Otherwise the 16-bit dtype among the inputs, or float32
    when all are float32; bfloat16 with float16 has no common lower precision
    and raises a TypeError naming the later argument.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in _FLOAT_DTYPES:
        return torch.get_autocast_dtype(device_type)
    dtype = hidden.dtype
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None or t.dtype == dtype or t.dtype == torch.float32:
            continue
        if dtype != torch.float32:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be combined with {dtype} (no common lower precision); "
                            "cast one of them")
        dtype = t.dtype
    return dtype


def _to_compute_dtype(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    """Casts the inputs to compute_dtype (differentiably: each gradient returns in its input's dtype).

    Interim: the backends will take mixed dtypes themselves (no cast copy of
    an fp32 head); until then the front end casts, as nn.Linear under autocast does.
    """
    dtype = compute_dtype(hidden, weight, bias)
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    # a (V,) bias with a stride other than 1 (e.g. expanded) is copied: O(V), and every backend can assume it
    return cast(hidden), cast(weight), None if bias is None else cast(bias).contiguous()


def _check_num_items(num_items_in_batch):
    """None, a positive finite float, or a 0-d real tensor to read with the labels (checked after reading)."""
    value = num_items_in_batch
    if value is None:
        return None
    name = "num_items_in_batch"
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a positive number or a tensor holding one, got bool")
    if isinstance(value, Tensor):
        check_dense(name, value)
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name}: expected a real (integer or floating) tensor, got {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a single number, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive number or a tensor holding one, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    return _positive_finite_items(value)


def _positive_finite_items(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"num_items_in_batch: must be a positive finite number, got {value}")
    return value


def _check_tensors(hidden, weight, labels, bias) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias)):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor{' or None' if name == 'bias' else ''}, "
                            f"got {type(t).__name__}")
        check_dense(name, t)
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported; use float32, bfloat16 or float16")
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
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) (V,), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: on {t.device} but hidden is on {hidden.device}; put all inputs on one device")
    compute_dtype(hidden, weight, bias)
