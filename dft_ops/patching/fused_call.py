"""One fused training forward of a patched model: the loss is computed inside the output head's forward.

The model's own forward runs, with two things swapped for the duration of the call:

- the output head's ``forward`` (its ``__call__`` and every hook on it stay):
  it receives the final hidden states, already sliced by ``logits_to_keep``,
  computes :func:`dft_ops.linear_cross_entropy` from them and the head's
  weight and bias *as the head sees them during its own forward*, and returns
  an empty ``(..., 0)`` tensor tied to that loss in place of logits;
- ``model.loss_function``: returns the loss the head computed (plus the empty
  tensor's sum, an exact 0 that keeps the head's output on the loss's
  autograd path), after checking it was called with the labels the loss used.

Why inside the head's forward: engines that shard parameters gather the head
in a pre-forward hook and reshard it afterwards (FSDP2 with the head in its own
``fully_shard`` group, DeepSpeed ZeRO-3); they gather it again for backward
from a hook on the head's *output*, and reduce its gradient from hooks on its
parameters and inputs. Computing the loss there, and keeping the head's output
on the loss's path, lets every such engine gather and reduce the head exactly
as it does for any other layer. Reading ``head.weight`` outside the head's
forward would see a shard.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from ..callbacks import recorder_of
from ..backends.protocol import SecondHead
from ..distributed import like_linear_output, local
from ..functional import linear_cross_entropy
from ..objectives import Distill
from ..token_logprobs import token_logprobs
from .head import check_head, forward_slot, output_head, replaced_attribute, sharded_by_engine


class FusedCall:
    """The per-call state of one fused forward: inputs of the loss, and what the head computed.

    Args:
        causal_lm: the patched ``*ForCausalLM``.
        state: its patch state (options, head transform).
        labels / shift_labels / num_items_in_batch / ignore_index / position_ids:
            as the forward was called (ignore_index None: the patch option).
        protocol: a :class:`~dft_ops.patching.protocols.CallerProtocol` asking
            for per-token values, or None for the usual scalar loss.
        token_tensors: per-token inputs of the objective from the call's keywords (``old_logprobs=``, ...).
        reference: the reference model's pass of this call (:class:`~dft_ops.patching.reference.ReferencePass`),
            or None.
        attention_mask: as the forward was called, or None: with ``Distill(distill_unlabeled=True)``, which
            tokens without a label are distilled (a 2-D mask of the labels' shape; else every one).
    """

    def __init__(self, causal_lm: nn.Module, state, *, labels, shift_labels, num_items_in_batch, ignore_index,
                 position_ids, protocol, token_tensors: dict, reference=None, attention_mask=None):
        self.causal_lm, self.state, self.protocol = causal_lm, state, protocol
        self.attention_mask = attention_mask
        self.per_token = protocol is not None
        # a protocol asking for true log-probs and entropies with their gradients (RL: TRL's GRPOTrainer)
        self.logprobs_mode = bool(getattr(protocol, "logprobs", False))
        self.logprobs = self.mask = None
        self.token_tensors = token_tensors
        self.reference = reference
        self.shift = shift_labels is None
        self.given_labels = labels if self.shift else shift_labels
        self.num_items_in_batch, self.position_ids = num_items_in_batch, position_ids
        self.ignore_index = state.options.ignore_index if ignore_index is None else ignore_index
        self.head = None
        self.head_calls = self.loss_calls = 0
        self.loss = self.stats = self.link = None

    # -------------------------------------------------------------------------------- inside the head's forward

    def head_forward(self, hidden: Tensor) -> Tensor:
        """Replaces the head's forward: computes the loss, returns an empty ``(..., 0)`` tensor tied to it."""
        self.head_calls += 1
        head = self.head
        # a tensor-parallel head (ColwiseParallel, tp_plan) has DTensor parameters: the loss is vocabulary parallel
        weight, bias = head.weight, head.bias
        head_input = hidden
        transform = self.state.transform
        hidden = hidden.to(weight.device)
        hidden, bias = transform.fold(hidden, bias)
        second_head = None if self.reference is None else self._second_head(hidden, weight, bias)
        targets = self.given_labels.to(hidden.device)
        position_ids = self.position_ids
        if position_ids is not None and tuple(position_ids.shape) != tuple(targets.shape):
            position_ids = None  # e.g. (1, T) broadcast or 3-D rope positions: rows are the sequences
        if position_ids is not None:
            position_ids = position_ids.to(hidden.device)
        if self.logprobs_mode:
            return self._token_logprobs(hidden, weight, bias, targets, position_ids, head_input)
        # a TokenStatsCallback attached to the model asks for the per-token stats of training steps
        recorder = recorder_of(self.causal_lm)
        if recorder is not None and not recorder.enabled:
            recorder = None
        patch_options = self.state.options
        # a sharding engine: the one-pass head's unsharded fp32 d(weight) would outweigh the head's shard
        mode = patch_options.backward_mode
        if mode == "auto" and sharded_by_engine(head, self.causal_lm):
            mode = "gemm"
        if mode == "onepass" and self.per_token:  # a protocol's per-token loss has a per-token upstream gradient
            mode = "auto"
        options = patch_options.replace(
            backward_mode=mode, ignore_index=self.ignore_index, softcap=transform.softcap, shift=self.shift,
            reduction="none" if self.per_token else patch_options.reduction,
            return_stats=self.per_token or patch_options.return_stats or recorder is not None)
        # dtypes as nn.Linear would compute (the autocast dtype under autocast): linear_cross_entropy's rule
        out = linear_cross_entropy(hidden, weight, targets, bias=bias, options=options, position_ids=position_ids,
                                   num_items_in_batch=None if self.per_token else self.num_items_in_batch,
                                   second_head=second_head, distill_mask=self._distill_mask(targets),
                                   **self.token_tensors)
        self.loss, self.stats = out if isinstance(out, tuple) else (out, None)
        if recorder is not None:
            recorder.record(self.stats)
        self.state.calls += 1
        # not a view of the loss (FSDP2 warns that in-place ops on a view drop its pre-backward hook); a DTensor
        # where nn.Linear would return one, for the output hooks of tensor-parallel styles
        empty = self.loss.sum().reshape((1,) * hidden.ndim) * self.loss.new_zeros(*hidden.shape[:-1], 0)
        return like_linear_output(empty, head_input, weight)

    def _token_logprobs(self, hidden, weight, bias, targets, position_ids, head_input) -> Tensor:
        """The head's forward for a protocol asking for log-probs and entropies (:func:`dft_ops.token_logprobs`):
        ``self.logprobs`` for the protocol's output, ``self.loss = -logprob`` per token for the model's loss."""
        opts, transform = self.state.options, self.state.transform
        mode = opts.backward_mode if opts.backward_mode != "onepass" else "auto"
        if mode == "auto" and sharded_by_engine(self.head, self.causal_lm):
            mode = "gemm"
        fp32 = getattr(self.protocol, "fp32_head", False)
        if fp32:  # the trainer asks for the head's products in fp32 (TRL's cast_lm_head_to_fp32)
            hidden = hidden.float()
        with torch.autocast(hidden.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            self.logprobs = token_logprobs(
                hidden, weight, targets, bias=bias, temperature=opts.temperature or 1.0, softcap=transform.softcap,
                shift=self.shift, ignore_index=self.ignore_index, position_ids=position_ids, backend=opts.backend,
                backward_mode=mode, workspace_mb=opts.workspace_mb, precise=opts.precise)
        self.mask = (targets[..., 1:] if self.shift else targets) != self.ignore_index
        self.loss = -self.logprobs.logprob
        self.state.calls += 1
        empty = self.loss.sum().reshape((1,) * hidden.ndim) * self.loss.new_zeros(*hidden.shape[:-1], 0)
        return like_linear_output(empty, head_input, weight)

    def _distill_mask(self, targets: Tensor) -> Tensor | None:
        """Which tokens without a label ``Distill(distill_unlabeled=True)`` distills: the loss positions whose own
        token is not padding (the attention mask at the predicting position), or None (every one: no 2-D mask of
        the labels' shape, e.g. packed rows with position_ids)."""
        objective, mask = self.state.options.objective, self.attention_mask
        if not (isinstance(objective, Distill) and objective.distill_unlabeled) or mask is None:
            return None
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(targets.shape):
            return None
        # position t predicts labels[..., t + 1] with the causal shift: the loss positions are t < S - 1
        mask = mask[..., : mask.shape[-1] - 1] if self.shift else mask
        return mask.to(targets.device) != 0

    def _second_head(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> SecondHead:
        """This call's reference model as the loss's second head (the model's own head, detached, with adapters
        off, when the reference shares it)."""
        ref = self.reference
        if tuple(ref.hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise RuntimeError(f"reference: its forward fed its head hidden states of shape {tuple(ref.hidden.shape)}, "
                               f"the model's head got {tuple(hidden.shape)}; both must see the same positions")
        if ref.weight is None:
            ref_weight, ref_bias = weight.detach(), None if bias is None else bias.detach()
        else:
            ref_weight = ref.weight.to(weight.device)
            ref_bias = None if ref.bias is None else ref.bias.to(weight.device)
        return SecondHead(ref.hidden.to(hidden.device), ref_weight, ref_bias, ref.softcap)

    # ---------------------------------------------------------------------------- the model's loss_function

    def loss_function(self, logits=None, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=None,
                      shift_labels=None, **_):
        """Replaces ``model.loss_function``: the loss the head computed, with the head's output on its path."""
        self.loss_calls += 1
        if self.head_calls != 1:
            raise RuntimeError("dft_ops.patch: the loss function ran before the output head")
        received = labels if shift_labels is None else shift_labels
        if not (_same(received, self.given_labels) and _same(num_items_in_batch, self.num_items_in_batch)
                and (ignore_index is None or ignore_index == self.ignore_index)):
            raise RuntimeError("dft_ops.patch: the forward passed its loss function other labels, num_items_in_batch "
                               "or ignore_index than it was called with; the fused loss used the call's")
        # an exact 0 whose backward reaches the head's output, where engines re-gather the head for backward
        self.link = local(logits).sum().to(torch.float32)
        if not self.per_token:
            return self.loss + self.link
        # per-token values for the caller's protocol; the usual mean (over num_items_in_batch) as `loss`
        denominator = self.num_items_in_batch
        if denominator is None:
            denominator = (self.mask if self.logprobs_mode else self.stats.mask).sum().clamp(min=1)
        return self.loss.sum() / torch.as_tensor(denominator, device=self.loss.device).to(torch.float32) + self.link


def run(causal_lm: nn.Module, previous, args: tuple, kwargs: dict, labels, call: FusedCall) -> Any:
    """Run ``previous`` (the forward the patch wraps) as a fused call; returns the model's output without logits."""
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(causal_lm.config, "return_dict", True)
    if labels is None:
        # the forward computes a loss only when `labels` is given; the loss function reads shift_labels first
        kwargs["labels"] = call.given_labels
    head = output_head(causal_lm)
    check_head(head)
    call.head = head
    # `loss_function` is a property reading `_loss_function` when set
    with replaced_attribute(head, forward_slot(head), call.head_forward), \
            replaced_attribute(causal_lm, "_loss_function", call.loss_function):
        out = previous(*args, return_dict=True, **kwargs)
    if call.head_calls != 1 or call.loss_calls != 1:
        raise RuntimeError(f"dft_ops.patch: the forward called the output head {call.head_calls} time(s) and the loss "
                           f"function {call.loss_calls} time(s); expected once each")
    if call.protocol is not None:
        return call.protocol.output(out, call)
    fields = {k: v for k, v in out.items() if k != "logits"}
    result = type(out)(**fields)  # logits=None
    if call.state.options.return_stats:
        result.token_stats = call.stats
    return result if return_dict else result.to_tuple()


def _same(a, b) -> bool:
    """``a`` and ``b`` are the same labels / count: identical objects, or equal values."""
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a.to(b.device), b)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        t, n = (a, b) if isinstance(a, Tensor) else (b, a)
        return n is not None and t.numel() == 1 and t.item() == n
    return a == b
