"""Options -> per-token loss values and gradient coefficients, from a backend's forward statistics.

Pure PyTorch on (M,) vectors: the objective row (:mod:`dft_ops.objectives`)
gives the base value ``v`` and its detached weight ``w`` from ``logp = z_y - lse``;
label smoothing ``eps``, class weights ``u`` and the z-loss combine with them as

    value = (1 - eps) * cw_y * v + (eps / V) * w * smooth_nll + z_loss * lse^2
    smooth_nll = sum_j u_j (lse - z_j) = U * lse - smooth_sum,   U = sum_j u_j,  cw_y = u_y

With the CE row this is PyTorch's ``cross_entropy(weight=u, label_smoothing=eps)``
per token; any other row scales the whole smoothed loss by its weight (DFT:
sg(p), Liger's token-scaling semantics) while z-loss stays an unweighted
regulariser. Differentiating w.r.t. the logits (d logp/dz = onehot - softmax,
d lse/dz = softmax) gives the backward's coefficients

    a = w * ((1 - eps) * cw_y + eps * U / V) + 2 * z_loss * lse
    b = w * (1 - eps) * cw_y
    c = w * eps / V

(the contract, :mod:`dft_ops.backends.protocol`, says how a backend uses them;
docs/math.md derives them).

An :class:`~dft_ops.objectives.ASFT` row adds ``kl_coef * KL`` to the value,
KL from the forward's second-head statistics, and its gradient ``kl_coef * (p - q)``
(forward KL: ``a += k``, ``e = k``) or ``kl_coef * p * (log p - log q - KL)``
(reverse KL: ``a -= k KL``, ``f = k``; ``= k p ((z - r) - E_p[z - r])`` without
the offset between the heads that ``z - r`` would carry).

A :class:`~dft_ops.objectives.Distill` row scales all of the above but the z-loss by
``alpha`` (0 at a row without a label) and adds ``k D`` with ``k = (1 - alpha) T^2``:
the forward and reverse KL as ASFT's, the generalized JSD ``D = beta KL(q || m) +
(1 - beta) KL(p || m)`` with its gradient ``k (1 - beta) p (log p - log m - KL(p || m))``
(``a -= k (1 - beta) KL(p || m)``, ``g = k (1 - beta)``).

Every input arrives validated (the options by :class:`~dft_ops.LossOptions`,
tensors at the door); this module only computes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .backends.protocol import ForwardStats, GradTerms
from .loss_call import LossCall
from .objectives import ASFT, Distill, Objective, TokenBatch


class TokenLoss(NamedTuple):
    """Per computed token, each (M,) float32.

    Attributes:
        value: the loss (objective, smoothing, class weight and z-loss together).
        logp: label log-probability ``z_y - lse``.
        z_loss: ``z_loss * lse^2`` (already in ``value``), or None when z_loss is 0.
        target_weight: ``class_weight[y]``, or None without class weights. A
            "mean" over tokens with class weights divides by their sum (PyTorch).
        terms: the backward's G terms for a unit upstream gradient.
        kl: the KL to the second head (an ASFT row; ``kl_coef * kl`` is in ``value``), the divergence to the
            teacher (a Distill row, unscaled), else None.
    """

    value: Tensor
    logp: Tensor
    z_loss: Tensor | None
    target_weight: Tensor | None
    terms: GradTerms
    kl: Tensor | None = None


def token_loss(stats: ForwardStats, call: LossCall, part: slice = slice(None)) -> TokenLoss:
    """Loss values and G terms of the computed tokens ``part`` of ``call`` (all M by default), from the
    backend's forward statistics of those tokens.

    ``stats.smooth_sum`` is there when the call has label smoothing (the
    forward ran with ``smoothing=True`` and the head's class weights); the
    targets are the call's (global ids under vocabulary parallelism). A part
    (a one-pass chunk) needs an objective without ``needs_segments``.
    """
    options, V = call.options, call.vocab_size
    objective, eps, z_loss = options.objective, options.label_smoothing, options.z_loss
    class_weight = options.class_weight
    lse = stats.lse
    logp = stats.logprob
    whole = part == slice(None)
    assert whole or call.segments is None, "sequence-level objectives see every token at once"
    inputs = call.token_inputs if whole else {name: t[part] for name, t in call.token_inputs.items()}
    targets = call.layout.row_targets if whole else call.layout.row_targets[part]
    keep, poison = call.layout.row_mask, call.layout.row_poison
    if keep is not None:
        # sync-free: ignored rows are computed too; their log p (-inf or garbage) must not reach an objective's
        # sums over a sequence, and everything they give is zeroed below
        keep, poison = keep[part], poison[part]
        logp = torch.where(keep, logp, 0.0)
    batch = TokenBatch(logp=logp, inputs=inputs, segments=call.segments, mask=keep)
    value, weight = (_per_token(objective, name, getattr(objective, name)(batch), logp) for name in ("value", "weight"))
    distill = objective if isinstance(objective, Distill) else None
    if distill is not None:  # the label objective weighs alpha, the options' terms with it
        value, weight = distill.alpha * value, distill.alpha * weight

    target_weight = None
    label_factor = 1.0 - eps  # (1 - eps) * cw_y, a tensor with class weights
    if class_weight is not None:
        # clamped gather: the targets were checked against V, and a clamp costs nothing next to an illegal read
        target_weight = class_weight.to(torch.float32).gather(0, targets.clamp(0, V - 1))
        label_factor = label_factor * target_weight
    value = label_factor * value
    softmax_factor = label_factor
    uniform = None
    if eps > 0:
        total_weight = class_weight.to(torch.float32).sum() if class_weight is not None else float(V)
        smooth_nll = total_weight * lse - stats.smooth_sum
        value = value + (eps / V) * weight * smooth_nll
        softmax_factor = softmax_factor + eps * total_weight / V
        uniform = weight * (eps / V)
    softmax = weight * softmax_factor
    z_value = None
    if z_loss > 0:
        z_value = z_loss * lse * lse
        value = value + z_value
        softmax = softmax + (2.0 * z_loss) * lse
    terms = GradTerms(lse=lse, softmax=softmax, target=weight * label_factor, uniform=uniform, logprob=logp)
    kl = None
    if isinstance(objective, ASFT):
        kl, terms = _kl_term(stats, objective, terms)
        value = value + objective.kl_coef * kl
    if distill is not None:
        labeled = call.layout.row_labeled
        if labeled is not None:  # rows distilled without a label: no label term (nor z-loss) of any size
            labeled = labeled if whole else labeled[part]
            value, z_value, logp = (None if t is None else torch.where(labeled, t, 0.0) for t in (value, z_value, logp))
            terms = terms._replace(**{name: torch.where(labeled, getattr(terms, name), 0.0)
                                      for name in ("softmax", "target", "uniform") if getattr(terms, name) is not None})
        kl, terms, distill_value = _distill_term(stats, distill, call.options.temperature, terms)
        value = value + distill_value
    if keep is not None:
        value, z_value, kl, terms = _masked(keep, poison, value, z_value, kl, terms)
    return TokenLoss(value=value, logp=logp, z_loss=z_value, target_weight=target_weight, terms=terms, kl=kl)


def _distill_term(stats: ForwardStats, distill: Distill, temperature: float | None,
                  terms: GradTerms) -> tuple[Tensor, GradTerms, Tensor]:
    """(the divergence D, the terms with ``k D``'s logit gradient added, ``k D``), ``k = (1 - alpha) T^2``."""
    assert stats.second_lse is not None, "a Distill call streams its teacher head in the forward"
    divergence = distill.divergence
    if divergence == "jsd":
        assert stats.model_mix_kl is not None, "a JSD call's forward gives both heads' KLs to their mixture"
        beta = distill.beta
        kl = beta * stats.second_mix_kl + (1.0 - beta) * stats.model_mix_kl
    else:
        kl = stats.forward_kl if divergence == "forward_kl" else stats.reverse_kl
    coef = distill.distill_coef(temperature)
    if coef == 0.0:  # alpha = 1: the divergence is reported, the backward reads no second head
        return kl, terms, torch.zeros_like(kl)
    k = torch.full_like(kl, coef)
    terms = terms._replace(second_lse=stats.second_lse)
    if divergence == "forward_kl":
        terms = terms._replace(softmax=terms.softmax + k, second=k)
    elif divergence == "reverse_kl":
        terms = terms._replace(softmax=terms.softmax - k * kl, gap=k)
    else:
        k_model = k * (1.0 - beta)
        terms = terms._replace(softmax=terms.softmax - k_model * stats.model_mix_kl, mix_gap=k_model)
    return kl, terms, k * kl


def _masked(keep: Tensor, poison: Tensor, value: Tensor, z_value, kl, terms: GradTerms):
    """A sync-free call's rows: 0 (no loss, no gradient) where the row does not count, NaN (loss and
    gradient) where its label is outside the vocabulary, each as a where (no host read)."""
    def zeroed(t):
        return None if t is None else torch.where(keep, t, 0.0)

    nan = torch.full((), float("nan"), device=value.device)
    coefficients = {name: zeroed(getattr(terms, name))
                    for name in ("softmax", "target", "uniform", "second", "gap", "mix_gap")}
    coefficients["softmax"] = torch.where(poison, nan, coefficients["softmax"])
    return (torch.where(poison, nan, zeroed(value)), zeroed(z_value), zeroed(kl), terms._replace(**coefficients))


def _kl_term(stats: ForwardStats, objective: ASFT, terms: GradTerms) -> tuple[Tensor, GradTerms]:
    """The KL values and the terms with the KL's logit gradient added (module docstring)."""
    assert stats.second_lse is not None, "an ASFT call streams its second head in the forward"
    kl = stats.forward_kl if objective.direction == "forward" else stats.reverse_kl
    k = torch.full_like(kl, objective.kl_coef)
    terms = terms._replace(second_lse=stats.second_lse)
    if objective.direction == "forward":
        return kl, terms._replace(softmax=terms.softmax + k, second=k)
    return kl, terms._replace(softmax=terms.softmax - k * kl, gap=k)


def _per_token(objective: Objective, name: str, out, logp: Tensor) -> Tensor:
    """objective.value / .weight checked: (M,) real tensor on logp's device -> float32.

    A wrong shape would index the backward out of bounds; this names the culprit instead.
    """
    where = f"objective: {type(objective).__name__}.{name}"
    if not isinstance(out, Tensor):
        raise TypeError(f"{where} returned {type(out).__name__}; expected a (M,) float tensor, one per computed token")
    if not out.dtype.is_floating_point:
        raise TypeError(f"{where} returned dtype {out.dtype}; expected a floating-point tensor")
    if tuple(out.shape) != tuple(logp.shape):
        raise ValueError(f"{where} returned shape {tuple(out.shape)}; expected {tuple(logp.shape)}, one value "
                         "per computed token (the shape of TokenBatch.logp)")
    if out.device != logp.device:
        raise ValueError(f"{where} returned a tensor on {out.device}; expected {logp.device}")
    return out.to(torch.float32).contiguous()
