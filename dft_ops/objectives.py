"""The objective table: every loss dft-ops fuses, as a per-token value and weight.

Each objective is a function of the label log-probability ``logp = log p`` of a
token (and, for some, of a per-token input such as an old policy's log-prob,
or of the other tokens of its sequence). Its gradient w.r.t. the token's
logits is always::

    weight * (softmax - onehot(label)),   weight = -d value / d logp

with every stop-gradient factor held constant. So the kernels never see an
objective: both backends compute ``logp`` in the forward, call the row's
``value`` (the loss per token) and ``weight`` on the (tokens,) vectors, and the
backward only needs ``upstream_grad * weight`` per token.

Rows: :class:`CE`, :class:`DFT`, :class:`Power` (the ``-p^a`` family),
:class:`Chord`, :class:`Focal`, :class:`Threshold`, :class:`PSFT`,
:class:`ImportanceWeighted` and :class:`SequenceDFT`; :class:`ASFT` adds a KL
term to a frozen reference model to any of them, and :class:`Distill` mixes
one with a divergence to a frozen teacher (the objectives whose gradient has
a term besides ``weight * (softmax - onehot)``: the backends compute it from
the second head, see their docstrings). Adding an objective is
one class below (name, value, weight, parameter checks) plus its tests; the
float64 reference it is tested against lives in :mod:`dft_ops.naive`.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
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
            packed spans), for objectives with ``needs_segments``; None
            otherwise. Ids are non-decreasing and numbered 0, 1, ... in order
            of appearance among the computed tokens, so they are < M and
            per-sequence sums fit an (M,) buffer (``index_add_``, no sync).
        mask: (M,) bool, the tokens that count, or None (all of them). Set by a
            ``sync_free`` call, which computes ignored tokens too (their logp
            is 0 and whatever the row gives them is zeroed afterwards): an
            objective that counts tokens (a per-sequence mean) counts these.
    """

    logp: Tensor
    inputs: dict[str, Tensor] = field(default_factory=dict)
    segments: Tensor | None = None
    mask: Tensor | None = None

    @property
    def p(self) -> Tensor:
        return self.logp.exp()


class Objective:
    """One row of the table. Subclasses define ``name``, ``value`` and ``weight``.

    An objective holds settings only (hashable, compared by value). This
    batch's tensors are arguments of the call: ``token_inputs`` names the
    per-token inputs the row reads (e.g. PSFT's ``old_logprobs``), passed as
    keywords of ``dft_ops.linear_cross_entropy`` (or of a patched model's
    forward), aligned with the computed tokens and handed over in
    ``TokenBatch.inputs``; ``needs_segments`` asks for ``TokenBatch.segments``
    (sequence ids); ``needs_second_head`` for the call's ``second_head``.
    Parameters are checked in ``__init__`` (ValueError / TypeError starting
    with the parameter's name); ``repr`` shows them.
    """

    name: ClassVar[str]
    token_inputs: ClassVar[tuple[str, ...]] = ()
    needs_segments: ClassVar[bool] = False
    needs_second_head: ClassVar[bool] = False
    # this batch's tensors held the deprecated way (PSFT(tensor), with_token_tensors, ASFT.with_reference):
    # the functional API moves them to the call's arguments (dft_ops.objectives.batch_tensors)
    _batch_inputs: dict = {}
    _batch_second_head = None
    _parameter_names: tuple[str, ...] = ()

    def value(self, t: TokenBatch) -> Tensor:
        """(M,) float32 loss of each token."""
        raise NotImplementedError

    def weight(self, t: TokenBatch) -> Tensor:
        """(M,) float32 detached weight: the logit gradient is weight * (softmax - onehot)."""
        raise NotImplementedError

    def with_token_tensors(self, **tensors: Tensor) -> "Objective":
        """Deprecated: pass the per-token inputs as keywords of the call (``old_logprobs=...``)."""
        unknown = set(tensors) - set(self.token_inputs)
        if unknown:
            raise ValueError(f"objective: {type(self).__name__} has no per-token input {sorted(unknown)}; "
                             f"it takes {list(self.token_inputs)}")
        _deprecated(f"{type(self).__name__}.with_token_tensors({', '.join(tensors)}=...)",
                    f"linear_cross_entropy(..., {', '.join(f'{n}=...' for n in tensors)})")
        return self._holding(inputs={**self._batch_inputs, **{n: _token_tensor(n, t) for n, t in tensors.items()}})

    def _holding(self, *, inputs=None, second_head=None) -> "Objective":
        """A copy holding this batch's tensors the deprecated way (see :func:`batch_tensors`)."""
        clone = copy.copy(self)
        if inputs is not None:
            clone._batch_inputs = inputs
        if second_head is not None:
            clone._batch_second_head = second_head
        return clone

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # read once per class: torch.compile traces repr / == / hash, and cannot trace inspect.signature
        cls._parameter_names = tuple(p.name for p in inspect.signature(cls.__init__).parameters.values()
                                     if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                     and p.name not in cls.token_inputs)

    def _parameters(self) -> tuple[str, ...]:
        """The constructor's setting names (each an attribute of the same name), per-token inputs left out."""
        return self._parameter_names

    def __eq__(self, other):
        # the same row with the same settings, so options built from the same names compare equal
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._parameters())

    def __hash__(self):
        return hash((type(self), *(getattr(self, n) for n in self._parameters())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{p}={getattr(self, p)!r}' for p in self._parameters())})"


def batch_tensors(objective: Objective) -> tuple[Objective, dict[str, Tensor], object]:
    """(the objective without tensors, its per-token inputs, its second head) of an objective that holds
    this batch's tensors the deprecated way; ``(objective, {}, None)`` for one that holds none."""
    inputs, second = objective._batch_inputs, objective._batch_second_head
    base = getattr(objective, "base", None) if isinstance(objective, (ASFT, Distill)) else None
    clean_base, base_inputs, _ = batch_tensors(base) if base is not None else (None, {}, None)
    if not inputs and second is None and not base_inputs:
        return objective, {}, None
    clean = copy.copy(objective)
    clean._batch_inputs, clean._batch_second_head = {}, None
    if base is not None:
        clean.base = clean_base
    return clean, {**base_inputs, **inputs}, second


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"dft_ops: {old} is deprecated and will be removed in the next release; pass this batch's "
                  f"tensors to the call instead: {new}", DeprecationWarning, stacklevel=3)


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
        return _weighted_nll(t.p, t.logp)

    def weight(self, t):
        return t.p


class Power(Objective):
    """The ``-p^a`` family ("Beyond Log Likelihood"): value ``(1 - p^alpha) / alpha``, weight ``p^alpha``.

    alpha = 1 has DFT's gradient ("-p"); large alpha ("-p^10") trains almost
    only tokens the model already predicts well; alpha -> 0 tends to CE.
    """

    name = "power"

    def __init__(self, alpha: float):
        self.alpha = _positive("alpha", alpha)

    def value(self, t):
        # 1 - p^a = -expm1(a log p): no cancellation when p^a is close to 1
        return -torch.expm1(self.alpha * t.logp) / self.alpha

    def weight(self, t):
        return torch.exp(self.alpha * t.logp)


class Chord(Objective):
    """CHORD's token weighting phi: value ``-sg(p (1 - p)) log p``, weight ``p (1 - p)``.

    Down-weights both tokens the model already knows (p near 1) and tokens far
    from its current policy (p near 0).
    """

    name = "chord"

    def value(self, t):
        return _weighted_nll(self.weight(t), t.logp)

    def weight(self, t):
        return t.p * _one_minus_p(t.logp)


class Focal(Objective):
    """Focal loss, gradient not detached: value ``-(1 - p)^gamma log p``.

    weight = ``(1-p)^gamma - gamma p (1-p)^(gamma-1) log p``: it up-weights
    the tokens the model finds hard, the opposite of DFT (kept for comparison).
    gamma = 0 is CE.
    """

    name = "focal"

    def __init__(self, gamma: float):
        self.gamma = _real("gamma", gamma, minimum=0.0)

    def value(self, t):
        return -_one_minus_p(t.logp).pow(self.gamma) * t.logp

    def weight(self, t):
        q = _one_minus_p(t.logp)
        # gamma p (1-p)^(gamma-1) log p, written as gamma p (1-p)^gamma * (log p / (1-p)):
        # log p / (1-p) -> -1 as p -> 1, where (1-p)^(gamma-1) alone would be inf for gamma < 1
        log_ratio = torch.where(q > 0, t.logp / q, torch.full_like(q, -1.0))
        return q.pow(self.gamma) - self.gamma * t.p * q.pow(self.gamma) * log_ratio


class Threshold(Objective):
    """``base`` ("ce" or "dft") on tokens with ``min_p <= p <= max_p`` only; other tokens contribute 0.

    ``p`` is the current (detached) label probability; a missing bound is no
    bound. "Beyond Log Likelihood"'s thresholded variants: e.g.
    ``Threshold("ce", min_p=0.1)`` drops the tokens the model finds very
    unlikely (noisy or off-policy supervision).
    """

    name = "threshold"

    def __init__(self, base: str | Objective, min_p: float | None = None, max_p: float | None = None):
        if isinstance(base, str) and base in ("ce", "dft"):
            base = {"ce": CE, "dft": DFT}[base]()
        if type(base) not in (CE, DFT):
            raise ValueError(f"base: expected 'ce' or 'dft' (or CE() / DFT()), got {base!r}")
        self.base = base
        self.min_p = None if min_p is None else _real("min_p", min_p, minimum=0.0, maximum=1.0)
        self.max_p = None if max_p is None else _real("max_p", max_p, minimum=0.0, maximum=1.0)
        if self.min_p is not None and self.max_p is not None and self.min_p > self.max_p:
            raise ValueError(f"min_p: {self.min_p} is greater than max_p={self.max_p}; no token could be trained")

    def _inside(self, t: TokenBatch) -> Tensor:
        p = t.p
        keep = torch.ones_like(p, dtype=torch.bool)
        if self.min_p is not None:
            keep &= p >= self.min_p
        if self.max_p is not None:
            keep &= p <= self.max_p
        return keep

    def value(self, t):
        return torch.where(self._inside(t), self.base.value(t), 0.0)

    def weight(self, t):
        return torch.where(self._inside(t), self.base.weight(t), 0.0)

    def __repr__(self):
        return f"Threshold(base={self.base.name!r}, min_p={self.min_p}, max_p={self.max_p})"


class PSFT(Objective):
    """Proximal SFT: PPO's clipped surrogate with advantage 1 against an old policy.

    ``r = exp(log p - old_logprobs)``; value ``-min(r, clamp(r, 1 - clip_low, 1 + clip_high))``;
    weight ``r * 1[r <= 1 + clip_high]`` (a token whose ratio already rose past
    the trust region gets no gradient).

    This batch's old log-probs come with the call: ``linear_cross_entropy(...,
    objective=PSFT(), old_logprobs=...)`` (a float tensor of the loss positions'
    shape: labels, or labels[..., 1:] with shift; e.g. ``stats.logprob`` of an
    earlier pass; ignored positions may hold anything), or a patched model's
    forward keyword ``old_logprobs=``.

    Args:
        old_logprobs: deprecated (a tensor here still works, with a
            DeprecationWarning, for one release); leave it None.
        clip_low, clip_high: the trust region ``[1 - clip_low, 1 + clip_high]``.
    """

    name = "psft"
    token_inputs = ("old_logprobs",)

    def __init__(self, old_logprobs: Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.28):
        if old_logprobs is not None:
            _deprecated("PSFT(old_logprobs)", "linear_cross_entropy(..., objective=PSFT(), old_logprobs=...)")
            self._batch_inputs = {"old_logprobs": _token_tensor("old_logprobs", old_logprobs)}
        self.clip_low = _real("clip_low", clip_low, minimum=0.0, maximum=1.0, open_maximum=True)
        self.clip_high = _real("clip_high", clip_high, minimum=0.0)

    def _ratio(self, t: TokenBatch) -> Tensor:
        return torch.exp(t.logp - t.inputs["old_logprobs"])

    def value(self, t):
        r = self._ratio(t)
        return -torch.minimum(r, r.clamp(1.0 - self.clip_low, 1.0 + self.clip_high))

    def weight(self, t):
        r = self._ratio(t)
        # where, not r * mask: r may overflow to inf past the trust region
        return torch.where(r <= 1.0 + self.clip_high, r, 0.0)


class ImportanceWeighted(Objective):
    """Token-level importance-weighted SFT (iw-SFT): value ``-sg(clamp(p / p_ref, lo, hi)) log p``.

    weight ``clamp(p / p_ref, lo, hi)`` with ``p_ref = exp(ref_logprobs)``.

    This batch's reference-policy log-probs come with the call:
    ``linear_cross_entropy(..., objective=ImportanceWeighted(), ref_logprobs=...)``
    (a float tensor of the loss positions' shape), or a patched model's forward
    keyword ``ref_logprobs=``.

    Args:
        ref_logprobs: deprecated (a tensor here still works, with a
            DeprecationWarning, for one release); leave it None.
        clamp: ``(lo, hi)`` bounds of the importance weight, ``0 <= lo <= hi``.
    """

    name = "importance_weighted"
    token_inputs = ("ref_logprobs",)

    def __init__(self, ref_logprobs: Tensor | None = None, clamp: tuple[float, float] = (0.2, 1.8)):
        if ref_logprobs is not None:
            _deprecated("ImportanceWeighted(ref_logprobs)",
                        "linear_cross_entropy(..., objective=ImportanceWeighted(), ref_logprobs=...)")
            self._batch_inputs = {"ref_logprobs": _token_tensor("ref_logprobs", ref_logprobs)}
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ValueError(f"clamp: expected a pair (lo, hi), got {clamp!r}")
        lo = _real("clamp", clamp[0], minimum=0.0)
        hi = _real("clamp", clamp[1], minimum=0.0)
        if lo > hi:
            raise ValueError(f"clamp: lower bound {lo} is greater than upper bound {hi}")
        self.clamp = (lo, hi)

    def value(self, t):
        return _weighted_nll(self.weight(t), t.logp)

    def weight(self, t):
        return torch.exp(t.logp - t.inputs["ref_logprobs"]).clamp(*self.clamp)


class SequenceDFT(Objective):
    """The DFT paper's sequence-level ablations (section 4.7): one detached weight per sequence.

    Every token of a sequence gets value ``-sg(w) log p`` and weight ``w`` with
    ``w = exp(sum of log p)`` over the sequence's non-ignored tokens (mode
    "product": the sequence probability) or ``w = exp(mean of log p)`` (mode
    "geometric", GSPO-style). Sequences are the rows of the labels, or the
    packed documents starting where ``position_ids`` is 0.
    """

    name = "sequence_dft"
    needs_segments = True
    MODES: ClassVar[tuple[str, ...]] = ("product", "geometric")

    def __init__(self, mode: str):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def value(self, t):
        return _weighted_nll(self.weight(t), t.logp)

    def weight(self, t):
        seg = t.segments
        # segment ids are < M (see TokenBatch): O(tokens) sums without a host sync
        seq_logp = torch.zeros_like(t.logp).index_add_(0, seg, t.logp)
        if self.mode == "geometric":
            counted = torch.ones_like(t.logp) if t.mask is None else t.mask.to(t.logp.dtype)
            count = torch.zeros_like(t.logp).index_add_(0, seg, counted)
            seq_logp = seq_logp / count.clamp(min=1.0)
        return torch.exp(seq_logp)[seg]


class _OnBase(Objective):
    """An objective whose label term is another row of the table, ``self.base`` (ASFT, Distill): its value,
    weight and per-token inputs are the base's; what it adds to them (a KL, a divergence to a teacher) is
    applied from the backend's statistics (loss_terms)."""

    base: Objective

    def value(self, t):
        return self.base.value(t)

    def weight(self, t):
        return self.base.weight(t)

    def with_token_tensors(self, **tensors):
        clone = copy.copy(self)
        clone.base = self.base.with_token_tensors(**tensors)
        return clone


class ASFT(_OnBase):
    """Anchored SFT: a base objective plus a KL term to a frozen reference model, per token.

    ``loss_t = base_t + kl_coef * KL_t`` with p = softmax(z) the model's and
    q = softmax(r) the reference model's distribution over the vocabulary (both
    soft-capped by their own caps, then divided by the call's temperature):

    - direction "forward" (ASFT's code, Unsloth's default): ``KL(q || p) =
      sum_j q_j (log q_j - log p_j)``, logit gradient ``kl_coef * (p - q)``;
    - direction "reverse" (ASFT's paper): ``KL(p || q)``, logit gradient
      ``kl_coef * p * ((z - r) - E_p[z - r])``.

    ``base_t`` is the base row with every option of the call (label smoothing,
    class weights, z-loss); the KL term is added unweighted, is 0 at ignored
    tokens, and a "mean" divides the sum by the base's count. The reference
    gets no gradient. Neither model's logits are materialized: both heads are
    streamed through the same online pass.

    The reference model's head comes with each call as its second head:
    ``linear_cross_entropy(..., objective=ASFT(0.1), second_head=dft_ops.SecondHead(ref_hidden,
    ref_weight, bias=None, softcap=None))`` (``dft_ops.patch(..., reference=model)`` does
    it per batch); calling the loss without one raises a ValueError.

    Args:
        kl_coef: lambda >= 0.
        direction: "forward" or "reverse".
        base: a name of the table or an Objective instance (not an ASFT).
    """

    name = "asft"
    needs_second_head = True
    DIRECTIONS: ClassVar[tuple[str, ...]] = ("forward", "reverse")

    def __init__(self, kl_coef: float, direction: str = "forward", base: str | Objective = "dft"):
        self.kl_coef = _real("kl_coef", kl_coef, minimum=0.0)
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction: expected one of {self.DIRECTIONS}, got {direction!r}")
        self.direction = direction
        if isinstance(base, Objective) and base.needs_second_head or base in ("asft", "distill"):
            raise ValueError("base: an objective with a second head (ASFT, Distill) cannot be the base of an ASFT; "
                             "pass the base row (e.g. 'dft')")
        try:
            self.base = resolve(base)
        except (TypeError, ValueError) as err:
            raise type(err)(f"base: {str(err).removeprefix('objective: ')}") from None
        # the base row's per-token inputs and segments are this objective's
        self.token_inputs = self.base.token_inputs
        self.needs_segments = self.base.needs_segments

    def with_reference(self, ref_hidden: Tensor, ref_weight: Tensor, ref_bias: Tensor | None = None,
                       ref_softcap: float | None = None) -> "ASFT":
        """Deprecated: pass ``second_head=dft_ops.SecondHead(ref_hidden, ref_weight, ref_bias, ref_softcap)``
        to the call. Returns a copy holding this batch's reference head (one release more)."""
        from .backends.protocol import SecondHead

        for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
            if t is None and name == "ref_bias":
                continue
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"{name}: expected a floating-point tensor, got {got}")
        if ref_softcap is not None:
            ref_softcap = _positive("ref_softcap", ref_softcap)
        _deprecated("ASFT.with_reference(ref_hidden, ref_weight, ...)",
                    "linear_cross_entropy(..., second_head=dft_ops.SecondHead(ref_hidden, ref_weight, bias, softcap))")
        return self._holding(second_head=SecondHead(ref_hidden, ref_weight, ref_bias, ref_softcap))

    @property
    def has_reference(self) -> bool:
        """Whether this (deprecated) instance holds a batch's reference head (:meth:`with_reference`)."""
        return self._batch_second_head is not None

    def _parameters(self):
        return ("kl_coef", "direction", "base")


class Distill(_OnBase):
    """Knowledge distillation to a frozen teacher head (the call's second head), mixed with a label objective.

    Per computed token, with ``p = softmax(z)`` the model's (the student's) and ``q = softmax(r)`` the
    teacher's distribution over the vocabulary (each soft-capped by its own cap, both divided by the call's
    ``temperature`` T; T = 1 without one)::

        loss_t = alpha * label_t + (1 - alpha) * T^2 * D_t        (T^2 only with ``t_squared``)

    ``label_t``: the base row ("ce" by default) with every option of the call (label smoothing, class
    weights; the z-loss is added unscaled). ``D_t`` by ``kind``:

    - "forward_kl": ``KL(q || p)``, the teacher's distribution as the target (Hinton et al.'s KD);
      logit gradient ``p - q``;
    - "reverse_kl": ``KL(p || q)`` (MiniLLM); logit gradient ``p ((z - r) - E_p[z - r])``;
    - "jsd": the generalized Jensen-Shannon divergence of Liger's ``LigerFusedLinearJSD(jsd_beta=beta)``
      and TRL's GKD, ``beta KL(q || m) + (1 - beta) KL(p || m)`` with the mixture ``m = beta q +
      (1 - beta) p``; logit gradient ``(1 - beta) p (log p - log m - KL(p || m))``. As in Liger and TRL,
      ``beta = 0`` is the forward KL and ``beta = 1`` the reverse KL (the formula itself would be 0
      there).

    Which tokens: those with a label (the layout's computed tokens); with ``distill_unlabeled`` also the
    loss positions whose label is ``ignore_index`` (prompt tokens; every position for pure distillation),
    where only the distillation term is computed: ``(1 - alpha) T^2 D_t``. A call's ``distill_mask``
    (bool, the loss positions' shape) then limits those to where it is True (``dft_ops.patch`` passes the
    attention mask: no padding is distilled). A "mean" divides the sum by the number of distilled tokens
    (or ``num_items_in_batch``). ``TokenStats.kl`` holds ``D_t`` unscaled.

    The teacher's head comes with each call as its second head (its own hidden size D2, bias, soft-cap
    and dtypes): ``linear_cross_entropy(..., objective=Distill(), second_head=dft_ops.SecondHead(
    teacher_hidden, teacher_weight))``, or ``dft_ops.patch(model, objective=Distill(), reference=teacher)``
    per batch. Neither model's logits are materialized; the teacher gets no gradient.

    Args:
        kind: "jsd", "forward_kl" or "reverse_kl".
        beta: the teacher's weight in the mixture, in [0, 1] (kind "jsd" only; default 0.5, Liger's).
        alpha: the label objective's weight in [0, 1] (1 - alpha: the distillation term's); default 0.5, the
            0.5 / 0.5 of Liger's distillation losses. 0: distillation only.
        base: the label objective: a name of the table ("ce", "dft", ...) or an Objective instance (not
            one with a second head).
        t_squared: multiply the distillation term by T^2 (Hinton et al.: its gradient then keeps its size as
            T changes). Liger's and TRL's losses have no such factor: False matches them.
        distill_unlabeled: also distill the loss positions without a label (see above).
    """

    name = "distill"
    needs_second_head = True
    KINDS: ClassVar[tuple[str, ...]] = ("jsd", "forward_kl", "reverse_kl")

    def __init__(self, kind: str = "jsd", beta: float | None = None, alpha: float = 0.5, base: str | Objective = "ce",
                 t_squared: bool = True, distill_unlabeled: bool = False):
        if kind not in self.KINDS:
            raise ValueError(f"kind: expected one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "jsd":
            self.beta = 0.5 if beta is None else _real("beta", beta, minimum=0.0, maximum=1.0)
        elif beta is not None:
            raise ValueError(f"beta: only kind='jsd' mixes the two distributions; kind={kind!r} takes no beta")
        else:
            self.beta = None
        self.alpha = _real("alpha", alpha, minimum=0.0, maximum=1.0)
        for flag, value in (("t_squared", t_squared), ("distill_unlabeled", distill_unlabeled)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag}: expected a bool, got {type(value).__name__}")
        self.t_squared, self.distill_unlabeled = t_squared, distill_unlabeled
        if isinstance(base, Objective) and base.needs_second_head or base in ("asft", "distill"):
            raise ValueError("base: the label objective cannot compare with a second head itself (ASFT, Distill); "
                             "pass a row of the table (e.g. 'ce' or 'dft')")
        try:
            self.base = resolve(base)
        except (TypeError, ValueError) as err:
            raise type(err)(f"base: {str(err).removeprefix('objective: ')}") from None
        if distill_unlabeled and self.base.needs_segments:
            raise ValueError(f"base: {type(self.base).__name__} weighs whole sequences of labeled tokens; "
                             "distill_unlabeled would add tokens without a label to them. Use another base, or "
                             "distill_unlabeled=False")
        self.token_inputs = self.base.token_inputs
        self.needs_segments = self.base.needs_segments

    @property
    def divergence(self) -> str:
        """The divergence computed: "forward_kl", "reverse_kl" or "jsd" (kind "jsd" with beta 0 or 1 is a KL)."""
        if self.kind == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return self.kind

    @property
    def mix_weight(self) -> float | None:
        """beta of a proper generalized JSD (0 < beta < 1), the teacher's weight in the mixture; else None."""
        return self.beta if self.divergence == "jsd" else None

    def distill_coef(self, temperature: float | None) -> float:
        """The distillation term's factor ``(1 - alpha) T^2`` (T^2 with ``t_squared`` only)."""
        t = 1.0 if temperature is None else float(temperature)
        return (1.0 - self.alpha) * (t * t if self.t_squared else 1.0)

    def _parameters(self):
        return ("kind", "beta", "alpha", "base", "t_squared", "distill_unlabeled")


def _weighted_nll(w: Tensor, logp: Tensor) -> Tensor:
    """``-w * log p`` for a detached weight ``w``, 0 where ``w`` is 0.

    A label whose logit is -inf (a class masked by the bias) has p = 0 and
    log p = -inf: DFT's ``-p log p`` tends to 0 there (and its gradient, weight
    p, is 0), where the product alone would be 0 * inf = NaN.
    """
    return torch.where(w == 0, torch.zeros_like(logp), -w * logp)


def _one_minus_p(logp: Tensor) -> Tensor:
    """1 - p from log p, accurate when p is close to 1 (where 1 - exp(logp) cancels)."""
    return -torch.expm1(logp)


def _real(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
          open_maximum: bool = False) -> float:
    """A finite real parameter within bounds, as float; TypeError / ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and (value >= maximum if open_maximum else value > maximum):
        raise ValueError(f"{name}: must be {'<' if open_maximum else '<='} {maximum}, got {value}")
    return value


def _positive(name: str, value) -> float:
    value = _real(name, value)
    if value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")
    return value


def _token_tensor(name: str, value) -> Tensor:
    """A per-token input held the deprecated way: a floating tensor (its shape is checked at the call)."""
    if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
        got = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{name}: expected a floating-point tensor of the loss positions' shape, got {got}")
    return value


# name -> constructor, for objective="..." strings (the objectives without required parameters)
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CE, DFT, Chord)}
# objectives that need parameters, by name: for a helpful error on objective="power"
_NEEDS_PARAMETERS: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Power, Focal, Threshold, PSFT, ImportanceWeighted, SequenceDFT, ASFT, Distill)
}


def resolve(objective: str | Objective) -> Objective:
    """The Objective for a name from :data:`OBJECTIVES` or an Objective instance."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        if objective in OBJECTIVES:
            return OBJECTIVES[objective]()
        if objective in _NEEDS_PARAMETERS:
            cls = _NEEDS_PARAMETERS[objective]
            params = [str(p.replace(annotation=inspect.Parameter.empty))
                      for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
            raise ValueError(f"objective: {objective!r} takes parameters; pass an instance, "
                             f"dft_ops.objectives.{cls.__name__}({', '.join(params)})")
        raise ValueError(
            f"objective: unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)} "
            f"or pass an instance from dft_ops.objectives"
        )
    raise TypeError(f"objective: expected a name or a dft_ops.objectives.Objective, got {type(objective).__name__}")
