"""The contract both backends implement, and the PyTorch pieces they share.

A backend is an object with two methods (the :class:`Backend` protocol;
:class:`dft_ops.kernels.TritonBackend` in its backward modes,
:class:`dft_ops.torch_backend.TorchBackend`, and wrappers of either)::

    lse_forward(hidden, weight, bias, targets, rows=None, *, softcap=None, temperature=None,
                with_stats=False, smoothing=False, class_weight=None, compute_dtype=None,
                reference: ReferenceHead | None = None) -> ForwardStats
    grad_backward(hidden, weight, bias, targets, rows, lse, coef: GradCoefficients, *,
                  softcap=None, temperature=None, class_weight=None, need_hidden=True,
                  need_weight=True, need_bias=False, filter_eps=None, precise=False,
                  compute_dtype=None, reference: ReferenceHead | None = None, ref_lse=None)
        -> (d_hidden, d_weight, d_bias)

:func:`select_backend` builds the one a call's options ask for. How each
backend runs its passes (Triton's backward mode, its workspace, chunk sizes)
is set when it is built, never through these calls.

Logits of computed token t: ``u = weight @ hidden[rows[t]] + bias``, then
``z = softcap * tanh(u / softcap)`` if softcap, then ``z = z / temperature`` if
temperature. The backward writes the logit gradient

    G[t, j] = (a_t * softmax_tj - b_t * 1[j == y_t] - c_t * u_j
               - e_t * q_tj + f_t * softmax_tj * (log softmax_tj - log q_tj)) * dz_tj/du_tj,

``u_j = class_weight[j]`` (1 without), and accumulates ``d_hidden = G W``,
``d_weight = G^T H``, ``d_bias = sum_t G``. Targets outside ``[0, V)`` (ignored
tokens, or labels owned by another vocabulary shard) have no label logit (0)
and no one-hot term.

A :class:`ReferenceHead` (ASFT's frozen reference model) adds a second head
read at the same rows: ``r = ref_weight @ ref_hidden[rows[t]] + ref_bias``,
capped by its own soft-cap and divided by the same temperature, ``q =
softmax(r)`` with log-sum-exp R. The forward streams both heads' tiles in one
pass and returns R and both KLs, KL(p || q) and KL(q || p); the backward
recomputes both tiles for the ``e`` and ``f`` terms (None: 0, and the reference
head is not read), with ``log q = r - R``. The reference gets no gradient.
Both KLs and the ``f`` term see each head's logits only relative to that head's
own maximum or log-sum-exp, so a constant offset between the heads cancels
exactly (it is no logit's error).

Mixed dtypes: hidden and weight may differ (autocast gives bf16 hidden states
with an fp32 head). Both are rounded to :func:`product_dtype` of the pair (or to
``compute_dtype`` when given: autocast's dtype for two fp32 inputs) in
registers, never copied; accumulation is fp32 and each gradient comes back in
its own input's dtype.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKWARD_MODES = ("auto", "gemm", "fused")
"""Backward modes of the Triton backend (docs/backward.md): "gemm" = vocabulary splits, G in a
bounded workspace, cuBLAS products; "fused" = one kernel, fp32 atomics, no workspace;
"auto" = "gemm", or "fused" when gradient filtering is asked for."""
DEFAULT_WORKSPACE_MB = 256
"""Default bound of the "gemm" backward's workspace, MiB (G in the compute dtype, staged rows, scratch)."""
MB = 2**20


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1).

    The one place that reads the variable: Triton reads it when ``@triton.jit``
    decorates a kernel, so it must be set before ``dft_ops.kernels`` is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class ForwardStats(NamedTuple):
    """Per-token results of ``lse_forward``; each (M,), float32 unless said.

    Attributes:
        lse: log-sum-exp of the (capped, tempered) logits.
        target_logit: z_y, 0 where the target is outside [0, V).
        entropy: entropy (nats) of softmax(z); with_stats only.
        max_logit: max_j z_j; with_stats only.
        argmax: int64, first index of the max logit; with_stats only.
        smooth_sum: sum_j u_j z_j with u = class_weight (or 1); smoothing only.
        ref_lse: R, log-sum-exp of the reference logits r; with a reference only.
        reverse_kl: KL(p || q) = E_p[z - r] - lse + R (p = softmax(z), q = softmax(r));
            with a reference only.
        forward_kl: KL(q || p) = lse - R - E_q[z - r]; with a reference only.
    """

    lse: Tensor
    target_logit: Tensor
    entropy: Tensor | None = None
    max_logit: Tensor | None = None
    argmax: Tensor | None = None
    smooth_sum: Tensor | None = None
    ref_lse: Tensor | None = None
    reverse_kl: Tensor | None = None
    forward_kl: Tensor | None = None


class GradCoefficients(NamedTuple):
    """Per-token coefficients of the logit gradient (see the module docstring); each (M,) float32.

    Attributes:
        softmax: a_t, the factor of softmax(z_t).
        target: b_t, the factor of the one-hot label.
        uniform: c_t, the factor of the class weights u (label smoothing), or None for 0.
        reference: e_t, the factor of the reference's softmax q (forward KL), or None for 0.
        gap: f_t, the factor of ``softmax * (log softmax - log q)`` (reverse KL), or None for 0.
    """

    softmax: Tensor
    target: Tensor
    uniform: Tensor | None = None
    reference: Tensor | None = None
    gap: Tensor | None = None

    @property
    def reads_reference(self) -> bool:
        """The backward must rebuild the reference's logits (an e or f term is present)."""
        return self.reference is not None or self.gap is not None


class ReferenceHead(NamedTuple):
    """A frozen second head read at the same token rows as the model's (ASFT's reference model).

    Attributes:
        hidden: (N, D_ref) float32 / bfloat16 / float16, row i for hidden's row i; any strides.
        weight: (V, D_ref), the same vocabulary as the model's head.
        bias: (V,) or None.
        softcap: the reference's own soft-cap, or None. The call's temperature applies to
            both heads; a logit scale is folded into hidden / bias by the caller.

    Never differentiated: backends read it without tracking gradients.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None


Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


@runtime_checkable
class Backend(Protocol):
    """The two passes of the contract (module docstring); implementations keep their own settings.

    ``name`` says what runs (e.g. "torch", "triton-gemm"): benchmarks and errors report it.
    """

    name: str

    def lse_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                    rows: Tensor | None = None, *, softcap: float | None = None, temperature: float | None = None,
                    with_stats: bool = False, smoothing: bool = False, class_weight: Tensor | None = None,
                    compute_dtype: torch.dtype | None = None,
                    reference: ReferenceHead | None = None) -> ForwardStats: ...

    def grad_backward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                      rows: Tensor | None, lse: Tensor, coef: GradCoefficients, *, softcap: float | None = None,
                      temperature: float | None = None, class_weight: Tensor | None = None, need_hidden: bool = True,
                      need_weight: bool = True, need_bias: bool = False, filter_eps: float | None = None,
                      precise: bool = False, compute_dtype: torch.dtype | None = None,
                      reference: ReferenceHead | None = None, ref_lse: Tensor | None = None) -> Grads: ...


def resolve_backward_mode(mode: str, filter_eps) -> str:
    """The Triton backward that runs: "gemm" or "fused" ("auto": gemm, fused when filtering is asked for).

    Gradient filtering skips negligible tiles of the fused kernel; the GEMM
    backward has no tiles to skip (cuBLAS computes every product), so asking
    for both is an error rather than a silently ignored option.
    """
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward_mode: expected one of {BACKWARD_MODES}, got {mode!r}")
    if mode == "auto":
        return "fused" if filter_eps is not None else "gemm"
    if mode == "gemm" and filter_eps is not None:
        raise ValueError("filter_eps: gradient filtering skips tiles of backward_mode='fused'; the 'gemm' backward "
                         "computes every product in cuBLAS. Use backward_mode='fused' (or 'auto') with filter_eps.")
    return mode


def select_backend(options, device: torch.device) -> Backend:
    """The :class:`Backend` of one call, from its :class:`~dft_ops.LossOptions` and the inputs' device.

    ``options.backend``: "torch", "triton", or "auto" (Triton on CUDA tensors,
    PyTorch elsewhere). The Triton backend takes ``backward_mode`` and
    ``workspace_mb``; the PyTorch backend has a single way to run (they do
    not apply to it). Raises ValueError naming the option before any work.
    """
    name = options.backend
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend()
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
            f"interpreter); hidden is on {device}. Use backend='torch' or 'auto'."
        )
    resolve_backward_mode(options.backward_mode, options.filter_eps)
    from .kernels import TritonBackend  # imports triton: only when asked for

    return TritonBackend(options.backward_mode, workspace_bytes=max(1, int(options.workspace_mb * MB)))


def product_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype,
                  requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype the products run in: ``requested`` if given; else fp32 only if both are, a 16-bit one otherwise.

    bf16 wins over fp16 (mixing the two): it keeps fp16's range safe to cast into.
    """
    if requested is not None:
        return requested
    if hidden_dtype == weight_dtype:
        return hidden_dtype
    if torch.float32 in (hidden_dtype, weight_dtype):
        return weight_dtype if hidden_dtype == torch.float32 else hidden_dtype
    return torch.bfloat16


def _check_vector(name: str, t, length: int, what: str, *, integer=False, device=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name}: expected shape ({length},) ({what}), got {tuple(t.shape)}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    if not integer and not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device} but hidden is on {device}")


def _check_matrix(name: str, t) -> None:
    """A 2-D float32 / bfloat16 / float16 tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; use float32, bfloat16 or float16")


def _check_positive(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a positive finite number or None, got {value!r}")


def check_forward_args(hidden, weight, bias, targets, rows, *, softcap=None, temperature=None,
                       class_weight=None, compute_dtype=None, reference=None) -> int:
    """Validate a backend call's shapes (ValueError / TypeError naming the argument); returns M.

    Only shapes, dtypes and devices: nothing that needs a device sync. Values of
    ``rows`` must lie in [0, N) (the caller's job: the front end builds them).
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        _check_matrix(name, t)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match hidden's D={hidden.shape[1]}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device} but hidden is on {hidden.device}")
    N, V = hidden.shape[0], weight.shape[0]
    if not isinstance(targets, Tensor) or targets.ndim != 1:
        raise ValueError(f"targets: expected a 1-D tensor (M,), got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    M = targets.shape[0]
    _check_vector("targets", targets, M, "M computed tokens", integer=True, device=hidden.device)
    if rows is None:
        if M != N:
            raise ValueError(f"targets: {M} targets for {N} rows of hidden; pass rows (M,) to compute a subset")
    else:
        _check_vector("rows", rows, M, "one row of hidden per target", integer=True, device=hidden.device)
    if bias is not None:
        _check_vector("bias", bias, V, "V, vocabulary size from weight", device=hidden.device)
    if class_weight is not None:
        _check_vector("class_weight", class_weight, V, "V, vocabulary size from weight", device=hidden.device)
    _check_positive("softcap", softcap)
    _check_positive("temperature", temperature)
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype: expected None, torch.float32, torch.bfloat16 or torch.float16, "
                        f"got {compute_dtype!r}")
    if reference is not None:
        check_reference(reference, hidden, weight)
    return M


def check_reference(reference, hidden: Tensor, weight: Tensor) -> None:
    """A :class:`ReferenceHead` matching the model's rows (N) and vocabulary (V); errors name its field."""
    if not isinstance(reference, ReferenceHead):
        raise TypeError(f"reference: expected a ReferenceHead or None, got {type(reference).__name__}")
    for name, t in (("reference.hidden", reference.hidden), ("reference.weight", reference.weight)):
        _check_matrix(name, t)
        if t.device != hidden.device:
            raise ValueError(f"{name}: on {t.device} but hidden is on {hidden.device}")
    ref_hidden, ref_weight = reference.hidden, reference.weight
    if ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"reference.hidden: {ref_hidden.shape[0]} rows for hidden's {hidden.shape[0]}; "
                         "expected one reference row per row of hidden")
    if ref_weight.shape != (weight.shape[0], ref_hidden.shape[1]):
        raise ValueError(f"reference.weight: expected shape ({weight.shape[0]}, {ref_hidden.shape[1]}) "
                         f"(the model's V, reference.hidden's D), got {tuple(ref_weight.shape)}")
    if reference.bias is not None:
        _check_vector("reference.bias", reference.bias, weight.shape[0], "V, vocabulary size from weight",
                      device=hidden.device)
    _check_positive("reference.softcap", reference.softcap)


def check_backward_args(hidden, weight, bias, targets, rows, lse, coef, *, softcap=None, temperature=None,
                        class_weight=None, compute_dtype=None, reference=None, ref_lse=None) -> int:
    """:func:`check_forward_args` plus the per-token lse and coefficients (each (M,)); returns M.

    Coefficients ``reference`` / ``gap`` need ``reference`` and its ``ref_lse``.
    """
    M = check_forward_args(hidden, weight, bias, targets, rows, softcap=softcap, temperature=temperature,
                           class_weight=class_weight, compute_dtype=compute_dtype, reference=reference)
    _check_vector("lse", lse, M, "one per target", device=hidden.device)
    if not isinstance(coef, GradCoefficients):
        raise TypeError(f"coef: expected a GradCoefficients, got {type(coef).__name__}")
    for field, t in zip(GradCoefficients._fields, coef):
        if t is not None or field in ("softmax", "target"):
            _check_vector(f"coef.{field}", t, M, "one per target", device=hidden.device)
    if coef.reads_reference and reference is None:
        raise ValueError("reference: coef has reference / gap terms (a KL to a reference) but no ReferenceHead "
                         "was given")
    if coef.reads_reference:
        if ref_lse is None:
            raise ValueError("ref_lse: coef.reference / coef.gap (terms of softmax(r)) need the reference's "
                             "log-sum-exp from the forward")
        _check_vector("ref_lse", ref_lse, M, "one per target", device=hidden.device)
    return M


def logit_scales(softcap, temperature) -> tuple[float, float]:
    """(1 / softcap, 1 / temperature) as floats; 1.0 for an option that is off."""
    return (1.0 / float(softcap) if softcap is not None else 1.0,
            1.0 / float(temperature) if temperature is not None else 1.0)


def combine_kl(part_max: Tensor, part_sumexp: Tensor, part_ref_max: Tensor, part_ref_sumexp: Tensor,
               part_gap: Tensor, part_ref_gap: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(p || q), KL(q || p)), each (M,), from S vocabulary slices' partials of both heads, each (S, M).

    Slice s holds each head's max (``m_s`` of z, ``n_s`` of r, -inf taken as 0 below), sum-exp
    (``P_s = sum exp(z - m_s)``, ``Q_s = sum exp(r - n_s)``) and the gap sums
    ``part_gap = sum exp(z - m_s) g_s``, ``part_ref_gap = sum exp(r - n_s) g_s`` of
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

    shift, ref_shift = finite(part_max.max(dim=0).values), finite(part_ref_max.max(dim=0).values)
    # each slice's gaps are relative to its own maxima: move them to the global ones
    moved = (finite(part_max) - shift) - (finite(part_ref_max) - ref_shift)
    scale, ref_scale = torch.exp(part_max - shift), torch.exp(part_ref_max - ref_shift)
    P, Q = (part_sumexp * scale).sum(dim=0), (part_ref_sumexp * ref_scale).sum(dim=0)
    gap_p = (scale * (part_gap + moved * part_sumexp)).sum(dim=0) / P
    gap_q = (ref_scale * (part_ref_gap + moved * part_ref_sumexp)).sum(dim=0) / Q
    log_ratio = torch.log(P / Q)
    return gap_p - log_ratio, log_ratio - gap_q


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
