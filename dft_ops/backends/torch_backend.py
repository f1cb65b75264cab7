"""The contract's two passes in PyTorch, chunked over tokens and vocabulary (:class:`TorchBackend`).

Runs anywhere PyTorch does (CPU, CUDA). Memory stays bounded by one
(token_chunk x vocab_chunk) fp32 block of logits, never tokens x vocabulary.
Products run in fp32 on chunks of the operands rounded to ``head.compute_dtype``,
and G is never rounded, so this backend is also the accurate oracle the Triton
kernels are tested against (next to the float64 :mod:`dft_ops.naive`).

The math (logits, the second head, G): :mod:`dft_ops.backends.protocol`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .partials import combine_kl, combine_partials, log_over_mixture, mixture_kl_sums
from .protocol import ForwardStats, Grads, GradTerms, Head, Needs, SecondHead, Tokens, assert_inputs, fp32_gradients

TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, v_lo: int, v_hi: int, compute: torch.dtype,
            softcap, inv_temperature: float | Tensor) -> tuple[Tensor, Tensor | float]:
    """(z, dz/du) of an fp32 hidden chunk against weight rows [v_lo, v_hi): (tokens, v_hi - v_lo) fp32.

    ``inv_temperature``: a float, or a (tokens, 1) fp32 column (a temperature per token)."""
    u = h @ weight[v_lo:v_hi].to(compute).float().T
    if bias is not None:
        u += bias[v_lo:v_hi].float()
    if softcap is None:
        return u * inv_temperature, inv_temperature
    x = u * (1.0 / float(softcap))
    # 1 / cosh^2 has no cancellation where tanh saturates (1 - tanh^2 would); cosh -> inf gives 0
    return (float(softcap) * inv_temperature) * torch.tanh(x), torch.cosh(x).pow(-2) * inv_temperature


class _Chunk:
    """One token chunk's operands: the model's hidden rows and the second head's, in their compute dtypes."""

    def __init__(self, hidden: Tensor, head: Head, idx, inv_temperature: float | Tensor):
        self.head, self.inv_temperature = head, inv_temperature
        self.h = hidden[idx].to(head.compute_dtype).float()
        second = head.second
        self.h2 = second.hidden[idx].to(second.compute_dtype).float() if second is not None else None

    def logits(self, v_lo: int, v_hi: int) -> tuple[Tensor, Tensor | float]:
        head = self.head
        return _logits(self.h, head.weight, head.bias, v_lo, v_hi, head.compute_dtype, head.softcap,
                       self.inv_temperature)

    def second_logits(self, v_lo: int, v_hi: int) -> Tensor:
        second: SecondHead = self.head.second
        return _logits(self.h2, second.weight, second.bias, v_lo, v_hi, second.compute_dtype, second.softcap,
                       self.inv_temperature)[0]


def _inv_temperature(head: Head, tokens: Tokens, t_lo: int, t_hi: int) -> float | Tensor:
    """The 1 / temperature of computed tokens [t_lo, t_hi): the head's float, or their (tokens, 1) column."""
    if tokens.inv_temperature is None:
        return head.inv_temperature
    return tokens.inv_temperature[t_lo:t_hi, None].float()


def _relative(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(max, x - max, exp(x - max)) per token of a logit chunk (N, V); a -inf max is taken as 0."""
    m = x.max(dim=1).values
    d = x - torch.where(m == float("-inf"), 0.0, m)[:, None]
    return m, d, torch.exp(d)


def _second_partials(d_z: Tensor, e_z: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk's (max of r, sum exp(r - max_r), and the gap sums under p and q) for :func:`combine_kl`,
    from the model's :func:`_relative` logits and the second head's logits r.

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


def lse_forward(hidden: Tensor, head: Head, tokens: Tokens, *, with_stats=False, smoothing=False,
                token_chunk=None, vocab_chunk=None) -> ForwardStats:
    """Per-token :class:`~dft_ops.backends.protocol.ForwardStats` of the M computed tokens.

    Each vocabulary chunk yields online-softmax partials (max, sum-exp,
    entropy term, argmax) that one :func:`combine_partials` merges, exactly as
    the Triton forward merges its vocabulary splits; with a second head, its
    (max, sum-exp) and both heads' gap sums as well (:func:`combine_kl`). With
    a mixture weight (the generalized JSD), a second sweep over the token
    chunk's vocabulary, once both log-sum-exps are known, sums both heads'
    KLs to the mixture (:func:`mixture_kl_sums`: not an online reduction).
    Chunk sizes default to the module's TOKEN_CHUNK / VOCAB_CHUNK (read at call time).
    """
    M = assert_inputs(hidden, head, tokens)
    token_chunk, vocab_chunk = token_chunk or TOKEN_CHUNK, vocab_chunk or VOCAB_CHUNK
    V = head.weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    zy = torch.zeros(M, **f32)
    lse = torch.empty(M, **f32)
    entropy = torch.empty(M, **f32) if with_stats else None
    max_logit = torch.empty(M, **f32) if with_stats else None
    argmax = torch.empty(M, dtype=torch.int64, device=hidden.device) if with_stats else None
    smooth_sum = torch.zeros(M, **f32) if smoothing else None
    two_heads = head.second is not None
    second_lse, reverse_kl, forward_kl = (torch.empty(M, **f32) if two_heads else None for _ in range(3))
    mixing = head.mix_weight is not None
    model_mix_kl, second_mix_kl = (torch.zeros(M, **f32) if mixing else None for _ in range(2))
    for t_lo, t_hi, idx in _chunks(M, tokens.rows, token_chunk):
        chunk = _Chunk(hidden, head, idx, _inv_temperature(head, tokens, t_lo, t_hi))
        y = tokens.targets[t_lo:t_hi]
        parts, second_parts = [], []
        for v_lo in range(0, V, vocab_chunk):
            v_hi = min(v_lo + vocab_chunk, V)
            z, _ = chunk.logits(v_lo, v_hi)
            hit, local = _label_columns(y, v_lo, v_hi)
            zy[t_lo:t_hi] += torch.where(hit, z.gather(1, local[:, None]).squeeze(1), 0.0)
            if smoothing:
                u = _class_weights(head.class_weight, v_lo, v_hi, z)
                # a zero weight times a -inf logit (masked vocabulary) is 0
                smooth_sum[t_lo:t_hi] += (u * torch.where(u != 0, z, 0.0)).sum(dim=1)
            m, d, e = _relative(z)
            if two_heads:
                second_parts.append(_second_partials(d, e, chunk.second_logits(v_lo, v_hi)))
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
        if two_heads:
            m_r, s_r, gap_z, gap_r = (torch.stack(p) for p in zip(*second_parts))
            second_lse[t_lo:t_hi] = combine_partials(m_r, s_r)[0]
            reverse_kl[t_lo:t_hi], forward_kl[t_lo:t_hi] = combine_kl(stacked[0], stacked[1], m_r, s_r, gap_z, gap_r)
        if mixing:
            # a row of -inf logits has lse -inf: shift by 0, so its exponentials are 0, not NaN
            lse_z, lse_r = (torch.where(t == float("-inf"), 0.0, t)[:, None]
                            for t in (lse[t_lo:t_hi], second_lse[t_lo:t_hi]))
            for v_lo in range(0, V, vocab_chunk):
                v_hi = min(v_lo + vocab_chunk, V)
                sums = mixture_kl_sums(chunk.logits(v_lo, v_hi)[0] - lse_z, chunk.second_logits(v_lo, v_hi) - lse_r,
                                       head.mix_weight)
                model_mix_kl[t_lo:t_hi] += sums[0]
                second_mix_kl[t_lo:t_hi] += sums[1]
    return ForwardStats(lse, zy, entropy, max_logit, argmax, smooth_sum, second_lse, reverse_kl, forward_kl,
                        model_mix_kl=model_mix_kl, second_mix_kl=second_mix_kl)


def grad_backward(hidden: Tensor, head: Head, tokens: Tokens, terms: GradTerms, needs: Needs, *,
                  token_chunk=None, vocab_chunk=None) -> Grads:
    """The contract's gradients (:class:`~dft_ops.backends.protocol.Grads`) of G given by ``terms``.

    G stays fp32 (no rounding, nothing skipped): the accurate path.
    """
    M = assert_inputs(hidden, head, tokens, terms)
    token_chunk, vocab_chunk = token_chunk or TOKEN_CHUNK, vocab_chunk or VOCAB_CHUNK
    D = hidden.shape[1]
    weight, bias = head.weight, head.bias
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden, d_weight, d_bias = fp32_gradients(hidden, head, needs)
    lse, a_all, b_all, c_all, e_all, f_all, lse2 = (t.float() if t is not None else None for t in terms[:7])
    g_all = terms.mix_gap.float() if terms.mix_gap is not None else None
    k_all = None if terms.entropy is None else terms.entropy.float()
    reads_second = terms.reads_second_head
    for t_lo, t_hi, idx in _chunks(M, tokens.rows, token_chunk):
        chunk = _Chunk(hidden, head if reads_second else head._replace(second=None), idx,
                       _inv_temperature(head, tokens, t_lo, t_hi))
        a, b, lse_c = a_all[t_lo:t_hi], b_all[t_lo:t_hi], lse[t_lo:t_hi, None]
        y = tokens.targets[t_lo:t_hi]
        dh = torch.zeros(t_hi - t_lo, D, **f32) if needs.hidden else None
        for v_lo in range(0, V, vocab_chunk):
            v_hi = min(v_lo + vocab_chunk, V)
            z, slope = chunk.logits(v_lo, v_hi)
            g = a[:, None] * torch.exp(z - lse_c)
            hit, local = _label_columns(y, v_lo, v_hi)
            # the one-hot term without boolean indexing (a host sync): -0.0 leaves the other rows' entries as
            # they are, bit for bit
            g.scatter_add_(1, local[:, None], torch.where(hit, -b, -0.0)[:, None])
            if c_all is not None:
                g -= c_all[t_lo:t_hi, None] * _class_weights(head.class_weight, v_lo, v_hi, g)[None, :]
            if reads_second:
                log_q = chunk.second_logits(v_lo, v_hi) - lse2[t_lo:t_hi, None]
                if e_all is not None:
                    g -= e_all[t_lo:t_hi, None] * torch.exp(log_q)
                if f_all is not None or g_all is not None:
                    log_p = z - lse_c
                    s = torch.exp(log_p)
                if f_all is not None:
                    # log p - log q: each head relative to its own lse (no offset between the heads);
                    # a -inf logit has no probability: no gradient, whatever its gap
                    g += f_all[t_lo:t_hi, None] * torch.where(s > 0, s * (log_p - log_q), 0.0)
                if g_all is not None:
                    # log p - log m, m = beta q + (1 - beta) p, from the heads' own log-ratio
                    g += g_all[t_lo:t_hi, None] * torch.where(
                        s > 0, s * log_over_mixture(log_p - log_q, head.mix_weight), 0.0)
            if k_all is not None:
                log_p = z - lse_c
                # the entropy's term; a -inf logit has no probability: 0, not 0 * -inf
                g += k_all[t_lo:t_hi, None] * torch.where(log_p > float("-inf"), torch.exp(log_p) * log_p, 0.0)
            g *= slope
            if needs.hidden:
                dh += g @ weight[v_lo:v_hi].to(head.compute_dtype).float()
            if needs.weight:
                d_weight[v_lo:v_hi] += g.T @ chunk.h
            if d_bias is not None:
                d_bias[v_lo:v_hi] += g.sum(dim=0)
        if needs.hidden:
            d_hidden[idx] = dh  # rows are distinct: a plain scatter
    return Grads(_cast(d_hidden, hidden), _cast(d_weight, weight), _cast(d_bias, bias))


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return grad if grad is None else grad.to(like.dtype)


class TorchBackend:
    """The :class:`~dft_ops.backends.protocol.Backend` of this module.

    Args:
        token_chunk / vocab_chunk: the (tokens x vocabulary) block of each step
            (None: TOKEN_CHUNK / VOCAB_CHUNK, read at call time).
    """

    name = "torch"

    def __init__(self, *, token_chunk: int | None = None, vocab_chunk: int | None = None):
        self.token_chunk, self.vocab_chunk = token_chunk, vocab_chunk

    def __repr__(self) -> str:
        return f"TorchBackend(token_chunk={self.token_chunk}, vocab_chunk={self.vocab_chunk})"

    def lse_forward(self, hidden, head, tokens, *, with_stats=False, smoothing=False) -> ForwardStats:
        return lse_forward(hidden, head, tokens, with_stats=with_stats, smoothing=smoothing,
                           token_chunk=self.token_chunk, vocab_chunk=self.vocab_chunk)

    def grad_backward(self, hidden, head, tokens, terms, needs) -> Grads:
        return grad_backward(hidden, head, tokens, terms, needs, token_chunk=self.token_chunk,
                             vocab_chunk=self.vocab_chunk)
