"""The float64 oracle: materialized logits, autograd, formulas written out directly.

This is what the fused implementations are tested against ("naive" is its
name throughout: not to be confused with a reference model, ASFT's, or the
second head that carries one). It is written
independently of :mod:`dft_ops.objectives`: the losses below are the formulas
of the papers with ``.detach()`` for stop-gradients, and their gradients come
from autograd, not from the objective table's ``weight``. Memory is
tokens x vocabulary: for tests and small inputs only.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# per-token loss from the label log-probability (float64), stop-gradients as .detach()
NAIVE_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "ce": lambda logp: -logp,
    "dft": lambda logp: -logp.exp().detach() * logp,
    # CHORD's phi(p) = p (1 - p)
    "chord": lambda logp: -(logp.exp() * (1 - logp.exp())).detach() * logp,
}


def naive_loss(objective, old_logprobs=None, ref_logprobs=None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The float64 per-token loss ``fn(logp, valid, sequence)`` of an objective name or instance.

    ``logp``: (...) float64 label log-probs at the loss positions (with
    autograd); ``valid``: (...) bool, False at ignored positions (whose logp
    is meaningless); ``sequence``: (...) int64 sequence id of each position.
    ``old_logprobs`` / ``ref_logprobs``: PSFT's / iw-SFT's per-token inputs
    (the loss positions' shape). The formulas read the instance's parameters,
    never its ``value`` / ``weight``.
    """
    from . import objectives as o

    if isinstance(objective, (o.ASFT, o.Distill)):  # the base's part; the second head's term is added apart
        return naive_loss(objective.base, old_logprobs, ref_logprobs)
    if isinstance(objective, str):
        return lambda logp, valid, sequence: NAIVE_LOSSES[objective](logp)
    if type(objective) in (o.CE, o.DFT, o.Chord):
        return naive_loss(objective.name)
    if isinstance(objective, o.Power):
        a = objective.alpha
        return lambda logp, valid, sequence: (1 - logp.exp() ** a) / a
    if isinstance(objective, o.Focal):
        g = objective.gamma
        return lambda logp, valid, sequence: -((1 - logp.exp()) ** g) * logp
    if isinstance(objective, o.Threshold):
        base = NAIVE_LOSSES[objective.base.name]
        lo = 0.0 if objective.min_p is None else objective.min_p
        hi = 1.0 if objective.max_p is None else objective.max_p

        def threshold(logp, valid, sequence):
            p = logp.exp().detach()
            return torch.where((p >= lo) & (p <= hi), base(logp), torch.zeros_like(logp))

        return threshold
    if isinstance(objective, o.PSFT):
        eps_low, eps_high = objective.clip_low, objective.clip_high

        def psft(logp, valid, sequence):
            # PPO's clipped surrogate with advantage 1 (the ratio's gradient flows through p)
            p_old = torch.where(valid, old_logprobs.double(), 0.0).exp()
            r = logp.exp() / p_old
            return -torch.min(r, r.clamp(1 - eps_low, 1 + eps_high))

        return psft
    if isinstance(objective, o.ImportanceWeighted):
        lo, hi = objective.clamp

        def importance_weighted(logp, valid, sequence):
            p_ref = torch.where(valid, ref_logprobs.double(), 0.0).exp()
            return -(logp.exp() / p_ref).clamp(lo, hi).detach() * logp

        return importance_weighted
    if isinstance(objective, o.SequenceDFT):
        geometric = objective.mode == "geometric"

        def sequence_dft(logp, valid, sequence):
            # (T, T) membership of the flattened positions: a dense sum, independent of index_add
            lp, ok, seq = logp.reshape(-1), valid.reshape(-1), sequence.reshape(-1)
            same = (seq[:, None] == seq[None, :]) & ok[None, :]
            seq_logp = torch.where(same, lp[None, :], 0.0).sum(1)
            if geometric:
                seq_logp = seq_logp / same.sum(1).clamp(min=1)
            return -(seq_logp.exp().detach() * lp).reshape(logp.shape)

        return sequence_dft
    raise TypeError(f"objective: no float64 reference for {objective!r}")


def sequence_ids(labels_shape, position_ids: Tensor | None = None, device=None) -> Tensor:
    """(labels_shape) int64 sequence id of each position: per row, a new one wherever position_ids is 0."""
    S = labels_shape[-1]
    starts = torch.zeros(labels_shape, dtype=torch.bool, device=device)
    starts[..., 0] = True
    if position_ids is not None:
        starts |= position_ids == 0
    row = torch.arange(starts.numel() // max(S, 1), device=device).reshape(labels_shape[:-1])
    return row[..., None] * (S + 1) + starts.long().cumsum(-1)


def logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, softcap: float | None = None,
           temperature: float | None = None) -> Tensor:
    """(..., V) float64 logits of hidden (..., D) and weight (V, D): capped, then divided by temperature."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature is not None:
        z = z / temperature
    return z


def kl_divergence(z: Tensor, r: Tensor, direction: str) -> Tensor:
    """(...) float64 KL between softmax(z) = p and softmax(r) = q (logits (..., V)), written out.

    "forward": KL(q || p) = sum_j q_j (log q_j - log p_j); "reverse": KL(p || q).
    Differentiable in z (r is the frozen reference's). A class with no
    probability under the first argument adds 0.
    """
    log_p, log_q = F.log_softmax(z, dim=-1), F.log_softmax(r, dim=-1)
    first, second = (log_q, log_p) if direction == "forward" else (log_p, log_q)
    prob = first.exp()
    return (prob * torch.where(prob > 0, first - second, 0.0)).sum(-1)


def distillation_divergence(z: Tensor, r: Tensor, kind: str, beta: float | None = None) -> Tensor:
    """(...) float64 divergence of Distill's ``kind`` between the student p = softmax(z) and the teacher
    q = softmax(r), written out as TRL's GKD and Liger's generalized JSD write it.

    "forward_kl": KL(q || p); "reverse_kl": KL(p || q); "jsd": beta KL(q || m) + (1 - beta) KL(p || m),
    log m = logsumexp(log p + log(1 - beta), log q + log(beta)); beta 0 / 1 are the forward / reverse KL.
    """
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind in ("forward_kl", "reverse_kl"):
        return kl_divergence(z, r, "forward" if kind == "forward_kl" else "reverse")
    log_p, log_q = F.log_softmax(z, dim=-1), F.log_softmax(r, dim=-1)
    # a class neither head gives probability has log m = -inf: logsumexp's gradient there is NaN, so those
    # classes go through it as 0 and come out -inf (no probability weighs them)
    neither = (log_p == float("-inf")) & (log_q == float("-inf"))
    parts = [torch.where(neither, 0.0, log_p + math.log(1 - beta)), torch.where(neither, 0.0, log_q + math.log(beta))]
    log_m = torch.where(neither, float("-inf"), torch.logsumexp(torch.stack(parts), dim=0))

    def kl_to_mixture(log_x):
        x = log_x.exp()
        return (x * torch.where(x > 0, log_x - log_m, 0.0)).sum(-1)

    return beta * kl_to_mixture(log_q) + (1 - beta) * kl_to_mixture(log_p)


def objective_weight(loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor], logp: Tensor, valid: Tensor,
                     sequence: Tensor) -> Tensor:
    """(...) float64 detached ``w = -d loss / d logp`` of a reference loss, by autograd.

    The weight label smoothing is scaled by, derived from the reference formula
    itself (never from the objective table's ``weight``).
    """
    with torch.enable_grad():
        x = logp.detach().requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(x, valid, sequence).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else -grad.detach()


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    objective=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
    shift: bool | int = False,
    return_stats: bool = False,
    position_ids: Tensor | None = None,
    temperature: float | None = None,
    label_smoothing: float = 0.0,
    class_weight: Tensor | None = None,
    z_loss: float = 0.0,
    second_head=None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    distill_mask: Tensor | None = None,
):
    """The float64 oracle of :func:`dft_ops.linear_cross_entropy` (same arguments, float64 result).

    ``objective`` is "ce" (default, as in :func:`dft_ops.linear_cross_entropy`), a name of :data:`NAIVE_LOSSES`, an
    instance from :mod:`dft_ops.objectives` (see :func:`reference_loss`), or a
    callable mapping the (...,) float64 label log-probabilities to per-token
    losses. ``position_ids`` splits rows into sequences (for SequenceDFT).

    Per token, with ``l`` the objective's loss, ``w = -dl/dlogp`` (detached),
    eps = label_smoothing, u = class_weight (or 1), ``logp_j = log softmax(z)_j``:
    ``(1 - eps) u_y l + (eps / V) w sum_j u_j (-logp_j) + z_loss lse^2``. The
    "mean" divides by the number of non-ignored tokens, or by the sum of their
    ``u_y`` with class weights (PyTorch's weighted mean), or by num_items_in_batch.
    An :class:`~dft_ops.objectives.ASFT` objective adds ``kl_coef * KL`` per
    token (:func:`kl_divergence` of the materialized logits of both heads, the
    ``second_head``'s capped by its own soft-cap and divided by the same
    temperature, and detached), after all of the above; stats then add "kl".
    A :class:`~dft_ops.objectives.Distill` objective scales the above but the z-loss by ``alpha`` and adds
    ``(1 - alpha) T^2 D`` (:func:`distillation_divergence`; ``T^2`` with ``t_squared``) at every distilled
    position: those with a label and, with ``distill_unlabeled``, the others where ``distill_mask`` (None:
    everywhere) is True; "mean" divides by their count; stats "kl" is ``D`` there.
    Stats add "argmax" (first index of the max logit), "lse" and "z_loss".
    """
    from .objectives import ASFT, Distill, Objective, batch_tensors

    if isinstance(objective, Objective):  # this batch's tensors held the deprecated way
        objective, held, held_second = batch_tensors(objective)
        old_logprobs = held.get("old_logprobs", old_logprobs)
        ref_logprobs = held.get("ref_logprobs", ref_logprobs)
        second_head = held_second if held_second is not None else second_head
    z = logits(hidden, weight, bias, softcap, temperature)
    asft = objective if isinstance(objective, ASFT) else None
    distill = objective if isinstance(objective, Distill) else None
    r = None
    if asft is not None or distill is not None:
        r = logits(second_head.hidden, second_head.weight, second_head.bias, second_head.softcap,
                   temperature).detach()
    sequence = sequence_ids(labels.shape, position_ids, labels.device)
    if shift:  # position t predicts labels[..., t + shift]; True is 1
        kept = max(labels.shape[-1] - int(shift), 0)
        z, labels, sequence = z[..., :kept, :], labels[..., int(shift):], sequence[..., :kept]
        r = None if r is None else r[..., :kept, :]
    V = z.shape[-1]
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    logp_all = F.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    logp = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    if callable(objective):  # a plain logp -> loss function
        loss_fn = lambda logp, valid, sequence: objective(logp)  # noqa: E731
    else:
        loss_fn = naive_loss("ce" if objective is None else objective, old_logprobs, ref_logprobs)
    per_token = loss_fn(logp, valid, sequence)
    u = torch.ones(V, dtype=torch.float64, device=z.device) if class_weight is None else class_weight.double()
    u_y = u[safe_labels]
    if class_weight is not None or label_smoothing:
        per_token = (1 - label_smoothing) * u_y * per_token
    if label_smoothing:
        # 0 * -inf is 0: a class with no weight, or a masked (-inf) logit with weight 0
        smooth_nll = -(u * torch.where(u != 0, logp_all, 0.0)).sum(-1)
        w = objective_weight(loss_fn, logp, valid, sequence)
        per_token = per_token + (label_smoothing / V) * w * smooth_nll
    if distill is not None:
        per_token = distill.alpha * per_token
    z_loss_value = z_loss * lse**2
    if z_loss:
        per_token = per_token + z_loss_value
    kl = None
    if asft is not None:
        kl = kl_divergence(z, r, asft.direction)
        per_token = per_token + asft.kl_coef * kl
    per_token = torch.where(valid, per_token, torch.zeros_like(logp))
    distilled = valid
    if distill is not None:
        if distill.distill_unlabeled:
            distilled = valid | (torch.ones_like(valid) if distill_mask is None else distill_mask.bool())
        t = 1.0 if temperature is None else temperature
        coef = (1 - distill.alpha) * (t * t if distill.t_squared else 1.0)
        kl = torch.where(distilled, distillation_divergence(z, r, distill.kind, distill.beta), 0.0)
        per_token = per_token + coef * kl
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        if num_items_in_batch is not None:
            denom = torch.as_tensor(num_items_in_batch, dtype=torch.float64).clamp(min=1)
        elif distill is not None and class_weight is None:
            denom = distilled.sum().double().clamp(min=1)
        elif class_weight is not None:
            denom = torch.where(valid, u_y, 0.0).sum()
            denom = torch.where(denom == 0, 1.0, denom)  # all ignored: loss 0, not NaN
        else:
            denom = valid.sum().double().clamp(min=1)
        loss = per_token.sum() / denom
    if not return_stats:
        return loss
    with torch.no_grad():
        p_all = logp_all.exp()
        # 0 * -inf is 0 for classes with probability 0 (masked logits)
        entropy = -(p_all * torch.where(p_all > 0, logp_all, 0.0)).sum(-1)
        argmax = z.argmax(-1)
        stats = {
            "logprob": torch.where(valid, logp, 0.0),
            "entropy": torch.where(valid, entropy, 0.0),
            "is_top1": valid & (argmax == labels),
            "argmax": torch.where(valid, argmax, 0),
            "lse": torch.where(valid, lse, 0.0),
            "z_loss": torch.where(valid, z_loss_value, 0.0),
        }
        if kl is not None:
            stats["kl"] = torch.where(distilled, kl, 0.0)
    return loss, stats


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    bias: Tensor | None = None,
    softcap: float | None = None,
    shift: bool | int = False,
    ignore_index: int | None = -100,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The float64 oracle of :func:`dft_ops.token_logprobs`: ``(logprob, entropy)``, each the loss positions'
    shape, 0 at ignored positions, both differentiable by autograd through materialized logits.

    ``temperature``: a float, or a tensor broadcastable to the loss positions' shape (divides each position's
    capped logits). With ``shift`` and ``position_ids``, a target in the next packed document (a 0 of
    ``position_ids`` among the ``shift`` positions after a position) is ignored.
    """
    z = logits(hidden, weight, bias, softcap)
    kept = labels.shape[-1]
    valid = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    if shift:
        k = int(shift)
        kept = max(labels.shape[-1] - k, 0)
        if position_ids is not None:
            for step in range(1, k + 1):  # a document starts at t + step, for some step in 1..k
                valid[..., :kept] &= position_ids[..., step:step + kept] != 0
        z, labels, valid = z[..., :kept, :], labels[..., k:], valid[..., :kept]
    if isinstance(temperature, Tensor):
        z = z / torch.broadcast_to(temperature.double(), labels.shape)[..., None]
    else:
        z = z / float(temperature)
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    logp_all = F.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    p_all = logp_all.exp()
    # 0 * -inf is 0 for classes without probability (masked logits)
    entropy = -(p_all * torch.where(p_all > 0, logp_all, 0.0)).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
