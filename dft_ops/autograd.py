"""The autograd Function joining the objective table to a backend's two passes.

forward: backend.lse_forward -> label log-probs -> objective.value / weight.
backward: upstream gradient x weight per token -> backend.grad_backward.

Saved for backward: the inputs themselves (no copies) and O(tokens) floats
(log-sum-exp, weights) - never logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .objectives import Objective, TokenBatch


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
        lse, target_logit, entropy, max_logit = backend.lse_forward(
            hidden, weight, bias, targets, rows, softcap=softcap, with_stats=with_stats
        )
        logp = target_logit - lse
        batch = TokenBatch(logp=logp, inputs=inputs, segments=segments)
        value = objective.value(batch).to(torch.float32)
        token_weight = objective.weight(batch).to(torch.float32)

        ctx.save_for_backward(hidden, weight, bias, targets, rows, lse, token_weight)
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
        hidden, weight, bias, targets, rows, lse, token_weight = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_hidden or need_weight or need_bias):
            return (None,) * 13
        upstream = grad_value if rows is None else grad_value[rows]
        grad_scale = (upstream.to(torch.float32) * token_weight).contiguous()
        d_hidden, d_weight, d_bias = ctx.backend.grad_backward(
            hidden, weight, bias, targets, rows, lse, grad_scale,
            softcap=ctx.softcap, need_hidden=need_hidden, need_weight=need_weight,
            need_bias=bias is not None and need_bias, filter_eps=ctx.filter_eps,
        )
        return (d_hidden, d_weight, d_bias) + (None,) * 10
