"""Merging online-softmax partials: per-slice statistics of a vocabulary split into the whole vocabulary's.

One piece of math shared by every place that splits the vocabulary: the
Triton forward's slices, the PyTorch backend's chunks, and the ranks of a
vocabulary-parallel group (:mod:`dft_ops.backends.sharded`). Plain PyTorch on
(S, M) tensors; no device synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def combine_kl(part_max: Tensor, part_sumexp: Tensor, part_max2: Tensor, part_sumexp2: Tensor,
               part_gap: Tensor, part_gap2: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(p || q), KL(q || p)), each (M,), from S vocabulary slices' partials of both heads, each (S, M).

    Slice s holds each head's max (``m_s`` of z, ``n_s`` of r, -inf taken as 0 below), sum-exp
    (``P_s = sum exp(z - m_s)``, ``Q_s = sum exp(r - n_s)``) and the gap sums
    ``part_gap = sum exp(z - m_s) g_s``, ``part_gap2 = sum exp(r - n_s) g_s`` of
    ``g_s = (z - m_s) - (r - n_s)``. With the global maxima m, n and sum-exps P, Q::

        KL(p || q) = E_p[(z - m) - (r - n)] - log(P / Q)
        KL(q || p) = log(P / Q) - E_q[(z - m) - (r - n)]

    (lse - R = m - n + log(P / Q) cancels against E[z - r]). Only each head's logits relative to
    its own maxima enter, never ``z - r`` itself: a constant offset between the heads cancels
    exactly instead of costing its rounding (~1e-7 times the offset). Slices with no finite
    logit contribute nothing.
    """
    def finite(x):
        return torch.where(x == float("-inf"), 0.0, x)

    shift, shift2 = finite(part_max.max(dim=0).values), finite(part_max2.max(dim=0).values)
    # each slice's gaps are relative to its own maxima: move them to the global ones
    moved = (finite(part_max) - shift) - (finite(part_max2) - shift2)
    scale, scale2 = torch.exp(part_max - shift), torch.exp(part_max2 - shift2)
    P, Q = (part_sumexp * scale).sum(dim=0), (part_sumexp2 * scale2).sum(dim=0)
    gap_p = (scale * (part_gap + moved * part_sumexp)).sum(dim=0) / P
    gap_q = (scale2 * (part_gap2 + moved * part_sumexp2)).sum(dim=0) / Q
    log_ratio = torch.log(P / Q)
    return gap_p - log_ratio, log_ratio - gap_q


def logs_over_mixture(x: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(log a - log m, log b - log m)`` with ``m = (1 - beta) a + beta b``, from ``x = log a - log b``,
    elementwise, for 0 < beta < 1.

    The generalized JSD's log-ratios of both distributions (a the model's, b the second head's) to their
    mixture, from the two heads' own log-ratio (each head relative to its own log-sum-exp, so no offset
    between the heads enters). With ``e = exp(-|x|)`` and ``L`` the log of a number in ``[min(beta,
    1 - beta), 1]``: ``x >= 0``: ``(-L, -x - L)``, ``L = log((1 - beta) + beta e)``; ``x < 0``: ``(x - L,
    -L)``, ``L = log((1 - beta) e + beta)``. One exponential and one logarithm for both, neither of which
    overflows; ``x = +inf`` (b = 0) gives ``(-log(1 - beta), -inf)``, ``x = -inf`` (a = 0) ``(-inf,
    -log beta)``: the caller weighs each by its own distribution and takes 0 where it is 0. The kernels
    compute it the same way (:func:`dft_ops.kernels.tile.logs_over_mixture`).
    """
    e = torch.exp(-x.abs())
    above = x >= 0
    log_share = torch.log(torch.where(above, (1.0 - beta) + beta * e, (1.0 - beta) * e + beta))
    return torch.where(above, -log_share, x - log_share), torch.where(above, -x - log_share, -log_share)


def log_over_mixture(x: Tensor, beta: float) -> Tensor:
    """``log a - log m`` alone (the G term's factor, :func:`logs_over_mixture`'s first), as
    ``-log((1 - beta) + beta exp(min(-x, 80)))``: one exponential and one logarithm; the clamp changes
    the value only where ``a < e^-80 b``, where the term it multiplies, ``a (log a - log m)``, is below
    1e-33 (the kernels' form: fewer live values than both branches)."""
    return -torch.log((1.0 - beta) + beta * torch.exp(torch.clamp(-x, max=80.0)))


def mixture_kl_sums(log_s: Tensor, log_q: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(sum_j s (log s - log m), sum_j q (log q - log m))`` over the last dimension: KL(s || m) and
    KL(q || m), ``m = beta q + (1 - beta) s``, from both normalized log-distributions. A column without
    probability under the weighting distribution adds 0 (whatever its ratio: +-inf, or NaN where the
    other has none either)."""
    s, q = torch.exp(log_s), torch.exp(log_q)
    to_model, to_second = logs_over_mixture(log_s - log_q, beta)
    return (torch.where(s > 0, s * to_model, 0.0).sum(dim=-1), torch.where(q > 0, q * to_second, 0.0).sum(dim=-1))


def combine_partials(part_max: Tensor, part_sumexp: Tensor, part_ent: Tensor | None = None,
                     part_argmax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Merge online-softmax partials of S vocabulary slices, each (S, M), into (lse, max, entropy, argmax).

    Slice s holds its max ``m_s``, ``sumexp_s = sum exp(z - m_s)`` and
    ``ent_s = sum exp(z - m_s) (z - m_s)`` over its columns, and the first index
    of its max. Slices whose logits are all -inf (m_s = -inf, sumexp_s = 0)
    contribute nothing: ``0 * -inf`` terms are taken as 0, never NaN.
    Entropy is ``log S - E / S``, both terms O(1) whatever the logits' size.
    """
    max_logit = part_max.max(dim=0).values
    # a finite shift even when every logit is -inf, so no -inf - -inf
    shift = torch.where(max_logit == float("-inf"), 0.0, max_logit)
    delta = part_max - shift
    scale = torch.exp(delta)
    sumexp = (part_sumexp * scale).sum(dim=0)
    log_sumexp = torch.log(sumexp)
    lse = max_logit + log_sumexp
    entropy = None
    if part_ent is not None:
        rescaled = part_ent + torch.where(part_sumexp > 0, delta, 0.0) * part_sumexp
        ent = (scale * rescaled).sum(dim=0)
        entropy = log_sumexp - ent / sumexp
    argmax = None
    if part_argmax is not None:
        # first index of the max: the smallest index among the slices that reach it
        never = torch.iinfo(torch.int64).max
        argmax = torch.where(part_max == max_logit, part_argmax.long(), never).min(dim=0).values
    return lse, max_logit, entropy, argmax
