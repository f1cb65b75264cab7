"""The same two passes as the Triton kernels, in PyTorch, chunked over tokens and vocabulary.

Runs anywhere PyTorch does (CPU, CUDA). Memory stays bounded by one
(token_chunk x vocab_chunk) fp32 block of logits, never tokens x vocabulary.
Products run in fp32 on chunks of the inputs rounded to the compute dtype
(:func:`~dft_ops.backend_contract.product_dtype`), and G is never rounded, so
this backend is also the accurate oracle the kernels are tested against (next
to naive.py's float64 reference).

Same contract as ``dft_ops.kernels.lse_forward`` / ``grad_backward``
(see :mod:`dft_ops.backend_contract`); :class:`TorchBackend` is its
:class:`~dft_ops.backend_contract.Backend`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend_contract import (ForwardStats, GradCoefficients, Grads, ReferenceHead, check_backward_args,
                               check_forward_args, combine_kl, combine_partials, logit_scales, product_dtype)

TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, v_lo: int, v_hi: int, compute: torch.dtype,
            softcap, temperature) -> tuple[Tensor, Tensor | float]:
    """(z, dz/du) of an fp32 hidden chunk against weight rows [v_lo, v_hi): (tokens, v_hi - v_lo) fp32."""
    u = h @ weight[v_lo:v_hi].to(compute).float().T
    if bias is not None:
        u += bias[v_lo:v_hi].float()
    inv_softcap, inv_temperature = logit_scales(softcap, temperature)
    if softcap is None:
        return u * inv_temperature, inv_temperature
    x = u * inv_softcap
    # 1 / cosh^2 has no cancellation where tanh saturates (1 - tanh^2 would); cosh -> inf gives 0
    return (float(softcap) * inv_temperature) * torch.tanh(x), torch.cosh(x).pow(-2) * inv_temperature


class _ReferenceLogits:
    """The reference head's logits r of one (token chunk x vocabulary chunk) block (ReferenceHead)."""

    def __init__(self, reference: ReferenceHead, compute_dtype, temperature):
        self.head, self.temperature = reference, temperature
        self.compute = product_dtype(reference.hidden.dtype, reference.weight.dtype, compute_dtype)

    def rows(self, idx) -> Tensor:
        return self.head.hidden[idx].to(self.compute).float()

    def __call__(self, h_ref: Tensor, v_lo: int, v_hi: int) -> Tensor:
        head = self.head
        return _logits(h_ref, head.weight, head.bias, v_lo, v_hi, self.compute, head.softcap, self.temperature)[0]


def _relative(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(max, x - max, exp(x - max)) per token of a logit chunk (N, V); a -inf max is taken as 0."""
    m = x.max(dim=1).values
    d = x - torch.where(m == float("-inf"), 0.0, m)[:, None]
    return m, d, torch.exp(d)


def _reference_partials(d_z: Tensor, e_z: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk's (max of r, sum exp(r - max_r), and the gap sums under p and q) for :func:`combine_kl`,
    from the model's :func:`_relative` logits and the reference's logits r.

    The gap is ``(z - max_z) - (r - max_r)``, both heads relative to their own maxima; a -inf
    logit (no probability) adds 0 whatever its gap.
    """
    m_r, d_r, e_r = _relative(r)
    gap = d_z - d_r
    return (m_r, e_r.sum(dim=1), (e_z * torch.where(e_z > 0, gap, 0.0)).sum(dim=1),
            (e_r * torch.where(e_r > 0, gap, 0.0)).sum(dim=1))


def _class_weights(class_weight: Tensor | None, v_lo: int, v_hi: int, like: Tensor) -> Tensor:
    if class_weight is None:
        return torch.ones(v_hi - v_lo, dtype=torch.float32, device=like.device)
    return class_weight[v_lo:v_hi].float()


def _chunks(M: int, rows: Tensor | None, size: int):
    for t_lo in range(0, M, size):
        t_hi = min(t_lo + size, M)
        yield t_lo, t_hi, (slice(t_lo, t_hi) if rows is None else rows[t_lo:t_hi])


def _label_columns(y: Tensor, v_lo: int, v_hi: int) -> tuple[Tensor, Tensor]:
    """(hit, local): which labels fall in [v_lo, v_hi), and their column there (clamped when not)."""
    hit = (y >= v_lo) & (y < v_hi)
    return hit, (y - v_lo).clamp(0, v_hi - v_lo - 1)


def lse_forward(hidden, weight, bias, targets, rows=None, *, softcap=None, temperature=None, with_stats=False,
                smoothing=False, class_weight=None, compute_dtype=None, reference=None, token_chunk=None,
                vocab_chunk=None) -> ForwardStats:
    """Per-token :class:`~dft_ops.backend_contract.ForwardStats` (see ``dft_ops.kernels.lse_forward``).

    Each vocabulary chunk yields online-softmax partials (max, sum-exp,
    entropy term, argmax) that one :func:`combine_partials` merges, exactly as
    the Triton forward merges its vocabulary splits; with a ``reference``,
    the reference head's (max, sum-exp) and both heads' gap sums as well
    (:func:`_reference_partials`, :func:`combine_kl`). Chunk sizes
    default to the module's TOKEN_CHUNK / VOCAB_CHUNK (read at call time).
    """
    M = check_forward_args(hidden, weight, bias, targets, rows, softcap=softcap, temperature=temperature,
                           class_weight=class_weight, compute_dtype=compute_dtype, reference=reference)
    token_chunk, vocab_chunk = token_chunk or TOKEN_CHUNK, vocab_chunk or VOCAB_CHUNK
    V = weight.shape[0]
    compute = product_dtype(hidden.dtype, weight.dtype, compute_dtype)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    zy = torch.zeros(M, **f32)
    lse = torch.empty(M, **f32)
    entropy = torch.empty(M, **f32) if with_stats else None
    max_logit = torch.empty(M, **f32) if with_stats else None
    argmax = torch.empty(M, dtype=torch.int64, device=hidden.device) if with_stats else None
    smooth_sum = torch.zeros(M, **f32) if smoothing else None
    ref_logits = _ReferenceLogits(reference, compute_dtype, temperature) if reference is not None else None
    ref_lse, reverse_kl, forward_kl = (torch.empty(M, **f32) if reference is not None else None for _ in range(3))
    for t_lo, t_hi, idx in _chunks(M, rows, token_chunk):
        h = hidden[idx].to(compute).float()
        h_ref = ref_logits.rows(idx) if ref_logits is not None else None
        y = targets[t_lo:t_hi]
        parts, ref_parts = [], []
        for v_lo in range(0, V, vocab_chunk):
            v_hi = min(v_lo + vocab_chunk, V)
            z, _ = _logits(h, weight, bias, v_lo, v_hi, compute, softcap, temperature)
            hit, local = _label_columns(y, v_lo, v_hi)
            zy[t_lo:t_hi] += torch.where(hit, z.gather(1, local[:, None]).squeeze(1), 0.0)
            if smoothing:
                u = _class_weights(class_weight, v_lo, v_hi, z)
                # a zero weight times a -inf logit (masked vocabulary) is 0
                smooth_sum[t_lo:t_hi] += (u * torch.where(u != 0, z, 0.0)).sum(dim=1)
            m, d, e = _relative(z)
            if ref_logits is not None:
                ref_parts.append(_reference_partials(d, e, ref_logits(h_ref, v_lo, v_hi)))
            if with_stats:
                ent = (e * torch.where(e > 0, d, 0.0)).sum(dim=1)
                parts.append((m, e.sum(dim=1), ent, z.argmax(dim=1) + v_lo))
            else:
                parts.append((m, e.sum(dim=1)))
        stacked = [torch.stack(p) for p in zip(*parts)]
        lse_c, max_c, ent_c, arg_c = combine_partials(*stacked)
        lse[t_lo:t_hi] = lse_c
        if with_stats:
            entropy[t_lo:t_hi], max_logit[t_lo:t_hi], argmax[t_lo:t_hi] = ent_c, max_c, arg_c
        if ref_logits is not None:
            m_r, s_r, gap_z, gap_r = (torch.stack(p) for p in zip(*ref_parts))
            ref_lse[t_lo:t_hi] = combine_partials(m_r, s_r)[0]
            reverse_kl[t_lo:t_hi], forward_kl[t_lo:t_hi] = combine_kl(stacked[0], stacked[1], m_r, s_r, gap_z, gap_r)
    return ForwardStats(lse, zy, entropy, max_logit, argmax, smooth_sum, ref_lse, reverse_kl, forward_kl)


def grad_backward(hidden, weight, bias, targets, rows, lse, coef: GradCoefficients, *, softcap=None,
                  temperature=None, class_weight=None, need_hidden=True, need_weight=True, need_bias=False,
                  filter_eps=None, precise=False, compute_dtype=None, reference=None, ref_lse=None,
                  token_chunk=None, vocab_chunk=None) -> Grads:
    """(d_hidden, d_weight, d_bias) for ``G = (a s - b onehot - c u - e q + f s (log s - log q)) dz/du``
    (:mod:`dft_ops.backend_contract`; e and f read the ``reference`` head and its ``ref_lse``).

    ``filter_eps`` and ``precise`` are accepted for interface parity and have
    no effect: this backend keeps G in fp32 and never skips a block.
    """
    M = check_backward_args(hidden, weight, bias, targets, rows, lse, coef, softcap=softcap,
                            temperature=temperature, class_weight=class_weight, compute_dtype=compute_dtype,
                            reference=reference, ref_lse=ref_lse)
    token_chunk, vocab_chunk = token_chunk or TOKEN_CHUNK, vocab_chunk or VOCAB_CHUNK
    N, D = hidden.shape
    V = weight.shape[0]
    need_bias = need_bias and bias is not None
    compute = product_dtype(hidden.dtype, weight.dtype, compute_dtype)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(N, D, **f32) if need_hidden else None
    d_weight = torch.zeros(V, D, **f32) if need_weight else None
    d_bias = torch.zeros(V, **f32) if need_bias else None
    a_all, b_all, c_all, e_all, f_all = (t.float() if t is not None else None for t in coef)
    ref_logits = _ReferenceLogits(reference, compute_dtype, temperature) if coef.reads_reference else None
    for t_lo, t_hi, idx in _chunks(M, rows, token_chunk):
        a, b = a_all[t_lo:t_hi], b_all[t_lo:t_hi]
        h = hidden[idx].to(compute).float()
        h_ref = ref_logits.rows(idx) if ref_logits is not None else None
        y = targets[t_lo:t_hi]
        dh = torch.zeros(t_hi - t_lo, D, **f32) if need_hidden else None
        for v_lo in range(0, V, vocab_chunk):
            v_hi = min(v_lo + vocab_chunk, V)
            z, slope = _logits(h, weight, bias, v_lo, v_hi, compute, softcap, temperature)
            g = a[:, None] * torch.exp(z - lse[t_lo:t_hi, None])
            hit, local = _label_columns(y, v_lo, v_hi)
            g[hit, local[hit]] -= b[hit]
            if c_all is not None:
                g -= c_all[t_lo:t_hi, None] * _class_weights(class_weight, v_lo, v_hi, g)[None, :]
            if ref_logits is not None:
                r = ref_logits(h_ref, v_lo, v_hi)
                if e_all is not None:
                    g -= e_all[t_lo:t_hi, None] * torch.exp(r - ref_lse[t_lo:t_hi, None])
                if f_all is not None:
                    log_p = z - lse[t_lo:t_hi, None]
                    s = torch.exp(log_p)
                    # log p - log q: each head relative to its own lse (no offset between the heads);
                    # a -inf logit has no probability: no gradient, whatever its gap
                    g += f_all[t_lo:t_hi, None] * torch.where(s > 0, s * (log_p - (r - ref_lse[t_lo:t_hi, None])), 0.0)
            g *= slope
            if need_hidden:
                dh += g @ weight[v_lo:v_hi].to(compute).float()
            if need_weight:
                d_weight[v_lo:v_hi] += g.T @ h
            if need_bias:
                d_bias[v_lo:v_hi] += g.sum(dim=0)
        if need_hidden:
            d_hidden[idx] = dh  # rows are distinct: a plain scatter
    return _cast(d_hidden, hidden), _cast(d_weight, weight), _cast(d_bias, bias)


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return grad if grad is None else grad.to(like.dtype)


class TorchBackend:
    """The :class:`~dft_ops.backend_contract.Backend` of this module.

    Args:
        token_chunk / vocab_chunk: the (tokens x vocabulary) block of each step
            (None: TOKEN_CHUNK / VOCAB_CHUNK, read at call time).
    """

    name = "torch"

    def __init__(self, *, token_chunk: int | None = None, vocab_chunk: int | None = None):
        self.token_chunk, self.vocab_chunk = token_chunk, vocab_chunk

    def __repr__(self) -> str:
        return f"TorchBackend(token_chunk={self.token_chunk}, vocab_chunk={self.vocab_chunk})"

    def lse_forward(self, hidden, weight, bias, targets, rows=None, **options) -> ForwardStats:
        """:func:`lse_forward` with this backend's chunks (keywords of the contract only)."""
        return lse_forward(hidden, weight, bias, targets, rows, token_chunk=self.token_chunk,
                           vocab_chunk=self.vocab_chunk, **options)

    def grad_backward(self, hidden, weight, bias, targets, rows, lse, coef, **options) -> Grads:
        """:func:`grad_backward` with this backend's chunks (keywords of the contract only)."""
        return grad_backward(hidden, weight, bias, targets, rows, lse, coef, token_chunk=self.token_chunk,
                             vocab_chunk=self.vocab_chunk, **options)
