"""The autograd Function joining the objective table to a backend's passes.

Two passes: forward ``backend.lse_forward`` -> :func:`dft_ops.loss_terms.token_loss` (the objective's values
with the options, and the G terms); backward: upstream gradient x terms per token -> ``backend.grad_backward``.
Saved for backward: the inputs themselves (no copies) and O(tokens) floats (log-sum-exps, G terms).

One pass (:mod:`dft_ops.backends.one_pass`): forward ``backend.loss_and_grads`` with ``token_loss`` applied to
each chunk's statistics; it keeps the fp32 gradients for a unit upstream gradient, and the backward only scales
them by the upstream number (the loss is "mean" or "sum": the Function reduces it itself).

Never logits. Everything else of the call (layout, options, head description, backend, plan) arrives validated
in one :class:`~dft_ops.loss_call.LossCall`.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from .backends.protocol import Grads, GradTerms, Needs
from .loss_call import LossCall
from .loss_terms import TokenLoss, token_loss


class FunctionOutputs(NamedTuple):
    """The Function's outputs: the loss, then per-position statistics, each (N,) and zero at the positions
    not computed.

    ``value`` (float32) is the only differentiable one: the loss reduced as ``call.divisor`` says (0-d: the
    sum over the computed tokens divided by it), or per position (N,) for reduction "none" (divisor None).
    ``logprob`` (float32) is always computed; the others only with ``options.return_stats`` (else
    None): ``entropy`` float32, ``is_top1`` bool, ``lse`` float32 (log-sum-exp of the capped, tempered
    logits), ``predicted`` int64 (first index of the largest logit), ``z_loss`` float32 (``options.z_loss *
    lse^2``, the part of the loss that is z-loss; None when the option is 0), ``kl`` float32 (the KL to the
    second head of an ASFT objective, unscaled; None for other objectives).
    """

    value: Tensor
    logprob: Tensor
    entropy: Tensor | None = None
    is_top1: Tensor | None = None
    lse: Tensor | None = None
    predicted: Tensor | None = None
    z_loss: Tensor | None = None
    kl: Tensor | None = None


# the Function's input after the three tensors (the call): never differentiable
_NOT_DIFFERENTIABLE = (None,)
_SECOND_FIELDS = ("hidden", "weight", "bias")


def _no_autocast(device: torch.device):
    """The backends choose their own precisions: autocast must not recast their matmuls (forward or backward)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def _concatenated(parts: list[TokenLoss]) -> TokenLoss:
    """The TokenLoss of all computed tokens from those of consecutive chunks (a one-pass forward)."""
    def cat(values):
        return None if values[0] is None else torch.cat(values)

    terms = GradTerms(*(cat(list(f)) for f in zip(*(p.terms for p in parts))))
    return TokenLoss(value=cat([p.value for p in parts]), logp=cat([p.logp for p in parts]),
                     z_loss=cat([p.z_loss for p in parts]), target_weight=cat([p.target_weight for p in parts]),
                     terms=terms, kl=cat([p.kl for p in parts]))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The loss of ``hidden @ weight.T + bias`` at the positions of a call's layout.

    ``apply(hidden, weight, bias, call)``: hidden (N, D), weight (V, D), bias
    (V,) | None (the dtypes may differ: ``call.head.compute_dtype`` says what
    the products run in; each gradient comes back in its input's dtype);
    ``call``: the validated :class:`~dft_ops.loss_call.LossCall` (its head's
    weight and bias are these same tensors; ``call.plan`` one-pass or two passes).

    Returns the tuple of :class:`FunctionOutputs` (``FunctionOutputs(*apply(...))``).

    Not twice differentiable: asking for a graph through the gradient
    (``create_graph=True``) raises a RuntimeError.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, call: LossCall):
        out, loss, grads = forward_pass(hidden, weight, bias, call)
        if call.plan.mode == "onepass":
            # the gradients of a unit upstream gradient, fp32: a "mean" loss's are those of its sum, divided
            ctx.grads, ctx.input_dtypes = grads, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            ctx.save_for_backward()
        else:
            second = call.head.second
            second_tensors = tuple(getattr(second, f) for f in _SECOND_FIELDS) if second is not None else (None,) * 3
            ctx.save_for_backward(hidden, weight, bias, *loss.terms, *second_tensors)
        ctx.call = call
        ctx.mark_non_differentiable(*[t for t in out[1:] if t is not None])
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_value, *_):
        if torch.is_grad_enabled():
            # the engine enables grad mode in backward exactly when create_graph=True
            raise RuntimeError(
                "dft_ops.linear_cross_entropy: double backward is not supported: the fused backward's gradients are "
                "not differentiable, so a loss built from them (e.g. a gradient penalty through "
                "autograd.grad(..., create_graph=True)) would silently miss its second-order terms"
            )
        call: LossCall = ctx.call
        need = ctx.needs_input_grad[:3]
        if call.plan.mode == "onepass":
            return (*scaled_grads(ctx.grads, ctx.input_dtypes, grad_value / call.divisor, need), *_NOT_DIFFERENTIABLE)
        hidden, weight, bias, *saved = ctx.saved_tensors
        n_terms = len(GradTerms._fields)
        terms, second_tensors = GradTerms(*saved[:n_terms]), saved[n_terms:]
        grads = backward_pass(grad_value, hidden, weight, bias, call, terms, second_tensors, need)
        return grads.hidden, grads.weight, grads.bias, *_NOT_DIFFERENTIABLE


def forward_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                 call: LossCall) -> tuple[FunctionOutputs, TokenLoss, Grads | None]:
    """The Function's forward without autograd: its :class:`FunctionOutputs`, the computed tokens'
    :class:`~dft_ops.loss_terms.TokenLoss` (the two-pass backward's G terms) and, one-pass, the fp32 gradients
    of a unit upstream gradient (else None). Also the custom operator's forward (:mod:`dft_ops.custom_op`)."""
    head, layout, options = call.head._replace(weight=weight, bias=bias), call.layout, call.options
    one_pass = call.plan.mode == "onepass"
    smoothing = options.label_smoothing > 0
    grads = None
    with _no_autocast(hidden.device):
        if one_pass:
            parts = []

            def terms_of(chunk_stats, lo, hi):
                parts.append(token_loss(chunk_stats, call, slice(lo, hi)))
                return parts[-1].terms

            stats, grads = call.backend.loss_and_grads(hidden, head, call.tokens, terms_of, call.needs,
                                                       with_stats=options.return_stats, smoothing=smoothing)
            loss = _concatenated(parts) if parts else token_loss(stats, call)
        else:
            stats = call.backend.lse_forward(hidden, head, call.tokens, with_stats=options.return_stats,
                                             smoothing=smoothing)
            loss = token_loss(stats, call)
    values = layout.scatter(loss.value)
    reduced = values if call.divisor is None else values.sum() / call.divisor
    out = FunctionOutputs(reduced, layout.scatter(loss.logp))
    if options.return_stats:
        out = out._replace(entropy=layout.scatter(stats.entropy),
                           is_top1=layout.scatter(stats.target_logit >= stats.max_logit),
                           # a copy: stats.lse is saved for backward, and the caller may edit what it gets
                           lse=layout.scatter(stats.lse.clone()), predicted=layout.scatter(stats.argmax),
                           z_loss=None if loss.z_loss is None else layout.scatter(loss.z_loss),
                           kl=None if loss.kl is None else layout.scatter(loss.kl))
    return out, loss, grads


def backward_pass(grad_value: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, call: LossCall,
                  terms: GradTerms, second_tensors: tuple, need) -> Grads:
    """The two-pass backward: the saved G terms (of the computed tokens) times the upstream gradient, through
    the backend; ``second_tensors`` the second head's (hidden, weight, bias) as saved (or Nones); ``need``
    which of d(hidden), d(weight), d(bias) autograd asks for."""
    head = call.head._replace(weight=weight, bias=bias)
    if head.second is not None:
        head = head._replace(second=head.second._replace(**dict(zip(_SECOND_FIELDS, second_tensors))))
    if not any(need):
        return Grads(None, None, None)
    upstream = call.layout.pick(grad_value) if call.divisor is None else grad_value / call.divisor
    terms = terms.scaled(upstream.to(torch.float32))
    with _no_autocast(hidden.device):
        return call.backend.grad_backward(hidden, head, call.tokens, terms,
                                          Needs(need[0], need[1], bias is not None and need[2]))


def scaled_grads(grads, input_dtypes, scale: Tensor, need) -> tuple:
    """A one-pass call's kept fp32 gradients times the upstream number, each in its input's dtype: one op per
    gradient (scaled and rounded once), out of place (a second backward with ``retain_graph`` gives the same)."""
    out = []
    for wanted, grad, dtype in zip(need, grads, input_dtypes):
        if not wanted or dtype is None:
            out.append(None)
            continue
        # the door asked for exactly the gradients autograd needs (grad mode and requires_grad at forward time)
        assert grad is not None
        out.append(torch.mul(grad, scale.to(torch.float32), out=torch.empty_like(grad, dtype=dtype)))
    return tuple(out)
