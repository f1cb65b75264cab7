"""The public functional API: ``dft_ops.linear_cross_entropy``.

Validates the tensors (a clear TypeError/ValueError naming the argument, never
a kernel reading out of bounds), builds the :class:`~dft_ops.LossOptions` and
the :class:`~dft_ops.TokenLayout` of the call (causal shift, ignored tokens
dropped from the work; the head is never copied, cast or sliced, and the hidden
states are only viewed as (N, D) - copied by that reshape alone when their
leading dimensions cannot be flattened into a view), runs the autograd Function on the chosen backend, reduces, and returns
the :class:`TokenStats` when asked.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from . import objectives as _objectives
from . import vocab_parallel as _vocab_parallel
from .autograd import FunctionOutputs, LinearCrossEntropyFunction, autocast_dtype
from .backend_contract import product_dtype
from .dtensor_inputs import localize
from .layout import TokenLayout, check_dense
from .options import UNSET, LossOptions, resolve_options

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TokenStats(NamedTuple):
    """Per-token statistics computed in the same pass as the loss, without logits.

    Each per-token field has the shape of the loss positions (labels, or
    labels[..., shift:] with shift), is 0 / False at ignored positions (-1 for
    ``predicted``) and carries no gradient. ``stats["entropy"]`` works as well
    as ``stats.entropy``; :attr:`accuracy` is the token accuracy over ``mask``.

    Attributes:
        logprob: float32, log-probability of the label.
        entropy: float32, entropy (nats) of the predicted distribution.
        is_top1: bool, the label has the largest logit (ties count as a hit).
        mask: bool, True at the loss positions whose label is not ignored
            (what to average the other fields over); None only in a TokenStats
            built by hand.
        lse: float32, log-sum-exp of the (soft-capped, tempered) logits: Cut
            Cross-Entropy's ``return_lse``.
        predicted: int64, the predicted token (first index of the largest
            logit), -1 where ignored.
        z_loss: float32, each token's ``z_loss * lse^2`` (included in the
            loss), or None when the z_loss option is 0.
        reduced_z_loss: the z-loss part of the returned loss, reduced as the
            loss is (a float32 0-d tensor for "mean" / "sum" with the loss's
            own divisor; per loss position for "none"), or None when z_loss is
            0. ``loss - reduced_z_loss`` is the objective without the z-loss.
        kl: float32, with an :class:`~dft_ops.objectives.ASFT` objective: each
            token's KL to the reference (KL(q || p) for direction "forward",
            KL(p || q) for "reverse"), unscaled (the loss holds ``kl_coef * kl``);
            None for other objectives.
    """

    logprob: Tensor
    entropy: Tensor
    is_top1: Tensor
    mask: Tensor | None = None
    lse: Tensor | None = None
    predicted: Tensor | None = None
    z_loss: Tensor | None = None
    reduced_z_loss: Tensor | None = None
    kl: Tensor | None = None

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)

    def keys(self):
        return self._fields

    @property
    def accuracy(self) -> Tensor:
        """float32 0-d: the fraction of non-ignored tokens whose label is top-1 (Liger's token accuracy; 0 if none)."""
        if self.mask is None:
            raise ValueError("mask: these stats carry no mask (TokenStats.mask is None); average is_top1 yourself")
        hits = (self.is_top1 & self.mask).sum(dtype=torch.float32)
        return hits / self.mask.sum().clamp(min=1).to(torch.float32)


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
    label_smoothing: float = UNSET["label_smoothing"],
    z_loss: float = UNSET["z_loss"],
    temperature: float | None = UNSET["temperature"],
    class_weight: Tensor | None = UNSET["class_weight"],
    precise: bool = UNSET["precise"],
    vocab_parallel: _vocab_parallel.VocabParallel | None = UNSET["vocab_parallel"],
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
            instance from :mod:`dft_ops.objectives` (an
            :class:`~dft_ops.objectives.ASFT` holding this batch's reference,
            ``ASFT(...).with_reference(ref_hidden, ref_weight, ...)``).
        ignore_index: label value to ignore (an int64).
        reduction: "mean" (sum over non-ignored tokens divided by their count,
            by the sum of ``class_weight[label]`` over them with class
            weights, or by ``num_items_in_batch`` when given), "sum", or "none"
            (one value per loss position, 0 where ignored).
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
        label_smoothing: eps in [0, 1): per token ``(1 - eps) u_y l + (eps / V)
            w sum_j u_j (-log softmax_j)`` with the objective's loss ``l`` and
            detached weight ``w`` (DFT: ``sg(p)``), u the class weights (PyTorch's
            label_smoothing for "ce").
        z_loss: adds ``z_loss * lse^2`` per token, unweighted (>= 0).
        temperature: positive float: logits <- logits / temperature, after
            the soft-cap (TRL's temperature).
        class_weight: (V,) floating tensor >= 0 on hidden's device, or None:
            the label term of a token weighs ``class_weight[label]`` (PyTorch's
            ``weight``; see ``reduction`` for the mean). Not differentiated.
        precise: the Triton backward feeds the 16-bit gradient tile to its
            products as a high and a low part: elementwise-accurate 16-bit
            gradients for twice the product work (no effect on fp32 products
            or the torch backend, which keeps the tile in fp32).
        vocab_parallel: a :class:`dft_ops.VocabParallel`: ``weight`` (and
            ``bias``) are this rank's rows [start, stop) of a head split over a
            process group, labels are global ids, and the result is the whole
            vocabulary's on every rank (a collective: every rank calls it with
            the same hidden states and labels). ``class_weight`` stays the whole
            (V,) vector. See docs/distributed.md.
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

    DTensors: a ``Shard(0)`` weight (and bias) is the vocabulary-parallel loss
    over its mesh; ``Replicate()`` DTensors are computed on their local
    tensors; each gradient keeps its input's placement (docs/distributed.md).

    Dtypes: hidden and weight may differ (e.g. bf16 hidden states with an fp32
    head, as autocast produces them): the products run in the 16-bit dtype of
    the two (fp32 if both are), their operands rounded in registers (no copy
    of the head), with fp32 accumulation; the bias (any float dtype) is added
    in fp32; each gradient comes back in its own input's dtype. Under
    ``torch.autocast`` for hidden's device the products run in the autocast
    dtype, as ``nn.Linear``'s would.

    Returns:
        loss: float32 0-d tensor, or (...) per loss position with
        reduction="none"; ``(loss, stats)`` (:class:`TokenStats`) when
        ``return_stats``.

    Raises:
        TypeError / ValueError naming the offending argument. RuntimeError on
        double backward (``create_graph=True`` through this loss).
    """
    opts = resolve_options(options, objective=objective, ignore_index=ignore_index, reduction=reduction,
                           softcap=softcap, shift=shift, return_stats=return_stats, backend=backend,
                           filter_eps=filter_eps, label_smoothing=label_smoothing, z_loss=z_loss,
                           temperature=temperature, class_weight=class_weight, precise=precise,
                           vocab_parallel=vocab_parallel, backward_mode=backward_mode,
                           workspace_mb=workspace_mb)
    hidden, weight, bias, labels, split = localize(hidden, weight, bias, labels, opts.vocab_parallel)
    _check_tensors(hidden, weight, labels, bias, vocab_rows=split is not None)
    num_items = _check_num_items(num_items_in_batch)
    layout = TokenLayout(labels, shift=opts.shift, ignore_index=opts.ignore_index, position_ids=position_ids)
    split = _vocab_parallel.check_group(split, hidden, weight, labels)
    opts = opts if split is opts.vocab_parallel else opts.replace(vocab_parallel=split)
    D, V = hidden.shape[-1], weight.shape[0] if split is None else split.vocab_size
    to_read = {"num_items": num_items} if isinstance(num_items, Tensor) else {}
    if opts.class_weight is not None:
        to_read |= _check_class_weight(opts.class_weight, V, hidden.device, layout,
                                       weighted_mean=opts.reduction == "mean" and num_items is None)
    # one device sync: label range, the computed-token count, and the 0-d tensors to read with them
    read = dict(zip(to_read, layout.compact(V, *to_read.values())))
    if "num_items" in read:
        num_items = _positive_finite_items(read["num_items"])
    if read.get("invalid_class_weights"):
        raise ValueError(f"class_weight: {int(read['invalid_class_weights'])} value(s) negative or not finite; "
                         "expected finite weights >= 0")

    out = FunctionOutputs(*LinearCrossEntropyFunction.apply(hidden.reshape(-1, D), weight, bias, layout, opts))

    if num_items is not None:
        divisor = num_items
    elif "target_weight_sum" in read:
        divisor = read["target_weight_sum"] or 1.0  # no weight at all (e.g. every token ignored): loss 0, not NaN
    else:
        divisor = max(layout.n_computed, 1)
    loss = _reduce(out.value, layout, opts.reduction, divisor)
    if not opts.return_stats:
        return loss
    to_positions = layout.to_loss_positions
    stats = TokenStats(
        to_positions(out.logprob), to_positions(out.entropy), to_positions(out.is_top1), mask=layout.mask,
        lse=to_positions(out.lse), predicted=to_positions(out.predicted).masked_fill(~layout.mask, -1),
        z_loss=None if out.z_loss is None else to_positions(out.z_loss),
        reduced_z_loss=None if out.z_loss is None else _reduce(out.z_loss, layout, opts.reduction, divisor),
        kl=None if out.kl is None else to_positions(out.kl))
    return loss, stats


def _reduce(values: Tensor, layout: TokenLayout, reduction: str, divisor: float) -> Tensor:
    """(N,) per-position values -> the loss's reduction ("mean" divides the sum by ``divisor``)."""
    if reduction == "none":
        return layout.to_loss_positions(values)
    if reduction == "sum":
        return values.sum()
    return values.sum() / divisor


def _check_class_weight(class_weight: Tensor, V: int, device, layout: TokenLayout, *,
                        weighted_mean: bool) -> dict[str, Tensor]:
    """Length and device now; 0-d tensors to read with the labels: invalid values, the weighted mean's divisor."""
    if tuple(class_weight.shape) != (V,):
        raise ValueError(f"class_weight: expected shape ({V},) (V, the whole vocabulary's size), "
                         f"got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"class_weight: on {class_weight.device} but hidden is on {device}; "
                         "put it on hidden's device")
    reads = {"invalid_class_weights": (~(torch.isfinite(class_weight) & (class_weight >= 0))).sum()}
    if weighted_mean:
        # PyTorch's weighted mean: sum_t u[y_t] over non-ignored tokens (labels outside [0, V) fail in compact)
        u = class_weight.to(torch.float64).gather(0, layout.targets.clamp(0, V - 1))
        reads["target_weight_sum"] = torch.where(layout.valid, u, 0.0).sum()
    return reads


def compute_dtype(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> torch.dtype:
    """The dtype the products run in (see linear_cross_entropy's "Dtypes").

    Under autocast for hidden's device: the autocast dtype (what ``nn.Linear``
    would compute in). Otherwise the 16-bit dtype of hidden and weight, or
    float32 when both are float32 (the backends' ``product_dtype``). bfloat16
    with float16 has no common lower precision and raises a TypeError naming
    ``weight``. The bias (any float dtype) is added in fp32 and never decides.
    """
    requested = autocast_dtype(hidden.device)
    if requested is not None:
        return requested
    if {hidden.dtype, weight.dtype} == {torch.bfloat16, torch.float16}:
        raise TypeError(f"weight: dtype {weight.dtype} cannot be combined with hidden's {hidden.dtype} (no common "
                        "lower precision); cast one of them")
    return product_dtype(hidden.dtype, weight.dtype)


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


def _check_tensors(hidden, weight, labels, bias, vocab_rows: bool = False) -> None:
    """``vocab_rows``: weight holds some rows of a vocabulary split over ranks (possibly none)."""
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
    if weight.shape[0] == 0 and not vocab_rows:
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
