"""The one-pass head's two row passes over an fp32 workspace of raw logits.

The one-pass head computes, per chunk of C tokens, the raw logits ``u = H_c W^T (+ bias)`` of
the whole vocabulary into an fp32 workspace (C x V, row stride ``ld >= V``) with one BLAS
product, then:

1. :func:`row_stats` reads every row once: log-sum-exp, label logit, the label's log-probability
   (accurate on peaked rows, where ``z_y - lse`` is not) and, on request, entropy, max logit,
   argmax, the label-smoothing sum and a second head's (ASFT's reference) log-sum-exp and both
   KLs (:class:`RowStats`);
2. the objective table turns those O(C) statistics into per-token coefficients (not here);
3. :func:`logit_grad_in_place` overwrites the workspace with the logit gradient
   G (the contract's formula, ``dft_ops.backends.protocol``), fp32 in place or bf16 / fp16 packed into the first half of
   each row, ready for the BLAS products ``G W`` and ``G^T H_c``. The label's entry comes from
   row_stats' log-probability: on peaked rows it dominates d_hidden, and lse's fp32 rounding
   would otherwise cost ~1e-4-1e-3 of it.

Both passes are memory-bound: a row's work is a few flops per 4-byte logit, far below what an
SM can issue per byte it receives. So each program owns whole rows and sweeps their
vocabulary once, left to right, in BLOCK_V-wide tiles: online reductions (running max, sums
rescaled as it grows) keep the statistics in registers, and the workspace is read exactly once
per pass. Owning whole rows is also what makes the narrow in-place write safe (see
:func:`logit_grad_in_place`).

Logits, as in the contract: ``z = softcap * tanh(u / softcap)`` if softcap, then
``z / temperature``; the second head's raw logits ``r`` get their own soft-cap and the same
temperature. A -inf raw logit (e.g. a -inf bias) is a masked class without a soft-cap (it has
no probability and adds nothing to any sum); with a soft-cap it becomes ``-softcap``, a finite
logit, exactly as the contract's ``tanh(-inf) = -1`` gives.

Offsets: a row starts at ``row * ld`` in int64 (C * ld passes 2^31 elements at 128k tokens x
152k vocabulary); columns stay int32 (V < 2^31).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# absolute: see fused_backward.py
from dft_ops.backends.protocol import ForwardStats, GradTerms, Head
from .launch import Config, Launch, Tuner, bucket, torch_to_tl
from .tile import (INTERPRET, cap_and_temper, cap_and_temper_slope, class_weights, log_over_mixture, logs_over_mixture,
                   round_to)

# expm1(x) = x + x^2/2! + ... + x^8/8! for |x| < _EXPM1_SMALL: the first term left out, x^9/9!,
# is under 2^-30 of |x| there. Above, exp(x) - 1 loses at most ~2 bits (|expm1| >= 0.22).
_EXPM1_SMALL = tl.constexpr(0.25)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def expm1(x):
    """exp(x) - 1 to a few ulp at every x, without the cancellation of ``exp(x) - 1`` near 0.

    Plain arithmetic (no libdevice), so the interpreter runs it too. -inf gives -1.
    """
    p = 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    small = x + (x * x) * p
    return tl.where(tl.abs(x) < _EXPM1_SMALL, small, tl.exp(x) - 1.0)


@triton.jit
def log1p(x):
    """log(1 + x) to a few ulp for x >= 0 (and rounding's tiny negatives), without log(1 + x)'s loss
    near 0: 2 atanh(t), t = x / (2 + x), as t + t^3/3 + ... + t^9/9 for x < 0.25 (t < 1/9: the
    next term is below 1e-9 of the sum). Plain arithmetic, as expm1."""
    t = x / (2.0 + x)
    t2 = t * t
    small = 2.0 * t + (2.0 * t) * (t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0)))))
    return tl.where(x < 0.25, small, tl.log(1.0 + x))


@triton.jit
def _exp(x):
    """exp(x) for the per-logit exponentials, flushing results below 2^-126 to 0.

    tl.exp's ex2.approx.f32 carries a guard for subnormal results (a compare, a select and
    two multiplies per element: half the instructions of a plain pass); the ftz form has none.
    A flushed term is below 1e-38 of the row's largest (1): nothing a sum, an entropy or a
    gradient entry keeps. -inf gives 0.
    """
    if INTERPRET:
        return tl.exp(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * _LOG2E],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _finite(x):
    """x, with -inf taken as 0: a running maximum that is still -inf shifts by nothing."""
    return tl.where(x == float("-inf"), 0.0, x)


@triton.jit
def _any(hit):
    """Whether any row of the program's (BLOCK_N,) boolean is set: a scalar a branch can take."""
    return tl.max(hit.to(tl.int32), axis=0) > 0


@triton.jit
def _stats_tile(
    u, r, cw_ptr, v0, V, y,
    m, sumexp, other, ent, arg, smooth, zy, m_r, sumexp_r, gap, gap_r,
    softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap,
    HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, HAS_SECOND: tl.constexpr, SECOND_HAS_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Fold the raw logits u (and r) of columns [v0, v0 + BLOCK_V) into the running statistics.

    MASKED only for the ragged last tile: full tiles carry no column mask, so no per-element
    select is spent on them.
    """
    local = tl.arange(0, BLOCK_V)
    z = cap_and_temper(u, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP)
    if SMOOTHING:
        # loaded as a (1, BLOCK_V) row, so it takes the logits' layout (a 1-D load would be laid
        # out apart and moved through shared memory every tile)
        cols = v0 + local[None, :]
        cw = class_weights(cw_ptr, cols, cols < V, HAS_CLASS_WEIGHT)
        # a zero weight times a -inf logit (a masked class) is 0
        smooth += tl.sum(cw * tl.where(cw != 0.0, z, 0.0), axis=1)
    if MASKED:
        # after the soft-cap, which would make a filler finite
        z = tl.where((v0 + local < V)[None, :], z, float("-inf"))
    tile_max = tl.max(z, axis=1)
    m_new = tl.maximum(m, tile_max)
    shift = _finite(m_new)
    alpha = tl.exp(m - shift)
    d = z - shift[:, None]
    e = _exp(d)
    tile_sum = tl.sum(e, axis=1)
    tile_other = tile_sum
    y_local = y - v0
    # Only the tile holding a label (one in V / BLOCK_V) gathers its logit, from the very values
    # the max is taken over ("the label is the argmax", target_logit >= max_logit, stays exact),
    # and sums the mass of the other columns apart: 1 - p without the cancellation of 1 - e_y / S.
    if _any((y_local >= 0) & (y_local < BLOCK_V)):
        is_y = local[None, :] == y_local[:, None]
        zy += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        tile_other = tl.sum(tl.where(is_y, 0.0, e), axis=1)
    if WITH_STATS:
        # sum e d; e == 0 where d is -inf (a -inf logit, the masked tail): the clamp makes that
        # 0 * finite, and changes no d where e > 0
        ent = alpha * (ent + tl.where(sumexp > 0.0, m - shift, 0.0) * sumexp) \
            + tl.sum(e * tl.maximum(d, -3.4e38), axis=1)
        # first column of the tile's max, only in tiles that raise a running max (a few per row;
        # strictly: an earlier tile keeps a tie)
        raised = tile_max > m
        if _any(raised):
            first = tl.min(tl.where(z == tile_max[:, None], local[None, :], BLOCK_V), axis=1)
            arg = tl.where(raised, v0 + first, arg)
    if HAS_SECOND:
        zr = cap_and_temper(r, r_softcap, r_inv_softcap, inv_temperature, SECOND_HAS_SOFTCAP)
        if MASKED:
            zr = tl.where((v0 + local < V)[None, :], zr, float("-inf"))
        m_r_new = tl.maximum(m_r, tl.max(zr, axis=1))
        shift_r = _finite(m_r_new)
        alpha_r = tl.exp(m_r - shift_r)
        d_r = zr - shift_r[:, None]
        e_r = _exp(d_r)
        # each head relative to its own running max: a constant offset between the heads never
        # enters. A column without probability under the weighting head adds 0 whatever its gap
        # (+-inf where the other head has a -inf logit, NaN where both have).
        g = d - d_r
        moved = (_finite(m) - shift) - (_finite(m_r) - shift_r)
        gap = alpha * (gap + moved * sumexp) + tl.sum(e * tl.where(e > 0.0, g, 0.0), axis=1)
        gap_r = alpha_r * (gap_r + moved * sumexp_r) + tl.sum(e_r * tl.where(e_r > 0.0, g, 0.0), axis=1)
        sumexp_r = sumexp_r * alpha_r + tl.sum(e_r, axis=1)
        m_r = m_r_new
    sumexp = sumexp * alpha + tile_sum
    other = other * alpha + tile_other
    return m_new, sumexp, other, ent, arg, smooth, zy, m_r, sumexp_r, gap, gap_r


@triton.jit
def _mix_tile(
    u, r, v0, V, lse, r_lse, to_model, to_second,
    softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap, mix_weight,
    HAS_SOFTCAP: tl.constexpr, SECOND_HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Add columns [v0, v0 + BLOCK_V)'s terms of KL(s || m) and KL(q || m), m = mix_weight q +
    (1 - mix_weight) s, to the running sums (both lse known: absolute sums, nothing to rescale)."""
    log_s = cap_and_temper(u, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP) - lse[:, None]
    log_q = cap_and_temper(r, r_softcap, r_inv_softcap, inv_temperature, SECOND_HAS_SOFTCAP) - r_lse[:, None]
    if MASKED:
        inside = (v0 + tl.arange(0, BLOCK_V) < V)[None, :]
        log_s = tl.where(inside, log_s, float("-inf"))
        log_q = tl.where(inside, log_q, float("-inf"))
    s = _exp(log_s)
    q = _exp(log_q)
    over_s, over_q = logs_over_mixture(log_s - log_q, mix_weight)
    # a column without probability under the weighting head adds 0, whatever its ratio (+-inf, NaN)
    to_model += tl.sum(tl.where(s > 0.0, s * over_s, 0.0), axis=1)
    to_second += tl.sum(tl.where(q > 0.0, q * over_q, 0.0), axis=1)
    return to_model, to_second


@triton.jit
def _row_stats_kernel(
    u_ptr, r_ptr, targets_ptr, cw_ptr,
    lse_ptr, zy_ptr, logp_ptr, ent_ptr, max_ptr, arg_ptr, smooth_ptr, r_lse_ptr, rkl_ptr, fkl_ptr,
    mkl_ptr, mkl_r_ptr,
    C, V, ld, ld_r, softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap,
    mix_weight,
    HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, HAS_SECOND: tl.constexpr, SECOND_HAS_SOFTCAP: tl.constexpr,
    MIX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = out < C
    # rows past C re-read row C - 1 (their results are never stored): no row mask on any load
    rows = tl.minimum(out, C - 1).to(tl.int64)
    u_rows = (rows * ld)[:, None]
    r_rows = (rows * ld_r)[:, None]
    # the launcher clamped targets to [-1, V] (int32 compares); -1 for every label outside [0, V),
    # which then matches no column, not even a masked one of the tail
    y = tl.load(targets_ptr + rows).to(tl.int32)
    y = tl.where(y < V, y, -1)

    # -inf start: logits may all lie below any finite sentinel (_finite keeps exp() free of
    # -inf - -inf)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sumexp, ent, smooth, zy = zero, zero, zero, zero  # ent = sum exp(z - m) (z - m)
    other = zero  # sum of exp(z - m) over the columns other than the label
    arg = tl.zeros((BLOCK_N,), dtype=tl.int32)
    m_r, sumexp_r, gap, gap_r = m, zero, zero, zero  # gap sums: lse_forward's, combine_kl's

    local = tl.arange(0, BLOCK_V)[None, :]
    v_full = (V // BLOCK_V) * BLOCK_V
    # Each tile's loads are issued one tile ahead (registers as a second buffer): a program keeps
    # a tile in flight while it reduces the previous one, so latency is hidden by more than the
    # other resident programs (Triton's pipeliner leaves loads without a dot in place).
    u_next = tl.load(u_ptr + u_rows + local, mask=local < v_full)
    r_next = u_next
    if HAS_SECOND:
        r_next = tl.load(r_ptr + r_rows + local, mask=local < v_full)
    for v0 in range(0, v_full, BLOCK_V):
        u = u_next
        r = r_next
        # the last full tile fetches itself again (a cache hit, unused) rather than a masked tail
        ahead = tl.multiple_of(tl.minimum(v0 + BLOCK_V, v_full - BLOCK_V), BLOCK_V)
        u_next = tl.load(u_ptr + u_rows + ahead + local)
        if HAS_SECOND:
            r_next = tl.load(r_ptr + r_rows + ahead + local)
        m, sumexp, other, ent, arg, smooth, zy, m_r, sumexp_r, gap, gap_r = _stats_tile(
            u, r, cw_ptr, v0, V, y,
            m, sumexp, other, ent, arg, smooth, zy, m_r, sumexp_r, gap, gap_r,
            softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap,
            HAS_SOFTCAP, WITH_STATS, SMOOTHING, HAS_CLASS_WEIGHT, HAS_SECOND, SECOND_HAS_SOFTCAP,
            False, BLOCK_V,
        )
    # the ragged tail, always run: when BLOCK_V divides V it is wholly masked and changes nothing
    # (its max is -inf, its exponentials 0), which costs less than a second compiled variant
    tail = v_full + local < V
    u = tl.load(u_ptr + u_rows + v_full + local, mask=tail, other=0.0)
    r = u
    if HAS_SECOND:
        r = tl.load(r_ptr + r_rows + v_full + local, mask=tail, other=0.0)
    m, sumexp, other, ent, arg, smooth, zy, m_r, sumexp_r, gap, gap_r = _stats_tile(
        u, r, cw_ptr, v_full, V, y,
        m, sumexp, other, ent, arg, smooth, zy, m_r, sumexp_r, gap, gap_r,
        softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap,
        HAS_SOFTCAP, WITH_STATS, SMOOTHING, HAS_CLASS_WEIGHT, HAS_SECOND, SECOND_HAS_SOFTCAP,
        True, BLOCK_V,
    )

    has_mass = sumexp > 0.0
    log_sumexp = tl.log(sumexp)  # -inf on a row of -inf logits: lse = -inf + -inf = -inf
    tl.store(lse_ptr + out, m + log_sumexp, mask=row_mask)
    tl.store(zy_ptr + out, zy, mask=row_mask)
    # log p = (z_y - m) - log S, S = e_y + other = 1 + x: x = expm1(z_y - m) + other >= 0 (the
    # max's own term is 1) and log1p(x), never z_y - lse, whose fp32 rounding (half an ulp of
    # |lse|, 1e-6 at |lse| ~ 16) is ~1e-3 of 1 - p on a row with p ~ 0.999
    d_y = zy - _finite(m)
    logp = d_y - log1p(expm1(d_y) + other)
    logp = tl.where(y >= 0, tl.where(zy == float("-inf"), float("-inf"), logp), 0.0)
    tl.store(logp_ptr + out, logp, mask=row_mask)
    if WITH_STATS:
        # log S - E / S: both terms O(1) whatever the logits' size; a row without mass has
        # entropy 0 (no NaN from 0 / 0)
        tl.store(ent_ptr + out, tl.where(has_mass, log_sumexp - ent / tl.where(has_mass, sumexp, 1.0), 0.0),
                 mask=row_mask)
        tl.store(max_ptr + out, m, mask=row_mask)
        tl.store(arg_ptr + out, arg.to(tl.int64), mask=row_mask)
    if SMOOTHING:
        tl.store(smooth_ptr + out, smooth, mask=row_mask)
    if HAS_SECOND:
        r_mass = sumexp_r > 0.0
        tl.store(r_lse_ptr + out, m_r + tl.log(sumexp_r), mask=row_mask)
        # KL(p || q) = E_p[(z - m) - (r - m_r)] - log(P / Q) and KL(q || p) = log(P / Q) - E_q[...]
        # (combine_kl). An empty distribution's expectation is an empty sum: KL(p || q) is 0
        # without p, +inf where p has mass and q none (and the other way round)
        both = has_mass & r_mass
        log_ratio = log_sumexp - tl.log(tl.where(both, sumexp_r, 1.0))
        rkl = gap / tl.where(both, sumexp, 1.0) - log_ratio
        fkl = log_ratio - gap_r / tl.where(both, sumexp_r, 1.0)
        tl.store(rkl_ptr + out, tl.where(both, rkl, tl.where(has_mass, float("inf"), 0.0)), mask=row_mask)
        tl.store(fkl_ptr + out, tl.where(both, fkl, tl.where(r_mass, float("inf"), 0.0)), mask=row_mask)
    if MIX:
        # The generalized JSD's KLs to the mixture need both heads' lse, known only now: a second read
        # of the program's rows (prefetched as in the first). A row of -inf logits: shifted by 0.
        lse_z = _finite(m + log_sumexp)
        lse_r = _finite(m_r + tl.log(sumexp_r))
        to_model, to_second = zero, zero
        u_next = tl.load(u_ptr + u_rows + local, mask=local < v_full)
        r_next = tl.load(r_ptr + r_rows + local, mask=local < v_full)
        for v0 in range(0, v_full, BLOCK_V):
            u = u_next
            r = r_next
            ahead = tl.multiple_of(tl.minimum(v0 + BLOCK_V, v_full - BLOCK_V), BLOCK_V)
            u_next = tl.load(u_ptr + u_rows + ahead + local)
            r_next = tl.load(r_ptr + r_rows + ahead + local)
            to_model, to_second = _mix_tile(
                u, r, v0, V, lse_z, lse_r, to_model, to_second,
                softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap, mix_weight,
                HAS_SOFTCAP, SECOND_HAS_SOFTCAP, False, BLOCK_V,
            )
        u = tl.load(u_ptr + u_rows + v_full + local, mask=tail, other=0.0)
        r = tl.load(r_ptr + r_rows + v_full + local, mask=tail, other=0.0)
        to_model, to_second = _mix_tile(
            u, r, v_full, V, lse_z, lse_r, to_model, to_second,
            softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap, mix_weight,
            HAS_SOFTCAP, SECOND_HAS_SOFTCAP, True, BLOCK_V,
        )
        tl.store(mkl_ptr + out, to_model, mask=row_mask)
        tl.store(mkl_r_ptr + out, to_second, mask=row_mask)


@triton.jit
def _grad_values(base, z, s, log_s, log_q, cw, c, e, f, softcap, inv_softcap, inv_temperature,
                 HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr, HAS_Q: tl.constexpr, HAS_GAP: tl.constexpr,
                 mg, mix_weight, HAS_MIX: tl.constexpr):
    """G from its parts: ``(base - c u_j - e q + f s (log s - log q) + mg s (log s - log m)) dz/du``,
    base = a s (or the label's entry), m = mix_weight q + (1 - mix_weight) s. Tiles (BLOCK_N, BLOCK_V)
    and the labels' (BLOCK_N,) entries alike; c, e, f, mg broadcast against them. Without a soft-cap
    dz/du is the constant 1 / temperature, already folded into the coefficients (one multiply per
    entry fewer)."""
    g = base
    if HAS_UNIFORM:
        g -= c * cw
    if HAS_Q:
        g -= e * _exp(log_q)
    if HAS_GAP:
        # log s - log q, each head relative to its own lse; a logit without probability gets no
        # gradient whatever its gap (0 * inf)
        g += f * tl.where(s > 0.0, s * (log_s - log_q), 0.0)
    if HAS_MIX:
        # log s - log m from the same two log-ratios
        g += mg * tl.where(s > 0.0, s * log_over_mixture(log_s - log_q, mix_weight), 0.0)
    if HAS_SOFTCAP:
        g = g * cap_and_temper_slope(z, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP)
    return g


@triton.jit
def _grad_tile(
    u, r, g_ptr, cw_ptr, g_rows, row_mask, v0, V,
    lse, a, c, r_lse, e, f,
    mg, mix_weight,
    softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_GAP: tl.constexpr, SECOND_HAS_SOFTCAP: tl.constexpr,
    HAS_MIX: tl.constexpr,
    OUT_DTYPE: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Store G of the raw logits u (and r) of columns [v0, v0 + BLOCK_V) over those logits.

    The label's entry is left as a s - b would not be: the kernel overwrites it after the sweep.
    """
    cols = v0 + tl.arange(0, BLOCK_V)[None, :]
    z = cap_and_temper(u, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP)
    # exp(-inf - lse) = 0: a masked (-inf) logit has no probability, hence no softmax gradient
    log_s = z - lse[:, None]
    s = _exp(log_s)
    log_q = z
    if HAS_Q or HAS_GAP or HAS_MIX:
        log_q = cap_and_temper(r, r_softcap, r_inv_softcap, inv_temperature, SECOND_HAS_SOFTCAP) - r_lse[:, None]
    cw = 0.0
    if HAS_UNIFORM:
        # a (1, BLOCK_V) row: the logits' layout (a 1-D load would go through shared memory)
        cw = class_weights(cw_ptr, cols, cols < V, HAS_CLASS_WEIGHT)
    g = _grad_values(a[:, None] * s, z, s, log_s, log_q, cw, c[:, None], e[:, None], f[:, None],
                     softcap, inv_softcap, inv_temperature, HAS_SOFTCAP, HAS_UNIFORM, HAS_Q, HAS_GAP,
                     mg[:, None], mix_weight, HAS_MIX)
    # Every thread's loads of this tile (and of all before it) are consumed above; the store
    # lands on bytes other threads loaded (the narrow store always, fp32 wherever the compiler
    # lays the store out unlike the load): none passes here before all have read.
    tl.debug_barrier()
    if MASKED:
        mask = row_mask[:, None] & (cols < V)
    else:
        mask = row_mask[:, None]
    tl.store(g_ptr + g_rows + cols, round_to(g, OUT_DTYPE), mask=mask)


@triton.jit
def _logit_grad_kernel(
    u_ptr, r_ptr, g_ptr, targets_ptr, lse_ptr, logp_ptr, a_ptr, b_ptr, c_ptr, cw_ptr, r_lse_ptr, e_ptr, f_ptr,
    mg_ptr,
    C, V, ld, ld_r, ld_g, softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap,
    mix_weight,
    HAS_SOFTCAP: tl.constexpr, HAS_LOGP: tl.constexpr, HAS_UNIFORM: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_GAP: tl.constexpr, SECOND_HAS_SOFTCAP: tl.constexpr,
    HAS_MIX: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = out < C
    # Rows past C re-read row C - 1 and store nothing: no row mask (and no filler) on any load.
    # They read it exactly as row C - 1's own lanes do, tile for tile, so the in-place argument
    # below covers them.
    rows = tl.minimum(out, C - 1).to(tl.int64)
    u_rows = rows * ld
    r_rows = rows * ld_r
    g_rows = (rows * ld_g)[:, None]
    y = tl.load(targets_ptr + rows).to(tl.int32)  # clamped to [-1, V]
    y = tl.where(y < V, y, -1)  # outside [0, V): -1, no label
    # a row of -inf logits has lse -inf: shift by 0 instead, so its exponentials are 0, not NaN
    lse = _finite(tl.load(lse_ptr + rows))
    a = tl.load(a_ptr + rows)
    b = tl.load(b_ptr + rows)
    zero = tl.zeros_like(a)
    c, r_lse, e, f = zero, zero, zero, zero
    mg = zero
    if HAS_UNIFORM:
        c = tl.load(c_ptr + rows)
    if HAS_Q or HAS_GAP or HAS_MIX:
        r_lse = _finite(tl.load(r_lse_ptr + rows))
    if HAS_Q:
        e = tl.load(e_ptr + rows)
    if HAS_GAP:
        f = tl.load(f_ptr + rows)
    if HAS_MIX:
        mg = tl.load(mg_ptr + rows)
    if not HAS_SOFTCAP:
        # dz/du = 1 / temperature for every entry: into the coefficients, once per row
        a, b, c, e, f = a * inv_temperature, b * inv_temperature, c * inv_temperature, e * inv_temperature, \
            f * inv_temperature
        mg = mg * inv_temperature

    # The label's entry a s_y - b, as a expm1(log p) + (a - b): on a peaked row fp32 s_y - 1 keeps
    # only the bits of 1 - p above s_y's rounding, expm1 keeps them all, and a - b is exact where
    # a == b (CE, DFT). log p from row_stats (target_logprob) is accurate; z_y - lse carries lse's
    # rounding, half an ulp of |lse|: ~1e-6 at |lse| ~ 16, ~1e-3 of 1 - p at p ~ 0.999 (which no
    # form of the entry recovers). Computed before the sweep overwrites the label's raw logit,
    # stored after it: the sweep spends no per-entry compare on the label.
    has_label = y >= 0
    y_col = tl.where(has_label, y, 0)
    z_y = cap_and_temper(tl.load(u_ptr + u_rows + y_col), softcap, inv_softcap, inv_temperature, HAS_SOFTCAP)
    if HAS_LOGP:
        log_s_y = tl.load(logp_ptr + rows)
    else:
        log_s_y = z_y - lse
    log_q_y = z_y
    if HAS_Q or HAS_GAP or HAS_MIX:
        log_q_y = cap_and_temper(tl.load(r_ptr + r_rows + y_col), r_softcap, r_inv_softcap, inv_temperature,
                                 SECOND_HAS_SOFTCAP) - r_lse
    cw_y = 0.0
    if HAS_UNIFORM:
        cw_y = class_weights(cw_ptr, y_col, has_label, HAS_CLASS_WEIGHT)
    g_y = _grad_values(a * expm1(log_s_y) + (a - b), z_y, _exp(log_s_y), log_s_y, log_q_y, cw_y, c, e, f,
                       softcap, inv_softcap, inv_temperature, HAS_SOFTCAP, HAS_UNIFORM, HAS_Q, HAS_GAP,
                       mg, mix_weight, HAS_MIX)
    # u_y lies in the row the sweep overwrites: every thread has read it before any stores
    tl.debug_barrier()

    local = tl.arange(0, BLOCK_V)[None, :]
    v_full = (V // BLOCK_V) * BLOCK_V
    # loads one tile ahead, as in _row_stats_kernel. In place this is safe too: tile k's store
    # covers fp32 entries below (k + 1) BLOCK_V, a prefetched tile lies at or above that
    u_next = tl.load(u_ptr + u_rows[:, None] + local, mask=local < v_full)
    r_next = u_next
    if HAS_Q or HAS_GAP or HAS_MIX:
        r_next = tl.load(r_ptr + r_rows[:, None] + local, mask=local < v_full)
    for v0 in range(0, v_full, BLOCK_V):
        u = u_next
        r = r_next
        ahead = tl.multiple_of(tl.minimum(v0 + BLOCK_V, v_full - BLOCK_V), BLOCK_V)
        u_next = tl.load(u_ptr + u_rows[:, None] + ahead + local)
        if HAS_Q or HAS_GAP or HAS_MIX:
            r_next = tl.load(r_ptr + r_rows[:, None] + ahead + local)
        _grad_tile(
            u, r, g_ptr, cw_ptr, g_rows, row_mask, v0, V, lse, a, c, r_lse, e, f,
            mg, mix_weight,
            softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap,
            HAS_SOFTCAP, HAS_UNIFORM, HAS_CLASS_WEIGHT, HAS_Q, HAS_GAP, SECOND_HAS_SOFTCAP,
            HAS_MIX,
            OUT_DTYPE, False, BLOCK_V,
        )
    tail = v_full + local < V
    u = tl.load(u_ptr + u_rows[:, None] + v_full + local, mask=tail, other=0.0)
    r = u
    if HAS_Q or HAS_GAP or HAS_MIX:
        r = tl.load(r_ptr + r_rows[:, None] + v_full + local, mask=tail, other=0.0)
    _grad_tile(
        u, r, g_ptr, cw_ptr, g_rows, row_mask, v_full, V, lse, a, c, r_lse, e, f,
        mg, mix_weight,
        softcap, inv_softcap, inv_temperature, r_softcap, r_inv_softcap,
        HAS_SOFTCAP, HAS_UNIFORM, HAS_CLASS_WEIGHT, HAS_Q, HAS_GAP, SECOND_HAS_SOFTCAP,
        HAS_MIX,
        OUT_DTYPE, True, BLOCK_V,
    )
    # the label's entry over the sweep's, by whichever thread: after every thread's store
    tl.debug_barrier()
    tl.store(g_ptr + rows * ld_g + y_col, round_to(g_y, OUT_DTYPE), mask=row_mask & has_label)


# Tile configurations (each compiles for sm_80 and sm_90 without spills, every feature on and off,
# under Triton 3.6 and 3.9: tests/test_compile_row_pass.py). Both passes are memory-bound, so the
# tiles are sized for bytes in flight, not arithmetic:
# - one row per program, 4 warps: a row's reductions cross only 4 warps (two barriers each), and
#   C >= 1024 rows (the smallest chunk the one-pass head runs) fill every SM several times over;
# - 2048 fp32 columns = 8 KB per tile, 16 per thread (four 16-byte loads), the next tile loaded
#   ahead: ~16 KB in flight per program. At the 85-138 registers row_stats takes (47-96 for G),
#   3-5 programs (5-10 for G) fit an SM: 48-160 KB in flight per SM, where Little's law asks
#   ~25 KB (4.3 TB/s x ~0.8 us of loaded latency / 132 SMs). The margin keeps the bandwidth
#   saturated through the last, partial wave of rows too;
# - per column, a plain row_stats runs ~12 instructions and a plain G ~7 (SASS of the loop, sm_90;
#   15 with statistics), against the ~28 an H200 can issue per 4-byte logit at 4.3 TB/s; a
#   soft-cap (tile.py's tanh) costs ~36: issue-bound there, ~75% of the bandwidth;
# - two heads (a second workspace read beside the first) take 1024 columns: the same bytes per
#   tile, registers for both heads' tiles and their prefetch.
# One configuration per family: nothing to tune, and the in-place pass could not be timed anyway
# (a trial overwrites its input).
STATS_CONFIGS = {
    "one": [Config({"BLOCK_N": 1, "BLOCK_V": 2048}, num_warps=4, num_stages=1)],
    "two": [Config({"BLOCK_N": 1, "BLOCK_V": 1024}, num_warps=4, num_stages=1)],
}
GRAD_CONFIGS = {
    "one": [Config({"BLOCK_N": 1, "BLOCK_V": 2048}, num_warps=4, num_stages=1)],
    "two": [Config({"BLOCK_N": 1, "BLOCK_V": 1024}, num_warps=4, num_stages=1)],
}
# The interpreter: several rows per program (rows past C clamped) and many tiles per row at test sizes.
INTERPRET_CONFIG = Config({"BLOCK_N": 8, "BLOCK_V": 256}, num_warps=1, num_stages=1)
STATS_TUNER = Tuner(STATS_CONFIGS, INTERPRET_CONFIG)
GRAD_TUNER = Tuner(GRAD_CONFIGS, INTERPRET_CONFIG)


class RowStats(NamedTuple):
    """Per-row results of :func:`row_stats`; each (C,) float32 unless said.

    Attributes:
        lse: log-sum-exp of the logits z; -inf on a row whose logits are all -inf.
        target_logit: z_y, 0 where the target is outside [0, V).
        target_logprob: log p_y, accurate to its own rounding (also on peaked rows, where
            ``target_logit - lse`` carries lse's: see :func:`logit_grad_in_place`); -inf where
            z_y is -inf, 0 where the target is outside [0, V).
        entropy: entropy (nats) of softmax(z), 0 on a row of -inf logits; with_stats only.
        max_logit: max_j z_j; with_stats only.
        argmax: int64, first index of the max logit; with_stats only.
        smooth_sum: sum_j u_j z_j, u = class_weight (or 1), a zero weight's -inf logit adding 0;
            smoothing only.
        second_lse: log-sum-exp of the second head's logits; with second_logits only.
        reverse_kl: KL(p || q), p = softmax(z), q = softmax of the second head; with
            second_logits only.
        forward_kl: KL(q || p); with second_logits only.
        model_mix_kl: KL(p || m), m = mix_weight q + (1 - mix_weight) p; with mix_weight only.
        second_mix_kl: KL(q || m); with mix_weight only.
    """

    lse: torch.Tensor
    target_logit: torch.Tensor
    target_logprob: torch.Tensor
    entropy: torch.Tensor | None = None
    max_logit: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    smooth_sum: torch.Tensor | None = None
    second_lse: torch.Tensor | None = None
    reverse_kl: torch.Tensor | None = None
    forward_kl: torch.Tensor | None = None
    model_mix_kl: torch.Tensor | None = None
    second_mix_kl: torch.Tensor | None = None


def _check_workspace(name: str, logits, like: torch.Tensor | None = None) -> None:
    """A (C, V) fp32 workspace with unit column stride (asserted: the one-pass head builds it); ``like``: the
    first head's, whose shape and device a second head's must have."""
    assert isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.dtype == torch.float32, name
    assert logits.shape[1] <= 1 or logits.stride(1) == 1, (name, logits.stride())
    assert logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1], (name, logits.stride())
    assert like is None or (logits.shape == like.shape and logits.device == like.device), name


def _vector(name: str, t, C: int, device) -> torch.Tensor:
    """An fp32, unit-stride (C,) copy-if-needed of a per-row input."""
    assert isinstance(t, torch.Tensor) and tuple(t.shape) == (C,) and t.device == device, name
    return t.to(torch.float32).contiguous()


def _scales(softcap, temperature) -> tuple[float, float, float]:
    """(softcap, 1 / softcap, 1 / temperature) kernel arguments; 1.0 for an option that is off."""
    assert (softcap is None or softcap > 0) and (temperature is None or temperature > 0)
    return (float(softcap) if softcap is not None else 1.0,
            1.0 / float(softcap) if softcap is not None else 1.0,
            1.0 / float(temperature) if temperature is not None else 1.0)


def _targets(targets, C: int, V: int, device) -> torch.Tensor:
    """Unit stride, clamped to [-1, V]: a label outside [0, V) stays outside after the kernels' int32 cast."""
    assert tuple(targets.shape) == (C,) and not targets.dtype.is_floating_point and targets.device == device
    return targets.clamp(-1, V).contiguous()


def row_stats_launch(logits, targets, *, softcap=None, temperature=None, with_stats=False, smoothing=False,
                     class_weight=None, second_logits=None, second_softcap=None, mix_weight=None):
    """The launch of :func:`row_stats` and its output buffers (shapes asserted; C > 0)."""
    _check_workspace("logits", logits)
    C, V = logits.shape
    dev = logits.device
    targets = _targets(targets, C, V, dev)
    if second_logits is not None:
        _check_workspace("second_logits", second_logits, logits)
    if class_weight is not None:
        assert tuple(class_weight.shape) == (V,) and class_weight.device == dev
        class_weight = class_weight.contiguous() if smoothing else None
    cap, inv_cap, inv_t = _scales(softcap, temperature)
    r_cap, r_inv_cap, _ = _scales(second_softcap, None)
    f32 = dict(dtype=torch.float32, device=dev)
    second = second_logits is not None
    mixing = mix_weight is not None
    assert not mixing or (second and 0.0 < mix_weight < 1.0), "the mixture is of two heads, 0 < mix_weight < 1"
    out = RowStats(
        lse=torch.empty(C, **f32), target_logit=torch.empty(C, **f32), target_logprob=torch.empty(C, **f32),
        entropy=torch.empty(C, **f32) if with_stats else None,
        max_logit=torch.empty(C, **f32) if with_stats else None,
        argmax=torch.empty(C, dtype=torch.int64, device=dev) if with_stats else None,
        smooth_sum=torch.empty(C, **f32) if smoothing else None,
        second_lse=torch.empty(C, **f32) if second else None,
        reverse_kl=torch.empty(C, **f32) if second else None,
        forward_kl=torch.empty(C, **f32) if second else None,
        model_mix_kl=torch.empty(C, **f32) if mixing else None,
        second_mix_kl=torch.empty(C, **f32) if mixing else None,
    )
    unused = out.lse  # pointers a flag switches off: never read or written

    def ptr(t):
        return t if t is not None else unused

    launch = Launch(
        kernel=_row_stats_kernel,
        args=dict(
            u_ptr=logits, r_ptr=ptr(second_logits), targets_ptr=targets, cw_ptr=ptr(class_weight),
            lse_ptr=out.lse, zy_ptr=out.target_logit, logp_ptr=out.target_logprob, ent_ptr=ptr(out.entropy),
            max_ptr=ptr(out.max_logit), arg_ptr=ptr(out.argmax), smooth_ptr=ptr(out.smooth_sum),
            r_lse_ptr=ptr(out.second_lse), rkl_ptr=ptr(out.reverse_kl), fkl_ptr=ptr(out.forward_kl),
            mkl_ptr=ptr(out.model_mix_kl), mkl_r_ptr=ptr(out.second_mix_kl),
            C=C, V=V, ld=logits.stride(0), ld_r=second_logits.stride(0) if second else 0,
            softcap=cap, inv_softcap=inv_cap, inv_temperature=inv_t, r_softcap=r_cap, r_inv_softcap=r_inv_cap,
            mix_weight=float(mix_weight) if mixing else 0.5,
        ),
        constexprs=dict(
            HAS_SOFTCAP=softcap is not None, WITH_STATS=with_stats, SMOOTHING=smoothing,
            HAS_CLASS_WEIGHT=class_weight is not None, HAS_SECOND=second,
            SECOND_HAS_SOFTCAP=second and second_softcap is not None, MIX=mixing,
        ),
        grid=lambda c: (triton.cdiv(C, c.blocks["BLOCK_N"]),),
        family="two" if second else "one",
    )
    return launch, out


def row_stats(logits, targets, *, softcap=None, temperature=None, with_stats=False, smoothing=False,
              class_weight=None, second_logits=None, second_softcap=None, mix_weight=None) -> RowStats:
    """Per-row statistics of a workspace of raw logits, reading it once.

    Args:
        logits: (C, V) float32 raw logits u (bias already added); row stride ``ld >= V``
            (a multiple of 16 keeps the loads 16-byte vectors), unit column stride.
        targets: (C,) integer label of each row; outside [0, V) has no label logit (0).
        softcap: z = softcap * tanh(u / softcap) when given.
        temperature: z is then divided by it when given (both heads).
        with_stats: also entropy, max logit, argmax.
        smoothing: also smooth_sum = sum_j u_j z_j.
        class_weight: (V,) u_j of smooth_sum (None: 1), any float dtype; read only with smoothing.
        second_logits: (C, V) float32 raw logits of a second head (ASFT's reference), its own
            row stride, unit column stride: also second_lse and both KLs, free of any constant
            offset between the heads.
        second_softcap: the second head's own soft-cap (None: none).
        mix_weight: beta in (0, 1) (with second_logits): also both heads' KLs to the mixture
            ``m = beta q + (1 - beta) p`` (the generalized JSD's), from a second read of the rows once
            both log-sum-exps are known.

    Returns:
        :class:`RowStats`, each field (C,).
    """
    C = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None
    if C == 0:
        _check_workspace("logits", logits)
        second = second_logits is not None

        def empty(on, dtype=torch.float32):
            return torch.empty(0, dtype=dtype, device=logits.device) if on else None

        return RowStats(empty(True), empty(True), empty(True), empty(with_stats), empty(with_stats),
                        empty(with_stats, torch.int64), empty(smoothing), empty(second), empty(second),
                        empty(second), empty(mix_weight is not None), empty(mix_weight is not None))
    launch, out = row_stats_launch(logits, targets, softcap=softcap, temperature=temperature,
                                   with_stats=with_stats, smoothing=smoothing, class_weight=class_weight,
                                   second_logits=second_logits, second_softcap=second_softcap, mix_weight=mix_weight)
    key = (logits.shape[1], bucket(C), *launch.constexprs.values())
    STATS_TUNER.run(launch, key)
    return out


def narrow_view(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (C, V) ``dtype`` view of the first half of each fp32 row's bytes (row stride 2 ld)."""
    return logits.view(dtype)[:, :logits.shape[1]]


def logit_grad_launch(logits, targets, lse, a, b, c=None, e=None, f=None, *, logp=None, softcap=None,
                      temperature=None, class_weight=None, second_logits=None, second_lse=None, second_softcap=None,
                      out_dtype=torch.float32, mix_gap=None, mix_weight=None):
    """The launch of :func:`logit_grad_in_place` and the G view it fills (shapes asserted; C > 0)."""
    _check_workspace("logits", logits)
    C, V = logits.shape
    dev = logits.device
    assert out_dtype in (torch.float32, torch.bfloat16, torch.float16), out_dtype
    targets = _targets(targets, C, V, dev)
    lse, a, b = (_vector(n, t, C, dev) for n, t in (("lse", lse), ("a", a), ("b", b)))
    logp = _vector("logp", logp, C, dev) if logp is not None else None
    c, e, f = (_vector(n, t, C, dev) if t is not None else None for n, t in (("c", c), ("e", e), ("f", f)))
    mix_gap = _vector("mix_gap", mix_gap, C, dev) if mix_gap is not None else None
    assert mix_gap is None or (mix_weight is not None and 0.0 < mix_weight < 1.0), "the g term needs 0 < beta < 1"
    reads_second = e is not None or f is not None or mix_gap is not None
    if reads_second:
        assert second_logits is not None and second_lse is not None, "the e, f and g terms read the second head"
        _check_workspace("second_logits", second_logits, logits)
        second_lse = _vector("second_lse", second_lse, C, dev)
    else:
        second_logits = second_lse = None
    if c is not None and class_weight is not None:
        assert tuple(class_weight.shape) == (V,) and class_weight.device == dev
        class_weight = class_weight.contiguous()
    else:
        class_weight = None
    g = logits if out_dtype == torch.float32 else narrow_view(logits, out_dtype)
    cap, inv_cap, inv_t = _scales(softcap, temperature)
    r_cap, r_inv_cap, _ = _scales(second_softcap, None)

    def ptr(t):
        return t if t is not None else lse

    launch = Launch(
        kernel=_logit_grad_kernel,
        args=dict(
            u_ptr=logits, r_ptr=ptr(second_logits), g_ptr=g, targets_ptr=targets, lse_ptr=lse, logp_ptr=ptr(logp),
            a_ptr=a, b_ptr=b,
            c_ptr=ptr(c), cw_ptr=ptr(class_weight), r_lse_ptr=ptr(second_lse), e_ptr=ptr(e), f_ptr=ptr(f),
            mg_ptr=ptr(mix_gap),
            C=C, V=V, ld=logits.stride(0), ld_r=second_logits.stride(0) if reads_second else 0, ld_g=g.stride(0),
            softcap=cap, inv_softcap=inv_cap, inv_temperature=inv_t, r_softcap=r_cap, r_inv_softcap=r_inv_cap,
            mix_weight=float(mix_weight) if mix_gap is not None else 0.5,
        ),
        constexprs=dict(
            HAS_SOFTCAP=softcap is not None, HAS_LOGP=logp is not None, HAS_UNIFORM=c is not None,
            HAS_CLASS_WEIGHT=class_weight is not None,
            HAS_Q=e is not None, HAS_GAP=f is not None,
            SECOND_HAS_SOFTCAP=reads_second and second_softcap is not None,
            HAS_MIX=mix_gap is not None,
            OUT_DTYPE=torch_to_tl(out_dtype),
        ),
        grid=lambda cfg: (triton.cdiv(C, cfg.blocks["BLOCK_N"]),),
        family="two" if reads_second else "one",
    )
    return launch, g


def logit_grad_in_place(logits, targets, lse, a, b, c=None, e=None, f=None, *, logp=None, softcap=None,
                        temperature=None, class_weight=None, second_logits=None, second_lse=None, second_softcap=None,
                        out_dtype=torch.float32, mix_gap=None, mix_weight=None) -> torch.Tensor:
    """Overwrite a workspace of raw logits with their logit gradient G; returns G as a (C, V) view.

    G per row as the contract gives it (``dft_ops.backends.protocol``), with s = exp(z - lse),
    q = exp(zr - second_lse), zr the second head's capped, tempered logits, u_j = class_weight[j] (or 1).

    Precision, the label's entry: formed as ``a expm1(log p) + (a - b)``, never ``a s_y - b``
    (fp32 s_y - 1 keeps only the bits of 1 - p that s_y's rounding leaves). And log p should be
    row_stats' ``target_logprob`` (``logp``): ``z_y - lse`` carries lse's fp32 rounding, half an
    ulp of |lse| (1e-6 at |lse| ~ 16), i.e. ~1e-3 of 1 - p where p ~ 0.999; on peaked rows the
    label's entry -a (1 - p) dominates d_hidden = G W, and that error passes to it whatever form
    the entry takes (measured, tests/test_row_pass.py: d_hidden ~3e-4 off float64 at median p
    0.9997, with ``logp`` ~1e-7). Every other entry carries lse's error only relatively (1e-6).
    Masked (-inf) logits have no probability: the a, e and f terms give them 0 (no NaN, also on
    a row of -inf logits, lse -inf); the b and c terms are constant in z and apply as the
    contract says (a label whose logit is -inf gets -b dz/du).

    In place: with ``out_dtype`` float32, G replaces u entry for entry. With bf16 / fp16, row
    i's G (2 bytes per entry) fills the first half of row i's bytes, as a view with row stride
    2 ld elements; the second half keeps stale logits. Why no logit is overwritten before it is
    read: a program owns whole rows and sweeps their tiles in ascending column order; tile
    [v0, v0 + B) stores bytes [2 v0, 2 v0 + 2 B) of its row, i.e. over the fp32 entries
    [v0 / 2, (v0 + B) / 2), all below v0 + B: entries of this tile or of earlier ones, which
    the program has already read; entries of later tiles (>= v0 + B, including the one loaded
    ahead) are never stored over before they are read. Other threads of the program may own
    those entries, so a barrier stands between each tile's loads (consumed by then) and its
    stores, in fp32 too (where the store's layout may differ from the load's). The label's
    entry is computed from its raw logit before the sweep (behind a barrier) and stored after
    it (behind another). Rows belong to one program each, so programs never race; rows past C
    in the last program re-read row C - 1 in step with it and store nothing.

    Args:
        logits: (C, V) float32 raw logits u, row stride ld >= V, unit column stride; the
            workspace :func:`row_stats` read. Overwritten.
        targets: (C,) integer labels; outside [0, V): no one-hot term.
        lse: (C,) log-sum-exp of z (row_stats' lse).
        a, b: (C,) factors of the softmax and of the one-hot label; any float dtype.
        c: (C,) factor of the class weights u_j (label smoothing), or None for 0.
        e: (C,) factor of the second head's softmax q, or None for 0.
        f: (C,) factor of s (log s - log q), or None for 0.
        logp: (C,) log p of each row's label (row_stats' target_logprob), or None for z_y - lse.
        softcap, temperature: as in :func:`row_stats`.
        class_weight: (V,) u_j of the c term (None: 1).
        second_logits: (C, V) float32 raw logits of the second head (read only with e or f), its
            own storage or rows of a shared one (never overlapping a row of ``logits``).
        second_lse: (C,) its log-sum-exp (row_stats' second_lse).
        second_softcap: the second head's soft-cap.
        out_dtype: float32, bfloat16 or float16, the dtype of G.
        mix_gap: (C,) factor g of s (log s - log m), m = mix_weight q + (1 - mix_weight) s, or None for 0.
        mix_weight: beta in (0, 1), read with mix_gap.

    Returns:
        G, (C, V) of ``out_dtype``: ``logits`` itself for float32, else the narrow view
        (:func:`narrow_view`) of the same storage.
    """
    if isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[0] == 0:
        _check_workspace("logits", logits)
        return logits if out_dtype == torch.float32 else torch.empty(0, logits.shape[1], dtype=out_dtype,
                                                                     device=logits.device)
    launch, g = logit_grad_launch(logits, targets, lse, a, b, c, e, f, logp=logp, softcap=softcap,
                                  temperature=temperature, class_weight=class_weight, second_logits=second_logits,
                                  second_lse=second_lse, second_softcap=second_softcap, out_dtype=out_dtype,
                                  mix_gap=mix_gap, mix_weight=mix_weight)
    # never timed: a trial would overwrite the logits (each family has one configuration)
    GRAD_TUNER.run(launch, ())
    return g


class TritonRowPasses:
    """The :class:`~dft_ops.backends.protocol.RowPasses` of these kernels, for ``dft_ops.backends.one_pass``."""

    def row_stats(self, logits, targets, head: Head, *, with_stats: bool, smoothing: bool,
                  second_logits) -> ForwardStats:
        two = second_logits is not None
        s = row_stats(logits, targets, softcap=head.softcap, temperature=head.temperature, with_stats=with_stats,
                      smoothing=smoothing, class_weight=head.class_weight if smoothing else None,
                      second_logits=second_logits, second_softcap=head.second.softcap if two else None,
                      mix_weight=head.mix_weight if two else None)
        return ForwardStats(s.lse, s.target_logit, s.entropy, s.max_logit, s.argmax, s.smooth_sum, s.second_lse,
                            s.reverse_kl, s.forward_kl, s.target_logprob, s.model_mix_kl, s.second_mix_kl)

    def logit_grad(self, logits, targets, head: Head, terms: GradTerms, *, second_logits, out_dtype):
        two = terms.reads_second_head
        return logit_grad_in_place(
            logits, targets, terms.lse, terms.softmax, terms.target, terms.uniform, terms.second, terms.gap,
            logp=terms.logprob, softcap=head.softcap, temperature=head.temperature,
            class_weight=head.class_weight if terms.uniform is not None else None,
            second_logits=second_logits if two else None, second_lse=terms.second_lse if two else None,
            second_softcap=head.second.softcap if two else None, out_dtype=out_dtype,
            mix_gap=terms.mix_gap, mix_weight=head.mix_weight)
