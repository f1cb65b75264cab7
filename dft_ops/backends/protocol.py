"""The contract every backend implements, and its data types. Imports no implementation.

A backend (:class:`Backend`) computes two passes over the tokens x vocabulary
logits of one head without ever writing them to memory::

    lse_forward(hidden, head, tokens, *, with_stats=False, smoothing=False) -> ForwardStats
    grad_backward(hidden, head, tokens, terms, needs) -> Grads

or, as a :class:`OnePassBackend`, both in one pass over chunks of tokens whose
full-vocabulary logits are held in a bounded workspace (the per-token terms come
from a callback that applies the objective to each chunk's statistics)::

    loss_and_grads(hidden, head, tokens, terms_of, needs, *, with_stats=False, smoothing=False)
        -> (ForwardStats, Grads)      # Grads in fp32, for a unit upstream gradient

``hidden`` is (N, D); ``head`` (:class:`Head`) describes the output head (its
weight and bias, soft-cap, temperature, the dtype its products run in, class
weights, an optional :class:`SecondHead`); ``tokens`` (:class:`Tokens`) says
which M rows of hidden are computed and their targets. How a backend runs
(Triton's backward mode, workspace, gradient filtering; chunk sizes) is fixed
when it is built (``dft_ops.backends.select_backend``), never per call.

**Logits.** For computed token t (hidden row ``rows[t]``) and vocabulary row j::

    u_tj = weight_j . hidden_rows[t] + bias_j
    z_tj = softcap * tanh(u_tj / softcap)   (when softcap is set), then z_tj / temperature

``s = softmax(z)`` with log-sum-exp ``lse``. A target outside ``[0, V)`` (an
ignored token, or a label another vocabulary shard owns) has no label logit (0)
and no one-hot term. -inf logits (a -inf bias masks a class) have no
probability: they add 0 to every sum, never NaN.

**The second head** (:class:`SecondHead`: ASFT's reference model, a teacher)
is read at the same rows: ``r = weight2 . hidden2_rows[t] + bias2``, capped by
its own soft-cap and divided by the same temperature; ``q = softmax(r)`` with
log-sum-exp ``lse2``. The forward streams both heads in one pass and returns
``lse2`` and both KLs; each head's logits enter only relative to that head's
own maximum or log-sum-exp, so a constant offset between the heads cancels
exactly. The second head gets no gradient.

**The logit gradient** (the one formula every backward computes, written once
here)::

    G_tj = (a_t s_tj - b_t 1[j == y_t] - c_t u_j - e_t q_tj + f_t s_tj (log s_tj - log q_tj)
            + g_t s_tj (log s_tj - log m_tj) + k_t s_tj log s_tj) * dz_tj/du_tj

with :class:`GradTerms` ``(a, b, c, e, f, g, k)`` per token (the upstream gradient
folded in; c, e, f, g, k None for 0), ``u_j = class_weight[j]`` (1 without class
weights), ``dz/du = (1 - tanh^2(u / softcap)) / temperature``, ``log s = z - lse``,
and the mixture ``m_tj = beta q_tj + (1 - beta) s_tj`` of both heads'
distributions with ``beta = head.mix_weight`` (the generalized Jensen-Shannon
divergence's, read by the g term and by the forward's mixture KLs only).
The ``k`` term is the entropy's (``dH/dz = -s (log s + H)``: ``k = -g_H``,
``a -= g_H H`` for an upstream gradient ``g_H`` of the entropy, :mod:`dft_ops.token_logprobs`);
it is the gap term without a second head (``log q = 0``).

**Per-token temperature.** ``tokens.inv_temperature`` (M,), when given,
replaces ``head.temperature`` (then None) row by row: ``z_tj = capped u_tj *
inv_temperature[t]``, and ``dz/du`` with it.

The backward accumulates ``d_hidden = G W``, ``d_weight = G^T H``, ``d_bias = sum_t G`` in
fp32 and returns each in its input's dtype. Where the terms come from (the
objective table, label smoothing, class weights, z-loss, the KL terms):
:mod:`dft_ops.loss_terms`.

**Dtypes.** ``head.compute_dtype`` (:func:`product_dtype`, decided once per
call) is the dtype both operands of every product are rounded to, in registers
(never a copy of the head); accumulation is fp32.

**Validation.** Inputs reach a backend validated (``dft_ops.linear_cross_entropy``
checks every argument once, at the door); backends only assert shapes
(:func:`assert_inputs`).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKWARD_MODES = ("auto", "onepass", "gemm", "fused")
"""Backward modes (docs/backward.md): "onepass" = the gradients formed in the forward, chunk by chunk, every
product in BLAS (6NDV); "gemm" = two passes, G per vocabulary split in a bounded workspace, cuBLAS
products (8NDV); "fused" = two passes, one Triton kernel with fp32 atomics, no workspace;
"auto" = "onepass" where it applies (dft_ops.backends.backward_mode), else "gemm" ("fused" with
gradient filtering). The PyTorch backend runs "onepass" or its own two passes."""
DEFAULT_WORKSPACE_MB = 256
"""Default bound of the "gemm" backward's workspace, MiB (G in the compute dtype, staged rows, scratch)."""
MB = 2**20


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1).

    The one place that reads the variable: Triton reads it when ``@triton.jit``
    decorates a kernel, so it must be set before ``dft_ops.kernels`` is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def product_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype,
                  requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype a head's products run in: ``requested`` (autocast's) if given; else fp32 only if
    both operands are, else the 16-bit one of the two.

    bf16 with fp16 has no common lower precision: the caller refuses that mix
    (``dft_ops.inputs``); here bf16 would win, as it keeps fp16's range.
    """
    if requested is not None:
        return requested
    if hidden_dtype == weight_dtype:
        return hidden_dtype
    if torch.float32 in (hidden_dtype, weight_dtype):
        return weight_dtype if hidden_dtype == torch.float32 else hidden_dtype
    return torch.bfloat16


class SecondHead(NamedTuple):
    """A frozen second head read at the same token positions as the model's (ASFT's reference model,
    a distillation teacher). Never differentiated.

    Attributes:
        hidden: its final hidden states, float32 / bfloat16 / float16: (..., D2)
            with the model's hidden's leading shape as a call argument; (N, D2),
            row i beside hidden's row i, once the call is validated.
        weight: (V, D2), the model's vocabulary.
        bias: (V,) or None.
        softcap: its own final-logit soft-cap, or None (the call's temperature
            applies to both heads; a logit scale is folded into hidden / bias
            by the caller).
        compute_dtype: the dtype of its products; None as a call argument
            (decided by the call, as the model head's is).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None
    compute_dtype: torch.dtype | None = None


class Head(NamedTuple):
    """The output head of one call, built once by the validated call and handed down unchanged.

    Attributes:
        weight: (V, D) float32 / bfloat16 / float16, any strides.
        bias: (V,) any float dtype, or None.
        softcap: positive float or None.
        temperature: positive float or None.
        compute_dtype: the dtype of the products (:func:`product_dtype`).
        class_weight: (V,) float class weights u (the rows of ``weight``), or None.
        second: a :class:`SecondHead` with ``compute_dtype`` set, or None.
        mix_weight: beta in (0, 1), the second head's weight in the mixture ``m = beta q + (1 - beta) s``
            of the generalized Jensen-Shannon divergence (a :class:`~dft_ops.objectives.Distill` call with
            kind "jsd"), or None: the forward then also gives both heads' KLs to m, and the g term reads it.
    """

    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    temperature: float | None
    compute_dtype: torch.dtype
    class_weight: Tensor | None = None
    second: SecondHead | None = None
    mix_weight: float | None = None

    @property
    def inv_softcap(self) -> float:
        """1 / softcap as a float (1.0 without a soft-cap)."""
        return 1.0 / float(self.softcap) if self.softcap is not None else 1.0

    @property
    def inv_temperature(self) -> float:
        """1 / temperature as a float (1.0 without a temperature)."""
        return 1.0 / float(self.temperature) if self.temperature is not None else 1.0


class Tokens(NamedTuple):
    """The M computed tokens of a call.

    Attributes:
        targets: (M,) int64 label of each computed token (outside [0, V): none).
        rows: (M,) int64 row of hidden of each, distinct; None for rows 0..M-1 (then M == N).
        inv_temperature: (M,) float32 ``1 / temperature`` of each computed token, or None (the head's
            temperature applies to all). Given only with ``head.temperature`` None and no second head;
            the two-pass backends take it, a one-pass backend does not (the per-token API,
            :mod:`dft_ops.token_logprobs`, always runs two passes).
    """

    targets: Tensor
    rows: Tensor | None = None
    inv_temperature: Tensor | None = None

    @property
    def count(self) -> int:
        return self.targets.shape[0]


class ForwardStats(NamedTuple):
    """Per-token results of ``lse_forward``; each (M,), float32 unless said.

    Attributes:
        lse: log-sum-exp of the (capped, tempered) logits.
        target_logit: z_y, 0 where the target is outside [0, V).
        entropy: entropy (nats) of softmax(z); with_stats only.
        max_logit: max_j z_j; with_stats only.
        argmax: int64, first index of the max logit; with_stats only.
        smooth_sum: sum_j u_j z_j with u = class_weight (or 1); smoothing only.
        second_lse: log-sum-exp of the second head's logits r; with a second head only.
        reverse_kl: KL(p || q) = E_p[z - r] - lse + lse2 (p = softmax(z), q = softmax(r)); with a second head.
        forward_kl: KL(q || p) = lse - lse2 - E_q[z - r]; with a second head.
        target_logprob: log p of the target, computed without the cancellation of
            ``target_logit - lse`` (a backend that has the whole row gives it; None: the difference).
        model_mix_kl: KL(p || m), m = beta q + (1 - beta) p the mixture of ``head.mix_weight``; with it only.
        second_mix_kl: KL(q || m); with ``head.mix_weight`` only. (The generalized JSD is
            ``beta second_mix_kl + (1 - beta) model_mix_kl``.)
    """

    lse: Tensor
    target_logit: Tensor
    entropy: Tensor | None = None
    max_logit: Tensor | None = None
    argmax: Tensor | None = None
    smooth_sum: Tensor | None = None
    second_lse: Tensor | None = None
    reverse_kl: Tensor | None = None
    forward_kl: Tensor | None = None
    target_logprob: Tensor | None = None
    model_mix_kl: Tensor | None = None
    second_mix_kl: Tensor | None = None

    @property
    def logprob(self) -> Tensor:
        """(M,) log p of the target: ``target_logprob`` where the backend gives it, else ``target_logit - lse``."""
        return self.target_logprob if self.target_logprob is not None else self.target_logit - self.lse


class GradTerms(NamedTuple):
    """Per-token inputs of the logit gradient G (module docstring); each (M,) float32.

    Attributes:
        lse: the forward's log-sum-exp.
        softmax: a_t, the factor of softmax(z_t).
        target: b_t, the factor of the one-hot label.
        uniform: c_t, the factor of the class weights u (label smoothing), or None for 0.
        second: e_t, the factor of the second head's softmax q, or None for 0.
        gap: f_t, the factor of ``s (log s - log q)``, or None for 0.
        second_lse: the second head's log-sum-exp (read by e, f and g), or None.
        logprob: log p of the target, consistent with ``lse`` (the whole vocabulary's under vocabulary
            parallelism), or None: what a one-pass backend forms the label's entry from, ``a expm1(logprob) +
            (a - b)`` (two-pass backends form ``a s_y - b``).
        mix_gap: g_t, the factor of ``s (log s - log m)`` (m the mixture of ``head.mix_weight``), or None for 0.
        entropy: k_t, the factor of ``s log s`` (``log s = z - lse``; the entropy's gradient term, no second
            head read), or None for 0. Two-pass backends only.
    """

    lse: Tensor
    softmax: Tensor
    target: Tensor
    uniform: Tensor | None = None
    second: Tensor | None = None
    gap: Tensor | None = None
    second_lse: Tensor | None = None
    logprob: Tensor | None = None
    mix_gap: Tensor | None = None
    entropy: Tensor | None = None

    @property
    def reads_second_head(self) -> bool:
        """The backward rebuilds the second head's logits (an e, f or g term is present)."""
        return self.second is not None or self.gap is not None or self.mix_gap is not None

    def scaled(self, upstream: Tensor) -> "GradTerms":
        """The coefficients times a per-token upstream gradient (M,) (lse and second_lse unchanged)."""
        return self._replace(**{name: upstream * t for name, t in self._asdict().items()
                                if t is not None and name not in ("lse", "second_lse", "logprob")})


class Needs(NamedTuple):
    """Which gradients a backward builds (a bias gradient only where the head has a bias)."""

    hidden: bool = True
    weight: bool = True
    bias: bool = False


class Grads(NamedTuple):
    """A backward's result: each gradient in its input's dtype, or None where not needed.

    Attributes:
        hidden: (N, D); rows that are not computed get 0.
        weight: (V, D).
        bias: (V,).
    """

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


@runtime_checkable
class Backend(Protocol):
    """The two passes of the contract (module docstring); implementations keep their own settings.

    ``name`` says what runs (e.g. "torch", "triton-gemm"): benchmarks and errors report it.
    """

    name: str

    def lse_forward(self, hidden: Tensor, head: Head, tokens: Tokens, *, with_stats: bool = False,
                    smoothing: bool = False) -> ForwardStats: ...

    def grad_backward(self, hidden: Tensor, head: Head, tokens: Tokens, terms: GradTerms,
                      needs: Needs) -> Grads: ...


TermsOf = Callable[[ForwardStats, int, int], "GradTerms"]
"""``terms_of(stats, lo, hi)``: the G terms of computed tokens [lo, hi) from their statistics (a one-pass
backend's callback: the objective table applied to one chunk; a unit upstream gradient)."""


@runtime_checkable
class OnePassBackend(Backend, Protocol):
    """A backend that also computes the loss's statistics and its gradients in one pass (6NDV).

    ``loss_and_grads`` walks the computed tokens in chunks: the chunk's logits of
    the whole vocabulary by one product into a workspace, its statistics,
    ``terms_of`` for its G terms, G in place, then d(hidden), d(weight) and
    d(bias) by products. Returns the statistics of all M tokens and the fp32
    gradients for a unit upstream gradient (None where ``needs`` says so).
    ``chunk`` (tokens per chunk) is fixed when the backend is built.
    """

    chunk: int

    def loss_and_grads(self, hidden: Tensor, head: Head, tokens: Tokens, terms_of: TermsOf, needs: Needs, *,
                       with_stats: bool = False, smoothing: bool = False) -> tuple[ForwardStats, Grads]: ...


class RowPasses(Protocol):
    """The two passes over a chunk's (C, V) fp32 logit workspace of a one-pass backend.

    ``logits`` hold the raw logits ``u`` (bias added), any row stride >= V and unit
    column stride; ``second_logits`` the second head's, the same shape.
    """

    def row_stats(self, logits: Tensor, targets: Tensor, head: Head, *, with_stats: bool, smoothing: bool,
                  second_logits: Tensor | None) -> ForwardStats:
        """The chunk's ForwardStats (``target_logprob`` included)."""

    def logit_grad(self, logits: Tensor, targets: Tensor, head: Head, terms: GradTerms, *,
                   second_logits: Tensor | None, out_dtype: torch.dtype) -> Tensor:
        """G of the chunk written over ``logits`` (a (C, V) view of ``out_dtype``; 16-bit G in each row's first
        bytes); the label entry formed from ``terms.logprob`` as ``a expm1(logprob) + (a - b)``."""


def fp32_gradients(hidden: Tensor, head: Head, needs: Needs, *, weight: bool = True) -> Grads:
    """Zeroed fp32 accumulators of a backward's gradients (None where not needed; d(bias) only with a
    bias): d(hidden) (N, D), d(weight) (V, D) when ``weight``, d(bias) (V,)."""
    f32 = dict(dtype=torch.float32, device=hidden.device)
    N, D = hidden.shape
    V = head.weight.shape[0]
    return Grads(torch.zeros(N, D, **f32) if needs.hidden else None,
                 torch.zeros(V, D, **f32) if needs.weight and weight else None,
                 torch.zeros(V, **f32) if needs.bias and head.bias is not None else None)


def assert_inputs(hidden: Tensor, head: Head, tokens: Tokens, terms: GradTerms | None = None) -> int:
    """Shape assertions of a backend call (the inputs were validated at the door); returns M."""
    N, D = hidden.shape
    V = head.weight.shape[0]
    assert head.weight.shape == (V, D), (tuple(head.weight.shape), D)
    assert head.compute_dtype in FLOAT_DTYPES, head.compute_dtype
    M = tokens.targets.shape[0]
    assert tokens.rows is not None or M == N, (M, N)
    assert head.bias is None or head.bias.shape == (V,)
    assert head.class_weight is None or head.class_weight.shape == (V,)
    if tokens.inv_temperature is not None:
        assert tokens.inv_temperature.shape == (M,) and head.temperature is None and head.second is None
    if head.second is not None:
        assert head.second.hidden.shape[0] == N and head.second.weight.shape == (V, head.second.hidden.shape[1])
        assert head.second.compute_dtype in FLOAT_DTYPES
    if terms is not None:
        assert terms.lse.shape == (M,) and terms.softmax.shape == (M,) and terms.target.shape == (M,)
        assert not terms.reads_second_head or (head.second is not None and terms.second_lse is not None)
        assert terms.entropy is None or terms.entropy.shape == (M,)
        assert terms.mix_gap is None or head.mix_weight is not None, "the g term reads the mixture weight"
    assert head.mix_weight is None or (head.second is not None and 0.0 < head.mix_weight < 1.0), head.mix_weight
    return M
