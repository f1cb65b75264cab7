"""``dft_ops.LossOptions``: every loss option in one frozen object, validated once.

The functional API builds one from its keywords (or takes ``options=``),
:class:`dft_ops.LinearCrossEntropy` holds one, ``dft_ops.patch`` builds one
from its options dict (:meth:`LossOptions.from_dict`). Options are settings:
a batch's tensors (labels, bias, ``num_items_in_batch``, ``position_ids``, a
second head, an objective's per-token inputs) are call arguments, never
options. The one tensor among the settings is ``class_weight``, a constant of
the loss as ``nn.CrossEntropyLoss``'s ``weight`` is; it compares by identity
(reading it to compare would synchronise the device).

This is the one place each option is validated (the layers below receive
checked values): adding an option is one field below, declared with
:func:`_option` and the function that checks and normalizes its value (a
TypeError / ValueError whose message starts with the field's name), plus its
formula in docs/api.md. Combinations of options are judged once, here, the
same for every backend (:meth:`LossOptions._check_combinations`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from torch import Tensor

from . import objectives as _objectives
from .backends.protocol import BACKWARD_MODES
from .distributed.vocab_parallel import VocabParallel
from .inputs import check_dense

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _option(default, check: Callable[[str, Any], Any]):
    """A field of LossOptions: its default and the function ``check(name, value) -> normalized value``."""
    return field(default=default, metadata={"check": check})


# ---------------------------------------------------------------------------------------------------- checks


def _objective(name, value):
    return _objectives.resolve(value)


def _int64(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name}: {value} does not fit in int64, the labels' dtype; no label can equal it")
    return value


def _one_of(choices: tuple[str, ...]):
    def check(name, value) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
        return value

    return check


def _bool(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _shift(name, value) -> int:
    # Cut Cross-Entropy's convention: position t predicts labels[..., t + shift]; True is 1 (Hugging Face)
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a bool or a non-negative int (position t predicts labels[..., t + shift]), "
                        f"got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0 (position t predicts labels[..., t + shift]), got {value}")
    return int(value)


def _real(name, value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")
    return float(value)


def _positive_finite(name, value) -> float | None:
    if value is None:
        return None
    value = _real(name, value, "a positive float or None")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a positive finite number, got {value}")
    return value


def _workspace_mb(name, value) -> float | None:
    if value is None:
        return None
    value = _real(name, value, "a positive number of MiB or None")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a positive finite number of MiB, got {value}")
    return value


def _open_unit_interval(name, value) -> float | None:
    if value is None:
        return None
    value = _real(name, value, "a float in (0, 1) or None")
    if not 0 < value < 1:
        raise ValueError(f"{name}: must be in (0, 1), got {value}")
    return value


def _label_smoothing(name, value) -> float:
    value = _real(name, value, "a float in [0, 1)")
    # eps = 1 would leave no label term at all: the uniform distribution would be the target
    if not 0 <= value < 1:
        raise ValueError(f"{name}: must be in [0, 1), got {value}")
    return value


def _z_loss(name, value) -> float:
    value = _real(name, value, "a float >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: must be finite and >= 0, got {value}")
    return value


def _class_weight(name, value) -> Tensor | None:
    """Type, dtype and rank only: the length (V), device and values are checked per call, with the labels."""
    if value is None:
        return None
    if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
        got = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{name}: expected a floating-point tensor (V,), got {got}")
    if value.ndim != 1:
        raise ValueError(f"{name}: expected shape (V,), got {tuple(value.shape)}")
    check_dense(name, value)
    # constants of the loss, never differentiated; a tensor without grad is kept as is (the same object)
    return value.detach() if value.requires_grad else value


def describe(value) -> str:
    """A short repr of an option value: a tensor by its shape, dtype and device, never its elements."""
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    return repr(value)


def _same(a, b) -> bool:
    # tensors (class_weight) are the same option only as the same object: comparing values would sync
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    return a == b


def _vocab_parallel(name, value) -> VocabParallel | None:
    if value is not None and not isinstance(value, VocabParallel):
        raise TypeError(f"{name}: expected a dft_ops.VocabParallel or None, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------- the options


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class LossOptions:
    """The options of a fused linear + objective loss (see docs/api.md for each one's formula).

    Attributes:
        objective: an :class:`dft_ops.objectives.Objective`; a name ("ce",
            "dft", "chord") is resolved to one on construction. Default
            "ce": a function named cross-entropy computes cross-entropy unless
            told otherwise (a drop-in for Cut Cross-Entropy or Liger trains
            what it trained before); :func:`dft_ops.patch` defaults to "dft".
        ignore_index: label value that contributes nothing (an int64).
        reduction: "mean", "sum" or "none".
        softcap: ``logits <- softcap * tanh(logits / softcap)``, or None.
        shift: position t predicts ``labels[..., t + shift]``; a non-negative
            int (True is 1, the Hugging Face causal shift; False is 0).
        return_stats: also return :class:`dft_ops.TokenStats`.
        backend: "auto", "triton" or "torch".
        filter_eps: gradient filtering threshold in (0, 1) of the Triton
            "fused" backward, or None (exact); refused with backward_mode="gemm".
        label_smoothing: eps in [0, 1): the label term weighs ``1 - eps``, a
            uniform term over the vocabulary ``eps`` (PyTorch's label_smoothing).
        z_loss: coefficient of the per-token ``lse^2`` regularizer (>= 0;
            Liger's ``lse_square_scale``).
        temperature: logits are divided by it after the soft-cap, or None.
        class_weight: (V,) floating tensor of per-class weights >= 0, on
            hidden's device, or None (PyTorch's cross_entropy ``weight``). Its
            length, device and values are checked per call (with the labels'
            single device read); it is never differentiated.
        precise: the Triton backward feeds the 16-bit gradient tile to the
            products as a high and a low part (elementwise-accurate gradients).
        vocab_parallel: a :class:`dft_ops.VocabParallel` (the weight and bias
            are this rank's rows of a head split over a process group), or None.
        backward_mode: "auto" ("onepass" where it applies, else "gemm";
            "fused" with filter_eps), "onepass" (the gradients formed in the
            forward, every product in BLAS), "gemm" (two passes, vocabulary
            splits and cuBLAS products) or "fused" (two passes, one atomic
            kernel, no workspace). See docs/backward.md.
        workspace_mb: bound of the workspace in MiB, or None for the mode's
            default ("gemm": 256; "onepass": the smallest fast chunk).
        sync_free: no host synchronisation in the forward or the backward, so
            a step can be captured in a CUDA graph (``torch.cuda.graph``,
            ``torch.compile(mode="reduce-overhead")``): ignored positions are
            computed and zeroed instead of dropped from the work (it costs the
            ignored positions' share of the loss's compute), and what the
            default path checks on the host yields NaN instead of an error: the
            loss and gradients of a token whose label is outside [0, V), every
            value with a negative or non-finite class weight, the loss with a
            ``num_items_in_batch`` that is not a positive finite number.
            Refused with ``vocab_parallel`` (its group check reads on the host).

    Every field is checked and normalized by the constructor (TypeError /
    ValueError starting with the field's name), and so are combinations
    (``filter_eps`` with backward_mode "gemm"; a second-head objective with
    ``vocab_parallel``); instances are immutable: :meth:`replace` returns a
    checked copy with some fields changed. Two instances are equal when their
    fields are (objectives: the same row with the same settings);
    ``class_weight`` compares by identity, so no tensor is ever read to compare.
    """

    objective: _objectives.Objective = _option("ce", _objective)
    ignore_index: int = _option(-100, _int64)
    reduction: str = _option("mean", _one_of(REDUCTIONS))
    softcap: float | None = _option(None, _positive_finite)
    shift: int = _option(False, _shift)
    return_stats: bool = _option(False, _bool)
    backend: str = _option("auto", _one_of(BACKENDS))
    filter_eps: float | None = _option(None, _open_unit_interval)
    # the peers' options (Liger, Cut Cross-Entropy, TRL, PyTorch)
    label_smoothing: float = _option(0.0, _label_smoothing)
    z_loss: float = _option(0.0, _z_loss)
    temperature: float | None = _option(None, _positive_finite)
    class_weight: Tensor | None = _option(None, _class_weight)
    precise: bool = _option(False, _bool)
    vocab_parallel: VocabParallel | None = _option(None, _vocab_parallel)
    backward_mode: str = _option("auto", _one_of(BACKWARD_MODES))
    workspace_mb: float | None = _option(None, _workspace_mb)
    sync_free: bool = _option(False, _bool)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Options that contradict each other, refused the same on every backend and device."""
        if self.backward_mode == "gemm" and self.filter_eps is not None:
            # judged here, not by the Triton backend: a configuration tried on CPU first must not fail on a GPU
            raise ValueError("filter_eps: gradient filtering skips tiles of backward_mode='fused'; the 'gemm' "
                             "backward computes every product in cuBLAS. Use backward_mode='fused' (or 'auto') "
                             "with filter_eps.")
        if self.backward_mode == "onepass" and self.filter_eps is not None:
            raise ValueError("filter_eps: gradient filtering skips tiles of backward_mode='fused'; the 'onepass' "
                             "head computes every product in BLAS. Use backward_mode='fused' (or 'auto') with "
                             "filter_eps.")
        if self.backward_mode == "onepass" and self.precise:
            raise ValueError("precise: the high and low 16-bit parts of G are the two-pass backward's; the one-pass "
                             "head feeds cuBLAS one G. Use backward_mode 'gemm' or 'fused' (or 'auto') with precise")
        if self.backward_mode == "onepass" and self.reduction == "none":
            raise ValueError("backward_mode: 'onepass' forms the gradients in the forward for one upstream number, "
                             "which reduction='none' (an upstream gradient per token) does not give; use "
                             "reduction 'mean' or 'sum', or backward_mode 'auto' / 'gemm'")
        if self.backward_mode == "onepass" and self.objective.needs_segments:
            raise ValueError(f"backward_mode: 'onepass' weighs each token by its own statistics; "
                             f"{type(self.objective).__name__} needs whole sequences first; use backward_mode "
                             "'auto' or 'gemm'")
        if self.vocab_parallel is not None and self.sync_free:
            raise ValueError("sync_free: the vocabulary-parallel group check reads every rank's call on the host "
                             "(one synchronisation); use sync_free=False with vocab_parallel")
        if self.sync_free and isinstance(self.objective, _objectives.Distill) and self.objective.distill_unlabeled:
            raise ValueError("sync_free: Distill(distill_unlabeled=True) picks the rows to distill by compacting them "
                             "(one synchronisation); use sync_free=False, or distill_unlabeled=False")
        if (isinstance(self.objective, _objectives.Distill) and self.objective.alpha > 0
                and self.temperature not in (None, 1.0)):
            raise ValueError(f"temperature: {self.temperature} divides the whole head's logits, so with "
                             f"Distill(alpha={self.objective.alpha}) the label term would be computed at it too, "
                             "where Hinton's recipe (and Liger's distillation losses) compute it at T = 1. Use "
                             "alpha=0 with a temperature (distillation only; add the label loss from a second call "
                             "without one: docs/distillation.md), or no temperature")
        if (self.class_weight is not None and isinstance(self.objective, _objectives.Distill)
                and self.objective.distill_unlabeled):
            raise ValueError("class_weight: Distill(distill_unlabeled=True) also computes tokens without a label, "
                             "which have no class weight (a weighted mean would divide by label weights only); "
                             "use distill_unlabeled=False with class weights")
        if self.vocab_parallel is not None and self.objective.needs_second_head:
            raise ValueError(f"vocab_parallel: {type(self.objective).__name__} is not supported with a "
                             "vocabulary-parallel head yet (the second head's log-sum-exp and KL sums would need "
                             "their own all-reduces); gather the heads or use another objective")

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(_same(getattr(self, name), getattr(other, name)) for name in self.names())

    def __hash__(self):
        return hash(tuple(id(v) if isinstance(v, Tensor) else v for v in self.as_dict().values()))

    def __repr__(self) -> str:
        return f"LossOptions({', '.join(f'{k}={describe(v)}' for k, v in self.as_dict().items())})"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return _NAMES

    @classmethod
    def check(cls, name: str, value):
        """One option's value, checked and normalized as the constructor does (for code holding a single option)."""
        cls._check_names({name: value})
        return _CHECKS[name](name, value)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "LossOptions":
        """LossOptions from a mapping of option names (e.g. ``dft_ops.patch``'s keywords).

        Raises TypeError naming a key that is not an option.
        """
        cls._check_names(options)
        return cls(**options)

    def replace(self, **changes) -> "LossOptions":
        """A copy with ``changes`` applied, checked like the constructor."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes) if changes else self

    def as_dict(self) -> dict[str, Any]:
        """The options as a dict (the objective stays an instance)."""
        return {name: getattr(self, name) for name in self.names()}

    def digests(self) -> dict[str, int]:
        """Per option (``vocab_parallel`` left out), a digest of its value that is the same in every process
        (``hash`` of a str is salted per process): what the ranks of a vocabulary-parallel group compare.
        ``class_weight`` by shape and dtype (its values are compared as a tensor)."""
        def text(value) -> str:
            if isinstance(value, Tensor):
                return f"Tensor{tuple(value.shape)}{value.dtype}"
            return repr(value)

        return {name: zlib.crc32(text(value).encode()) for name, value in self.as_dict().items()
                if name != "vocab_parallel"}

    @classmethod
    def _check_names(cls, options: Mapping[str, Any]) -> None:
        for name in options:
            if name not in cls.names():
                raise TypeError(f"{name}: not a loss option; expected one of {cls.names()}")


# read once: torch.compile's tracer cannot call dataclasses.fields on the class (a graph break per call)
_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LossOptions))
_CHECKS: dict[str, Callable[[str, Any], Any]] = {f.name: f.metadata["check"] for f in fields(LossOptions)}


class _Unset:
    """Default of an option keyword in a signature: prints as the option's default, and tells "not given" apart."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


UNSET: dict[str, _Unset] = {f.name: _Unset(f.default) for f in fields(LossOptions)}
"""Per option, the default to put in a keyword signature (functional API, module) instead of the literal."""


def resolve_options(options: LossOptions | None, **keywords) -> LossOptions:
    """The options of one call: ``options`` (or the defaults) with the keywords actually given applied.

    ``keywords`` are the option keywords of a signature whose defaults are
    :data:`UNSET`: an explicit keyword overrides the field of ``options``.
    """
    given = {k: v for k, v in keywords.items() if not isinstance(v, _Unset)}
    if options is None:
        return LossOptions(**given)
    if not isinstance(options, LossOptions):
        raise TypeError(f"options: expected a dft_ops.LossOptions or None, got {type(options).__name__}")
    return options.replace(**given)
