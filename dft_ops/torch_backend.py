"""The same two passes as the Triton kernels, in PyTorch, chunked over tokens and vocabulary.

Runs anywhere PyTorch does (CPU, CUDA). Memory stays bounded by one
(token_chunk x vocab_chunk) fp32 block of logits, never tokens x vocabulary.
Matmuls run in fp32 on upcast chunks, so this backend is also the accurate
oracle the kernels are tested against (next to naive.py's float64 reference).

Same contract as ``dft_ops.kernels.lse_forward`` / ``grad_backward``.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, v_lo: int, v_hi: int, softcap) -> Tensor:
    """(tokens, v_hi - v_lo) fp32 logits of an fp32 hidden chunk, soft-capped if asked."""
    z = h @ weight[v_lo:v_hi].float().T
    if bias is not None:
        z += bias[v_lo:v_hi].float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _chunks(M: int, rows: Tensor | None, size: int):
    for t_lo in range(0, M, size):
        t_hi = min(t_lo + size, M)
        yield t_lo, t_hi, (slice(t_lo, t_hi) if rows is None else rows[t_lo:t_hi])


def lse_forward(hidden, weight, bias, targets, rows=None, *, softcap=None, with_stats=False,
                token_chunk=None, vocab_chunk=None, **_):
    """Per-token (lse, target_logit, entropy, max_logit), each (M,) float32 (see kernels.lse_forward).

    Chunk sizes default to the module's TOKEN_CHUNK / VOCAB_CHUNK (read at call time).
    """
    token_chunk, vocab_chunk = token_chunk or TOKEN_CHUNK, vocab_chunk or VOCAB_CHUNK
    M, V = targets.numel(), weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, zy = torch.empty(M, **f32), torch.empty(M, **f32)
    entropy = torch.empty(M, **f32) if with_stats else None
    max_logit = torch.empty(M, **f32) if with_stats else None
    for t_lo, t_hi, idx in _chunks(M, rows, token_chunk):
        h = hidden[idx].float()
        y = targets[t_lo:t_hi]
        m = torch.full((t_hi - t_lo,), float("-inf"), **f32)
        se = torch.zeros_like(m)
        ent = torch.zeros_like(m)  # sum exp(z - m) * (z - m), rescaled as m grows
        zy_chunk = torch.zeros_like(m)
        for v_lo in range(0, V, vocab_chunk):
            v_hi = min(v_lo + vocab_chunk, V)
            z = _logits(h, weight, bias, v_lo, v_hi, softcap)
            m_new = torch.maximum(m, z.max(dim=1).values)
            alpha = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            if with_stats:
                # (m - m_new) * se is 0 where se is (the first chunk: m = -inf)
                shift = torch.where(se > 0, (m - m_new) * se, torch.zeros_like(se))
                ent = alpha * (ent + shift) + (e * (z - m_new[:, None])).sum(dim=1)
            se = se * alpha + e.sum(dim=1)
            m = m_new
            hit = (y >= v_lo) & (y < v_hi)
            local = (y - v_lo).clamp(0, v_hi - v_lo - 1)
            zy_chunk += torch.where(hit, z.gather(1, local[:, None]).squeeze(1), 0.0)
        zy[t_lo:t_hi] = zy_chunk
        lse[t_lo:t_hi] = m + torch.log(se)
        if with_stats:
            entropy[t_lo:t_hi] = torch.log(se) - ent / se
            max_logit[t_lo:t_hi] = m
    return lse, zy, entropy, max_logit


def grad_backward(hidden, weight, bias, targets, rows, lse, grad_scale, *, softcap=None,
                  need_hidden=True, need_weight=True, need_bias=False, filter_eps=None,
                  token_chunk=None, vocab_chunk=None, **_):
    """(d_hidden, d_weight, d_bias) for logit gradients grad_scale * (softmax - onehot).

    ``filter_eps`` is accepted for interface parity and ignored: this backend is exact.
    """
    token_chunk, vocab_chunk = token_chunk or TOKEN_CHUNK, vocab_chunk or VOCAB_CHUNK
    N, D = hidden.shape
    V = weight.shape[0]
    M = targets.numel()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(N, D, **f32) if need_hidden else None
    d_weight = torch.zeros(V, D, **f32) if need_weight else None
    d_bias = torch.zeros(V, **f32) if need_bias else None
    for t_lo, t_hi, idx in _chunks(M, rows, token_chunk):
        scale = grad_scale[t_lo:t_hi]
        h = hidden[idx].float()
        y = targets[t_lo:t_hi]
        dh = torch.zeros(t_hi - t_lo, D, **f32) if need_hidden else None
        for v_lo in range(0, V, vocab_chunk):
            v_hi = min(v_lo + vocab_chunk, V)
            z = _logits(h, weight, bias, v_lo, v_hi, softcap)
            g = torch.exp(z - lse[t_lo:t_hi, None])
            hit = (y >= v_lo) & (y < v_hi)
            g[hit, (y - v_lo)[hit]] -= 1.0
            g *= scale[:, None]
            if softcap is not None:
                g *= 1.0 - (z / softcap) ** 2
            if need_hidden:
                dh += g @ weight[v_lo:v_hi].float()
            if need_weight:
                d_weight[v_lo:v_hi] += g.T @ h
            if need_bias:
                d_bias[v_lo:v_hi] += g.sum(dim=0)
        if need_hidden:
            d_hidden[idx] = dh  # rows are distinct: a plain scatter
    return _cast(d_hidden, hidden), _cast(d_weight, weight), _cast(d_bias, bias)


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return grad if grad is None else grad.to(like.dtype)
