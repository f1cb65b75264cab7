"""The autograd Function joining the objective table to a backend's two passes.

forward: backend.lse_forward -> loss_terms.token_loss (objective value, gradient coefficients).
backward: upstream gradient x coefficients per token -> backend.grad_backward.

Saved for backward: the inputs themselves (no copies) and O(tokens) floats
(log-sum-exp, gradient coefficients) - never logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend_contract import GradCoefficients
from .loss_terms import token_loss
from .objectives import Objective


def _scatter(values: Tensor, rows: Tensor | None, n_tokens: int) -> Tensor:
    """(M,) values of the computed rows -> (n_tokens,), zero elsewhere."""
    if rows is None:
        return values
    return values.new_zeros(n_tokens).index_copy_(0, rows, values)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token objective values of ``hidden @ weight.T + bias`` for the given targets.

    Inputs: hidden (N, D), weight (V, D), bias (V,) | None, targets (M,) int64
    in [0, V), rows (M,) int64 | None (which rows of hidden are computed; None:
    all, M == N), n_tokens = N, an Objective, its aligned per-token inputs and
    segments, a backend module, softcap, with_stats, filter_eps.

    Outputs, all (N,) and zero at rows not computed: value (float32, the only
    differentiable output), logprob (float32), entropy (float32 | None),
    is_top1 (bool | None).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, n_tokens: int, objective: Objective,
                inputs: dict, segments, backend, softcap, with_stats: bool, filter_eps):
        stats = backend.lse_forward(hidden, weight, bias, targets, rows, softcap=softcap, with_stats=with_stats)
        terms = token_loss(stats, targets, objective, vocab_size=weight.shape[0], inputs=inputs, segments=segments)
        value, logp = terms.value, terms.logp
        target_logit, entropy, max_logit = stats.target_logit, stats.entropy, stats.max_logit

        ctx.save_for_backward(hidden, weight, bias, targets, rows, stats.lse, *terms.coef)
        ctx.backend, ctx.softcap, ctx.filter_eps = backend, softcap, filter_eps

        out_logp = _scatter(logp, rows, n_tokens)
        out_entropy = out_top1 = None
        if with_stats:
            out_entropy = _scatter(entropy, rows, n_tokens)
            out_top1 = _scatter(target_logit >= max_logit, rows, n_tokens)
        ctx.mark_non_differentiable(*[t for t in (out_logp, out_entropy, out_top1) if t is not None])
        return _scatter(value, rows, n_tokens), out_logp, out_entropy, out_top1

    @staticmethod
    def backward(ctx, grad_value, *_):
        hidden, weight, bias, targets, rows, lse, *coef = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_hidden or need_weight or need_bias):
            return (None,) * 13
        upstream = (grad_value if rows is None else grad_value[rows]).to(torch.float32)
        coef = GradCoefficients(*(upstream * c if c is not None else None for c in coef))
        d_hidden, d_weight, d_bias = ctx.backend.grad_backward(
            hidden, weight, bias, targets, rows, lse, coef,
            softcap=ctx.softcap, need_hidden=need_hidden, need_weight=need_weight,
            need_bias=bias is not None and need_bias, filter_eps=ctx.filter_eps,
        )
        return (d_hidden, d_weight, d_bias) + (None,) * 10
