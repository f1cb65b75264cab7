"""The objective table: every loss dft-ops fuses, as a per-token value and weight.

Each objective is a function of the label log-probability ``logp = log p`` of a
token (and, for some, of a per-token input such as an old policy's log-prob).
Its gradient w.r.t. the token's logits is always::

    weight * (softmax - onehot(label)),   weight = -d value / d logp

with every stop-gradient factor held constant. So the kernels never see an
objective: both backends compute ``logp`` in the forward, call the row's
``value`` (the loss per token) and ``weight`` on the (tokens,) vectors, and the
backward only needs ``upstream_grad * weight`` per token.

Adding an objective is one class below (name, value, weight) plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenBatch:
    """What an objective row sees, for the M computed (non-ignored) tokens.

    Attributes:
        logp: (M,) float32, log-probability of each token's label.
        inputs: per-token tensors the objective asked for (``token_inputs``),
            each (M,) float32, aligned with ``logp``.
        segments: (M,) int64 sequence id of each token (rows of the labels, or
            packed spans), for sequence-level objectives; None otherwise.
    """

    logp: Tensor
    inputs: dict[str, Tensor] = field(default_factory=dict)
    segments: Tensor | None = None

    @property
    def p(self) -> Tensor:
        return self.logp.exp()


class Objective:
    """One row of the table. Subclasses define ``name``, ``value`` and ``weight``.

    ``token_inputs`` names attributes holding tensors shaped like the loss
    positions (labels, or labels[..., 1:] with shift); the functional API
    aligns them with the computed tokens and passes them in ``TokenBatch.inputs``.
    """

    name: ClassVar[str]
    token_inputs: ClassVar[tuple[str, ...]] = ()
    needs_segments: ClassVar[bool] = False

    def value(self, t: TokenBatch) -> Tensor:
        """(M,) float32 loss of each token."""
        raise NotImplementedError

    def weight(self, t: TokenBatch) -> Tensor:
        """(M,) float32 detached weight: the logit gradient is weight * (softmax - onehot)."""
        raise NotImplementedError

    def token_tensors(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.token_inputs}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CE(Objective):
    """Standard SFT cross-entropy: value ``-log p``, weight 1."""

    name = "ce"

    def value(self, t):
        return -t.logp

    def weight(self, t):
        return torch.ones_like(t.logp)


class DFT(Objective):
    """Dynamic Fine-Tuning (DFT paper, eq. 9): value ``-sg(p) log p``, weight ``p``."""

    name = "dft"

    def value(self, t):
        return -t.p * t.logp

    def weight(self, t):
        return t.p


# name -> constructor, for objective="..." strings
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CE, DFT)}


def resolve(objective: str | Objective) -> Objective:
    """The Objective for a name from :data:`OBJECTIVES` or an Objective instance."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        try:
            return OBJECTIVES[objective]()
        except KeyError:
            raise ValueError(
                f"objective: unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)} "
                f"or pass an instance from dft_ops.objectives"
            ) from None
    raise TypeError(f"objective: expected a name or a dft_ops.objectives.Objective, got {type(objective).__name__}")
