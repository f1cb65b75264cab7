"""One validated call of the loss: what the autograd Function and the objective terms need, built once.

``dft_ops.linear_cross_entropy`` validates its arguments (the door) and builds
a :class:`LossCall`; the Function (:mod:`dft_ops.autograd`) and the per-token
terms (:mod:`dft_ops.loss_terms`) read it; the backend receives only the
contract's types (:mod:`dft_ops.backends.protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .backends import Plan
from .backends.protocol import Backend, Head, Needs, Tokens
from .layout import TokenLayout
from .options import LossOptions


@dataclass(frozen=True, eq=False)
class LossCall:
    """The settings and this batch's data of one call, every piece validated.

    Attributes:
        layout: the compacted :class:`~dft_ops.TokenLayout` (its M rows are what the backends compute).
        options: the call's :class:`~dft_ops.LossOptions` (``vocab_parallel`` checked against its group).
        head: the :class:`~dft_ops.backends.protocol.Head`; its ``weight`` / ``bias`` are replaced by the
            Function's own inputs in forward (the same tensors, as autograd sees them).
        backend: the :class:`~dft_ops.backends.protocol.Backend` (wrapped for vocabulary parallelism).
        vocab_size: V of the whole vocabulary (the group's, under vocabulary parallelism).
        token_inputs: the objective's per-token inputs by name, each (M,) float32 aligned with the rows.
        segments: (M,) int64 sequence ids for objectives with ``needs_segments``, else None.
        divisor: the "mean" reduction's divisor (1.0 for "sum"), or None for reduction "none".
        plan: how the call runs (:class:`~dft_ops.backends.Plan`: one-pass or two passes), decided at the door.
        needs: which gradients the call will need (grad mode and ``requires_grad`` at the door).
    """

    layout: TokenLayout
    options: LossOptions
    head: Head
    backend: Backend
    vocab_size: int
    token_inputs: dict[str, Tensor] = field(default_factory=dict)
    segments: Tensor | None = None
    divisor: float | None = 1.0
    plan: Plan = Plan("two-pass", "")
    needs: Needs = Needs(True, True, False)

    @property
    def tokens(self) -> Tokens:
        """The computed tokens as the backends take them."""
        return Tokens(self.layout.row_targets, self.layout.rows)
