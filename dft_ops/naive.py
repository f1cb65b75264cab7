"""Float64 reference: materialized logits, autograd, formulas written out directly.

This is what the fused implementations are tested against. It is written
independently of :mod:`dft_ops.objectives`: the losses below are the formulas
of the papers with ``.detach()`` for stop-gradients, and their gradients come
from autograd, not from the objective table's ``weight``. Memory is
tokens x vocabulary: for tests and small inputs only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# per-token loss from the label log-probability (float64), stop-gradients as .detach()
REFERENCE_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "ce": lambda logp: -logp,
    "dft": lambda logp: -logp.exp().detach() * logp,
}


def logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, softcap: float | None = None) -> Tensor:
    """(..., V) float64 logits of hidden (..., D) and weight (V, D), soft-capped if asked."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    objective: str | Callable[[Tensor], Tensor] = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
    shift: bool = False,
    return_stats: bool = False,
):
    """Reference for :func:`dft_ops.linear_cross_entropy` (same arguments, float64 result).

    ``objective`` is a name of :data:`REFERENCE_LOSSES` or a callable mapping
    the (...,) float64 label log-probabilities to per-token losses.
    """
    z = logits(hidden, weight, bias, softcap)
    if shift:
        z, labels = z[..., :-1, :], labels[..., 1:]
    valid = labels != ignore_index
    logp_all = F.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    loss_fn = REFERENCE_LOSSES[objective] if isinstance(objective, str) else objective
    per_token = torch.where(valid, loss_fn(logp), torch.zeros_like(logp))
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        denom = valid.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / torch.as_tensor(denom, dtype=torch.float64).clamp(min=1)
    if not return_stats:
        return loss
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        stats = {
            "logprob": torch.where(valid, logp, 0.0),
            "entropy": torch.where(valid, entropy, 0.0),
            "is_top1": valid & (z.argmax(-1) == labels),
        }
    return loss, stats
