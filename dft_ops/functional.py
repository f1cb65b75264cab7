"""The public functional API: ``dft_ops.linear_cross_entropy``, the door every call goes through.

Validates every argument once (a clear TypeError/ValueError naming it, never a
kernel reading out of bounds: the options by :class:`~dft_ops.LossOptions`,
tensors by :mod:`dft_ops.inputs`), builds the call's
:class:`~dft_ops.TokenLayout` (causal shift, ignored tokens dropped from the
work; the head is never copied, cast or sliced, and the hidden states are only
viewed as (N, D) - copied by that reshape alone when their leading dimensions
cannot be flattened into a view), its head description and backend in one
:class:`~dft_ops.loss_call.LossCall`, runs the autograd Function, reduces,
and returns the :class:`TokenStats` when asked.

Under vocabulary parallelism the ranks agree on the call before any other
collective (:func:`~dft_ops.distributed.check_group`): every rank raises the
same error, whichever rank's inputs are wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import custom_op as _custom_op
from . import inputs as _inputs
from . import objectives as _objectives
from .autograd import FunctionOutputs, LinearCrossEntropyFunction
from .backends import backward_mode, select_backend
from .backends.protocol import Needs, SecondHead
from .distributed import VocabParallel, check_group, is_dtensor, localize
from .layout import TokenLayout
from .loss_call import LossCall, build_call
from .options import UNSET, LossOptions, resolve_options

TOKEN_INPUTS = _inputs.TOKEN_INPUTS
# what the ranks of a vocabulary-parallel group compare, the same keys in the same order on every rank
_COMPARED_OPTIONS = tuple(name for name in LossOptions.names() if name != "vocab_parallel")
_COMPARED_TENSORS = ("class_weight", "position_ids", *TOKEN_INPUTS)


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
            with :class:`~dft_ops.objectives.Distill`: each distilled token's
            divergence to the teacher, unscaled (also at the tokens without a
            label that ``distill_unlabeled`` computes; the other fields are 0
            there, as at every ignored position); None for other objectives.
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
    vocab_parallel: VocabParallel | None = UNSET["vocab_parallel"],
    backward_mode: str = UNSET["backward_mode"],
    workspace_mb: float = UNSET["workspace_mb"],
    sync_free: bool = UNSET["sync_free"],
    position_ids: Tensor | None = None,
    second_head: SecondHead | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    distill_mask: Tensor | None = None,
    options: LossOptions | None = None,
):
    """Loss of ``softmax(hidden @ weight.T + bias)`` against ``labels``, without materializing logits.

    Args (each option's formula, default and errors: docs/api.md):
        hidden: (..., D) float32 / bfloat16 / float16 final hidden states.
        weight: (V, D) output head, float32 / bfloat16 / float16.
        labels: (...) integer labels, the leading shape of hidden;
            ``ignore_index`` marks positions that contribute nothing.
        bias: (V,) head bias, or None.
        objective, ignore_index, reduction, softcap, shift, return_stats,
            backend, filter_eps, label_smoothing, z_loss, temperature,
            class_weight, precise, vocab_parallel, backward_mode,
            workspace_mb, sync_free: the options (:class:`dft_ops.LossOptions`).
        num_items_in_batch: the "mean" divisor (gradient accumulation: the
            token count of the whole batch): a finite number, or a real tensor
            holding one (any device). 0 only for a batch with no token to
            train on (loss 0, zero gradients).
        position_ids: (...) integer positions, the shape of labels, for packed
            batches: a new sequence starts wherever it is 0 (and at every row).
            Only sequence-level objectives use it.
        second_head: a :class:`dft_ops.SecondHead` (hidden (..., D2) with
            hidden's leading shape, weight (V, D2), bias, softcap): the frozen
            head an objective with ``needs_second_head`` compares with (ASFT's
            reference model, Distill's teacher). Never differentiated.
        old_logprobs / ref_logprobs: PSFT's / ImportanceWeighted's per-token
            inputs, float tensors of the loss positions' shape (labels, or
            ``labels[..., shift:]``).
        distill_mask: with ``objectives.Distill(distill_unlabeled=True)``: a
            bool (or integer) tensor of the loss positions' shape, nonzero
            where a token without a label is distilled (e.g. the attention
            mask: no padding); None: every such token.
        options: a :class:`dft_ops.LossOptions` holding the options; option
            keywords given explicitly override its fields.

    DTensors: a ``Shard(0)`` weight (and bias) is the vocabulary-parallel loss
    over its mesh; ``Replicate()`` DTensors are computed on their local
    tensors; each gradient keeps its input's placement (docs/distributed.md).

    Dtypes: hidden and weight may differ (e.g. bf16 hidden states with an fp32
    head, as autocast produces them): the products run in the 16-bit dtype of
    the two (fp32 if both are), their operands rounded in registers (no copy
    of the head), with fp32 accumulation; the bias (any float dtype) is added
    in fp32; each gradient comes back in its own input's dtype. Under
    ``torch.autocast`` for hidden's device the products run in the autocast
    dtype, as ``nn.Linear``'s would. The same rule for a second head.

    Returns:
        loss: float32 0-d tensor, or (...) per loss position with
        reduction="none"; ``(loss, stats)`` (:class:`TokenStats`) when
        ``return_stats``.

    Raises:
        TypeError / ValueError naming the offending argument. RuntimeError on
        double backward (``create_graph=True`` through this loss).
    """
    keywords = dict(objective=objective, ignore_index=ignore_index, reduction=reduction, softcap=softcap, shift=shift,
                    return_stats=return_stats, backend=backend, filter_eps=filter_eps,
                    label_smoothing=label_smoothing, z_loss=z_loss, temperature=temperature,
                    class_weight=class_weight, precise=precise, vocab_parallel=vocab_parallel,
                    backward_mode=backward_mode, workspace_mb=workspace_mb, sync_free=sync_free)
    batch = dict(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, second_head=second_head,
                 distill_mask=distill_mask)
    if _custom_op.wanted():
        # under torch.compile: the registered operator, which the compiler sees as one node
        done = _custom_op.loss(hidden, weight, labels, bias, position_ids, num_items_in_batch, batch, keywords,
                               options)
        if done is not _custom_op.UNSUPPORTED:
            return results(done.outputs, done.layout, return_stats=done.return_stats, divisor=done.divisor)
    door = _validated(hidden, weight, labels, bias, position_ids, num_items_in_batch, batch, keywords, options)
    call = door.call
    out = FunctionOutputs(*LinearCrossEntropyFunction.apply(door.hidden, call.head.weight, call.head.bias, call))
    return results(out, call.layout, return_stats=call.options.return_stats, divisor=call.divisor)


def results(out: FunctionOutputs, layout: TokenLayout, *, return_stats: bool, divisor: float | Tensor | None):
    """What :func:`linear_cross_entropy` returns from the Function's (or the custom operator's) per-position
    outputs: the loss (0-d, or of the loss positions' shape for ``divisor`` None), and the TokenStats."""
    loss = out.value if divisor is not None else layout.to_loss_positions(out.value)
    if not return_stats:
        return loss
    to_positions = layout.to_loss_positions
    if layout.has_unlabeled:  # rows distilled without a label: their label statistics are an ignored token's
        def labeled(t):
            return to_positions(t).masked_fill(~layout.mask, 0)
    else:
        labeled = to_positions
    stats = TokenStats(
        labeled(out.logprob), labeled(out.entropy), labeled(out.is_top1), mask=layout.mask,
        lse=labeled(out.lse), predicted=to_positions(out.predicted).masked_fill(~layout.mask, -1),
        z_loss=None if out.z_loss is None else to_positions(out.z_loss),
        reduced_z_loss=None if out.z_loss is None else _reduce(out.z_loss, layout, divisor),
        kl=None if out.kl is None else to_positions(out.kl))
    return loss, stats


def _reduce(values: Tensor, layout: TokenLayout, divisor: float | Tensor | None) -> Tensor:
    """(N,) per-position values reduced as the loss is: the sum over ``divisor``, or per loss position (None)."""
    if divisor is None:
        return layout.to_loss_positions(values)
    return values.sum() / divisor


class _Door(NamedTuple):
    """What the door hands on: hidden as (N, D) and the validated call."""

    hidden: Tensor
    call: LossCall


def _validated(hidden, weight, labels, bias, position_ids, num_items_in_batch, batch: dict, keywords: dict,
               options) -> _Door:
    """Every argument checked once and the call built (module docstring); one device synchronisation."""
    hint = _vocab_parallel_hint(keywords, options, weight)
    try:
        opts = resolve_options(options, **keywords)
        objective, held, held_second = _objectives.batch_tensors(opts.objective)
        if objective is not opts.objective:  # this batch's tensors held the deprecated way: call arguments now
            opts = opts.replace(objective=objective)
            batch = {**batch, **{k: v for k, v in held.items() if batch.get(k) is None}}
            batch["second_head"] = batch["second_head"] if batch["second_head"] is not None else held_second
        local = localize(hidden, weight, bias, labels, opts.vocab_parallel)
        hidden, weight, bias, labels = local.hidden, local.weight, local.bias, local.labels
        _inputs.check_head_inputs(hidden, weight, labels, bias, vocab_rows=local.vocab_parallel is not None)
        _inputs.check_labels(labels, opts.shift)
        _inputs.check_position_ids(position_ids, labels)
        num_items = _inputs.check_num_items(num_items_in_batch)
        loss_shape = (*labels.shape[:-1], max(labels.shape[-1] - opts.shift, 0))
        token_inputs = _check_token_inputs(opts.objective, batch, loss_shape, opts.shift, labels.device)
        unlabeled = _inputs.check_distill_mask(batch["distill_mask"], opts.objective, loss_shape, opts.shift,
                                               labels.device)
        second = batch["second_head"]
        _inputs.check_second_head_presence(opts.objective, second is not None)
        select_backend(opts, hidden.device)  # a backend this device cannot run is refused before any collective
        split = local.vocab_parallel
        grad = torch.is_grad_enabled()
        needs = Needs(grad and hidden.requires_grad, grad and weight.requires_grad,
                      grad and bias is not None and bias.requires_grad)
    except (TypeError, ValueError) as err:
        if hint is not None and dist.is_available() and dist.is_initialized():
            # every rank learns of it, then raises; the same fields as a valid call's check, all zero
            check_group(hint, hidden=hidden, settings=dict.fromkeys((*_COMPARED_OPTIONS, "needs"), 0),
                        tensors=dict.fromkeys(_COMPARED_TENSORS), error=err)
        raise
    if split is not None:
        split = check_group(split, hidden=hidden, weight=weight, labels=labels,
                            settings={**opts.digests(), "needs": sum(int(n) << i for i, n in enumerate(needs))},
                            tensors={"class_weight": opts.class_weight, "position_ids": position_ids,
                                     **{name: batch[name] for name in TOKEN_INPUTS}},
                            sharded_dtensor=local.from_dtensor)
        opts = opts.replace(vocab_parallel=split)
    V, D = (weight.shape[0] if split is None else split.vocab_size), hidden.shape[-1]
    compute = _inputs.compute_dtype("weight", hidden, weight)
    plan = backward_mode(opts, device=hidden.device, vocab_size=V, hidden_size=D, compute_dtype=compute, needs=needs,
                         second_head=second is not None)
    if opts.class_weight is not None:
        _inputs.check_class_weight(opts.class_weight, V, hidden.device)
    if second is not None:
        second = _inputs.check_second_head(second, tuple(labels.shape), V, hidden)
    call = build_call(opts, plan, needs, weight, bias, labels, position_ids, num_items, token_inputs, second, compute,
                      V, device=hidden.device, split=split, unlabeled=unlabeled)
    return _Door(hidden.reshape(-1, D), call)


def _check_token_inputs(objective, batch: dict, loss_shape: tuple, shift: int, device) -> dict[str, Tensor]:
    """The objective's per-token inputs from the call's keywords, each checked; unknown or missing ones refused."""
    _inputs.check_token_input_presence(objective, {name for name in TOKEN_INPUTS if batch.get(name) is not None})
    for name in objective.token_inputs:
        _inputs.check_token_input(name, batch[name], loss_shape, shift, device)
    return {name: batch[name] for name in objective.token_inputs}


def _vocab_parallel_hint(keywords: dict, options, weight) -> VocabParallel | None:
    """The vocabulary-parallel option a call asks for, read without validating anything: the ranks' group
    to tell about a validation error (``check_group(error=...)``), or None."""
    for candidate in (keywords.get("vocab_parallel"), getattr(options, "vocab_parallel", None)):
        if isinstance(candidate, VocabParallel):
            return candidate
    if is_dtensor(weight):
        try:
            return localize(None, weight, None, None, None).vocab_parallel
        except Exception:  # noqa: BLE001 - a hint only: the call's own checks will say what is wrong
            return None
    return None
