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

(see :mod:`dft_ops.backend_contract` for how a backend uses them and
docs/math.md for the derivation).

An :class:`~dft_ops.objectives.ASFT` row adds ``kl_coef * KL`` to the value,
KL from the forward's reference statistics, and its gradient ``kl_coef * (p - q)``
(forward KL: ``a += k``, ``e = k``) or ``kl_coef * p * (log p - log q - KL)``
(reverse KL: ``a -= k KL``, ``f = k``; ``= k p ((z - r) - E_p[z - r])`` without
the offset between the heads that ``z - r`` would carry).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from .backend_contract import ForwardStats, GradCoefficients
from .objectives import ASFT, Objective, TokenBatch


class TokenLoss(NamedTuple):
    """Per computed token, each (M,) float32.

    Attributes:
        value: the loss (objective, smoothing, class weight and z-loss together).
        logp: label log-probability ``z_y - lse``.
        z_loss: ``z_loss * lse^2`` (already in ``value``), or None when z_loss is 0.
        target_weight: ``class_weight[y]``, or None without class weights. A
            "mean" over tokens with class weights divides by their sum (PyTorch).
        coef: the backward's coefficients for a unit upstream gradient.
        kl: the KL to the reference (an ASFT row; ``kl_coef * kl`` is in ``value``), else None.
    """

    value: Tensor
    logp: Tensor
    z_loss: Tensor | None
    target_weight: Tensor | None
    coef: GradCoefficients
    kl: Tensor | None = None


def check_options(*, label_smoothing=0.0, class_weight=None, z_loss=0.0, vocab_size: int | None = None) -> None:
    """TypeError / ValueError naming the option; no device sync."""
    for name, value, upper in (("label_smoothing", label_smoothing, 1.0), ("z_loss", z_loss, math.inf)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        if not (math.isfinite(value) and 0.0 <= value <= upper):
            raise ValueError(f"{name}: must be in [0, {upper}]" + (" and finite" if upper == math.inf else "")
                             + f", got {value}")
    if class_weight is not None:
        if not isinstance(class_weight, Tensor) or not class_weight.dtype.is_floating_point:
            got = class_weight.dtype if isinstance(class_weight, Tensor) else type(class_weight).__name__
            raise TypeError(f"class_weight: expected a floating-point tensor (V,), got {got}")
        if class_weight.ndim != 1 or (vocab_size is not None and class_weight.shape[0] != vocab_size):
            raise ValueError(f"class_weight: expected shape ({vocab_size if vocab_size is not None else 'V'},), "
                             f"got {tuple(class_weight.shape)}")


def token_loss(stats: ForwardStats, targets: Tensor, objective: Objective, *, vocab_size: int,
               inputs: dict[str, Tensor] | None = None, segments: Tensor | None = None,
               label_smoothing: float = 0.0, class_weight: Tensor | None = None, z_loss: float = 0.0) -> TokenLoss:
    """Loss values and gradient coefficients of the M computed tokens.

    Args:
        stats: the backend's forward statistics; ``smooth_sum`` is needed when
            ``label_smoothing > 0`` (forward with ``smoothing=True`` and the same
            ``class_weight``).
        targets: (M,) integer labels in [0, V) (global ids under vocabulary parallelism).
        objective: a row of :mod:`dft_ops.objectives`.
        vocab_size: V.
        inputs / segments: the objective's per-token tensors and sequence ids (see TokenBatch).
        label_smoothing: eps in [0, 1].
        class_weight: (V,) float u, or None (all 1).
        z_loss: coefficient of lse^2, >= 0.

    Returns:
        :class:`TokenLoss`.
    """
    check_options(label_smoothing=label_smoothing, class_weight=class_weight, z_loss=z_loss, vocab_size=vocab_size)
    if label_smoothing > 0 and stats.smooth_sum is None:
        raise ValueError("stats: label_smoothing needs smooth_sum; run the forward with smoothing=True")
    lse = stats.lse
    logp = stats.target_logit - lse
    batch = TokenBatch(logp=logp, inputs=inputs or {}, segments=segments)
    value, weight = (_per_token(objective, name, getattr(objective, name)(batch), logp) for name in ("value", "weight"))
    eps = float(label_smoothing)

    target_weight = None
    label_factor = 1.0 - eps  # (1 - eps) * cw_y, a tensor with class weights
    if class_weight is not None:
        # clamped gather: never an out-of-bounds read, whatever reaches here
        target_weight = class_weight.to(torch.float32).gather(0, targets.long().clamp(0, vocab_size - 1))
        label_factor = label_factor * target_weight
    value = label_factor * value
    softmax_factor = label_factor
    uniform = None
    if eps > 0:
        total_weight = class_weight.to(torch.float32).sum() if class_weight is not None else float(vocab_size)
        smooth_nll = total_weight * lse - stats.smooth_sum
        value = value + (eps / vocab_size) * weight * smooth_nll
        softmax_factor = softmax_factor + eps * total_weight / vocab_size
        uniform = weight * (eps / vocab_size)
    softmax = weight * softmax_factor
    z_value = None
    if z_loss > 0:
        z_value = z_loss * lse * lse
        value = value + z_value
        softmax = softmax + (2.0 * z_loss) * lse
    coef = GradCoefficients(softmax=softmax, target=weight * label_factor, uniform=uniform)
    kl = None
    if isinstance(objective, ASFT):
        kl, coef = _kl_term(stats, objective, coef)
        value = value + objective.kl_coef * kl
    return TokenLoss(value=value, logp=logp, z_loss=z_value, target_weight=target_weight, coef=coef, kl=kl)


def kl_to_reference(stats: ForwardStats, direction: str) -> Tensor:
    """(M,) float32 KL per token from a forward with a reference: KL(q || p) ("forward") or KL(p || q)."""
    if stats.ref_lse is None:
        raise ValueError("stats: a KL to the reference needs the forward's reference statistics "
                         "(run lse_forward with reference=ReferenceHead(...))")
    return stats.forward_kl if direction == "forward" else stats.reverse_kl


def _kl_term(stats: ForwardStats, objective: ASFT, coef: GradCoefficients) -> tuple[Tensor, GradCoefficients]:
    """The KL values and the coefficients with the KL's logit gradient added (module docstring)."""
    kl = kl_to_reference(stats, objective.direction)
    k = torch.full_like(kl, objective.kl_coef)
    if objective.direction == "forward":
        return kl, coef._replace(softmax=coef.softmax + k, reference=k)
    return kl, coef._replace(softmax=coef.softmax - k * kl, gap=k)


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
