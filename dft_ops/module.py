"""``dft_ops.LinearCrossEntropy``: the functional API as an nn.Module holding the options."""

from __future__ import annotations

from torch import Tensor, nn

from . import objectives as _objectives
from .functional import _check_options, linear_cross_entropy


class LinearCrossEntropy(nn.Module):
    """Fused linear + objective loss; options fixed at construction.

    ``forward(hidden (..., D), weight (V, D), labels (...), bias=None,
    num_items_in_batch=None)`` returns what :func:`dft_ops.linear_cross_entropy`
    returns with this module's options. The module holds no parameters: the
    head's weight is passed in, so it can be the model's own ``lm_head.weight``.
    """

    def __init__(self, objective="dft", *, ignore_index=-100, reduction="mean", softcap=None,
                 shift=False, return_stats=False, backend="auto", filter_eps=None):
        super().__init__()
        _check_options(reduction=reduction, softcap=softcap, num_items_in_batch=None, ignore_index=ignore_index,
                       backend=backend, return_stats=return_stats, filter_eps=filter_eps)
        self.objective = _objectives.resolve(objective)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.softcap = softcap
        self.shift = shift
        self.return_stats = return_stats
        self.backend = backend
        self.filter_eps = filter_eps

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                num_items_in_batch=None):
        return linear_cross_entropy(
            hidden, weight, labels, bias=bias, objective=self.objective, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items_in_batch=num_items_in_batch, softcap=self.softcap,
            shift=self.shift, return_stats=self.return_stats, backend=self.backend, filter_eps=self.filter_eps,
        )

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"softcap={self.softcap}, shift={self.shift}, backend={self.backend!r}")
