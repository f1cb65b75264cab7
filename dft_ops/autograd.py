"""The autograd Function joining the objective table to a backend's two passes.

forward: backend.lse_forward -> loss_terms.token_loss (objective value, gradient coefficients).
backward: upstream gradient x coefficients per token -> backend.grad_backward.

Saved for backward: the inputs themselves (no copies) and O(tokens) floats
(log-sum-exp, gradient coefficients) - never logits.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from .backend_contract import GradCoefficients, select_backend
from .layout import TokenLayout
from .loss_terms import token_loss
from .options import LossOptions


class HeadGrads(NamedTuple):
    """What backward returns for the differentiable inputs of the Function (None where not needed)."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


# the Function's inputs after the three tensors (layout, options): never differentiable
_NOT_DIFFERENTIABLE = (None, None)


def _no_autocast(device: torch.device):
    """The backends choose their own precisions: autocast must not recast their matmuls (forward or backward)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token objective values of ``hidden @ weight.T + bias`` at the positions of a TokenLayout.

    ``apply(hidden, weight, bias, layout, options)``:
        hidden (N, D), weight (V, D), bias (V,) | None, all of one float dtype;
        layout: a :class:`~dft_ops.layout.TokenLayout` of N positions, already
        compacted (its rows and targets, in [0, V), are what the kernels compute);
        options: :class:`~dft_ops.LossOptions` (objective, softcap, return_stats,
        backend, filter_eps, backward_mode, workspace_mb are read here; the
        reduction is the caller's).

    Outputs, all (N,) and zero at positions not computed: value (float32, the
    only differentiable output), logprob (float32), entropy (float32 | None),
    is_top1 (bool | None); entropy and is_top1 only with ``options.return_stats``.

    Not twice differentiable: asking for a graph through the gradient
    (``create_graph=True``) raises a RuntimeError.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, layout: TokenLayout, options: LossOptions):
        backend = select_backend(options, hidden.device)
        objective = options.objective
        # every check of the objective's inputs happens here, before any kernel runs
        inputs = layout.objective_inputs(objective)
        segments = layout.segments() if objective.needs_segments else None
        with _no_autocast(hidden.device):
            stats = backend.lse_forward(hidden, weight, bias, layout.row_targets, layout.rows,
                                        softcap=options.softcap, with_stats=options.return_stats)
        terms = token_loss(stats, layout.row_targets, objective, vocab_size=weight.shape[0], inputs=inputs,
                           segments=segments)
        value, logp = terms.value, terms.logp
        target_logit, entropy, max_logit = stats.target_logit, stats.entropy, stats.max_logit

        ctx.save_for_backward(hidden, weight, bias, stats.lse, *terms.coef)
        ctx.backend, ctx.layout, ctx.options = backend, layout, options

        out_logp = layout.scatter(logp)
        out_entropy = out_top1 = None
        if options.return_stats:
            out_entropy = layout.scatter(entropy)
            out_top1 = layout.scatter(target_logit >= max_logit)
        ctx.mark_non_differentiable(*[t for t in (out_logp, out_entropy, out_top1) if t is not None])
        return layout.scatter(value), out_logp, out_entropy, out_top1

    @staticmethod
    def backward(ctx, grad_value, *_):
        if torch.is_grad_enabled():
            # the engine enables grad mode in backward exactly when create_graph=True
            raise RuntimeError(
                "dft_ops.linear_cross_entropy: double backward is not supported: the fused backward's gradients are "
                "not differentiable, so a loss built from them (e.g. a gradient penalty through "
                "autograd.grad(..., create_graph=True)) would silently miss its second-order terms"
            )
        hidden, weight, bias, lse, *coef = ctx.saved_tensors
        layout, options = ctx.layout, ctx.options
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_hidden or need_weight or need_bias):
            return (*HeadGrads(None, None, None), *_NOT_DIFFERENTIABLE)
        upstream = layout.pick(grad_value).to(torch.float32)
        coef = GradCoefficients(*(upstream * c if c is not None else None for c in coef))
        with _no_autocast(hidden.device):
            d_hidden, d_weight, d_bias = ctx.backend.grad_backward(
                hidden, weight, bias, layout.row_targets, layout.rows, lse, coef,
                softcap=options.softcap, need_hidden=need_hidden, need_weight=need_weight,
                need_bias=bias is not None and need_bias, filter_eps=options.filter_eps,
            )
        return (*HeadGrads(d_hidden, d_weight, d_bias), *_NOT_DIFFERENTIABLE)
