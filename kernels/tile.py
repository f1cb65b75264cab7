"""Building blocks shared by the forward and backward kernels.

A *logit tile* is the (BLOCK_N tokens x BLOCK_V vocabulary rows) block of
``hidden @ weight.T (+ bias)``, soft-capped and tempered if asked, accumulated
in fp32 from a loop over the hidden dimension. Both passes build it the same
way, so the backward recomputes exactly the logits the forward normalised.
"""

import triton
import triton.language as tl

# absolute: see kernels/fused_backward.py
from dft_ops.backends.protocol import interpreting

# The interpreter (TRITON_INTERPRET=1) stores bfloat16 as raw uint16 bits and
# its tl.dot multiplies those bits as integers; it also rounds fp32->bf16 by
# truncation. Upcasting the operands of a dot to fp32 is exact (products of
# bf16 values are exact in fp32), so under the interpreter we do that, and
# round_to() rounds to nearest-even by hand as a GPU does.
INTERPRET = tl.constexpr(interpreting())

# tanh(x) = x + x * s * P(s), s = x^2, for |x| < _TANH_SMALL: a least-squares fit in
# float64 over [0, 0.55], within 1.1 ulp of tanh in fp32 there. Above, the
# exponential form is within 3.2 ulp (tests/test_backends.py checks both
# against float64 from 1e-8 to 1e3).
_TANH_SMALL = tl.constexpr(0.55)
_T1 = tl.constexpr(-0.3333333134651184)
_T2 = tl.constexpr(0.13333292305469513)
_T3 = tl.constexpr(-0.053959619253873825)
_T4 = tl.constexpr(0.021783608943223953)
_T5 = tl.constexpr(-0.008418790996074677)
_T6 = tl.constexpr(0.002403673017397523)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 tile -> ``dtype``, rounding to nearest-even (as the GPU's cvt.rn does)."""
    if INTERPRET and dtype == tl.bfloat16 and x.dtype != tl.bfloat16:
        # the interpreter's casts to bf16 truncate; fp16 -> fp32 is exact, so one rounding remains
        x = x.to(tl.float32)
        # add half an ulp of bf16 (minus one on ties to even), then drop 16 bits
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = (bits & -65536).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def to_common(a, b, COMPUTE_DTYPE: tl.constexpr):
    """Both operands of a product in the compute dtype (no-op when they already are)."""
    return round_to(a, COMPUTE_DTYPE), round_to(b, COMPUTE_DTYPE)


@triton.jit
def dot(a, b, acc, FP32_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a: (M, K), b: (K, N), acc: (M, N) fp32."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        # fp32 inputs: tf32x3 keeps ~fp32 accuracy on the tensor cores
        # (plain tf32 would cost ~3e-4 relative error).
        return tl.dot(a, b, acc, input_precision=FP32_PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tanh(x):
    """tanh(x) to a few ulp at every |x|, in plain arithmetic (any backend, and the interpreter).

    ``1 - 2 / (exp(2x) + 1)`` cancels at small |x| (it gives 0 at 1e-8): a
    polynomial covers |x| < 0.55, ``(1 - e) / (1 + e)`` with e = exp(-2|x|) the
    rest. Saturates cleanly at +-inf.
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    s = x * x
    p = ((((_T6 * s + _T5) * s + _T4) * s + _T3) * s + _T2) * s + _T1
    small = x + x * (s * p)
    return tl.where(ax < _TANH_SMALL, small, tl.where(x < 0, -big, big))


@triton.jit
def cap_and_temper(u, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """Logits z = softcap * tanh(u / softcap) / temperature from raw logits u (fp32 tile).

    inv_temperature is 1.0 without a temperature: one multiply, no variant.
    """
    if HAS_SOFTCAP:
        return (softcap * inv_temperature) * tanh(u * inv_softcap)
    else:
        return u * inv_temperature


@triton.jit
def cap_and_temper_slope(z, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """dz/du from the logits z themselves: (1 - tanh^2) / temperature, tanh = z T / softcap.

    Recomputed from z rather than kept from the forward transform: one tile fewer
    live in the backward's registers. (1 - t)(1 + t) is exact to an ulp of 1,
    i.e. 1e-7 absolute where the slope itself vanishes (|u| >> softcap).
    """
    if HAS_SOFTCAP:
        t = z * (inv_softcap / inv_temperature)
        return (1.0 - t) * (1.0 + t) * inv_temperature
    else:
        return inv_temperature


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr,
    h_rows, row_mask, cols, col_mask,
    D, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """Raw logits u of one tile, (BLOCK_N, BLOCK_V) fp32, before capping and masking.

    h_rows: (BLOCK_N,) int64 element offset of each token's row in hidden
    (row * stride); cols: (BLOCK_V,) int64 vocabulary indices. Only these
    per-row / per-column offsets live across the loop: a loop-carried tensor of
    64-bit pointers per tile element costs ~2 registers per element and spills.
    hidden and weight tiles are rounded to COMPUTE_DTYPE in registers (mixed
    dtypes never copy an operand in memory).
    """
    offs_d = tl.arange(0, BLOCK_D)
    w_cols = cols * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # Whole BLOCK_D steps carry only row/column masks; the ragged end of D gets
    # one peeled, fully masked step. Per-element D masks inside the pipelined
    # loop spill registers.
    for d in range(0, D // BLOCK_D):
        k = d * BLOCK_D + offs_d
        h = tl.load(h_ptr + h_rows[:, None] + k[None, :] * stride_hd, mask=row_mask[:, None], other=0.0)
        w = tl.load(w_ptr + w_cols[None, :] + k[:, None] * stride_wd, mask=col_mask[None, :], other=0.0)
        h, w = to_common(h, w, COMPUTE_DTYPE)
        acc = dot(h, w, acc, FP32_PRECISION)
    if not EVEN_D:
        k = (D // BLOCK_D) * BLOCK_D + offs_d
        h = tl.load(h_ptr + h_rows[:, None] + k[None, :] * stride_hd,
                    mask=row_mask[:, None] & (k < D)[None, :], other=0.0)
        w = tl.load(w_ptr + w_cols[None, :] + k[:, None] * stride_wd,
                    mask=col_mask[None, :] & (k < D)[:, None], other=0.0)
        h, w = to_common(h, w, COMPUTE_DTYPE)
        acc = dot(h, w, acc, FP32_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def second_tile(
    h2_ptr, w2_ptr, b2_ptr, h2_rows, row_mask, cols, col_mask,
    softcap2, inv_softcap2, inv_temperature, D2, stride_h2d, stride_w2v, stride_w2d,
    HAS_BIAS2: tl.constexpr, HAS_SOFTCAP2: tl.constexpr, COMPUTE_DTYPE2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D2: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    """The second head's logits r of one tile, (BLOCK_N, BLOCK_V) fp32, capped and tempered (not masked).

    h2_rows: (BLOCK_N,) int64 element offset of each token's row in the second head's hidden states.
    """
    u = logit_tile(
        h2_ptr, w2_ptr, b2_ptr, h2_rows, row_mask, cols, col_mask,
        D2, stride_h2d, stride_w2v, stride_w2d,
        HAS_BIAS2, COMPUTE_DTYPE2, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D2, FP32_PRECISION,
    )
    return cap_and_temper(u, softcap2, inv_softcap2, inv_temperature, HAS_SOFTCAP2)


@triton.jit
def class_weights(cw_ptr, cols, col_mask, HAS_CLASS_WEIGHT: tl.constexpr):
    """(BLOCK_V,) fp32 u_j: class_weight[j], or 1; 0 outside the vocabulary."""
    if HAS_CLASS_WEIGHT:
        return tl.load(cw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        return tl.where(col_mask, 1.0, 0.0)


@triton.jit
def grouped_tile(pid, n_tiles, v_tiles, GROUP_N: tl.constexpr):
    """(token tile, vocabulary tile) of program ``pid`` in grouped order.

    GROUP_N token tiles sweep the vocabulary together, so a weight tile is read
    from HBM once per group and the group's hidden tiles stay in L2.
    """
    per_group = GROUP_N * v_tiles
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_tiles - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def token_terms(offs, row_mask, rows_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr,
                HAS_ROWS: tl.constexpr, HAS_UNIFORM: tl.constexpr):
    """Per-token inputs of the logit gradient for computed tokens ``offs`` (BLOCK_N,).

    Returns (h_row, y, lse, a, b, c): the row of hidden (int64), the target
    (int32; targets were clamped to [-1, V], so outside [0, V) matches no
    column), the log-sum-exp and the coefficients (c is 0 without a uniform term).
    Masked tokens get a = b = c = 0. The second head's terms: :func:`second_terms`.
    """
    if HAS_ROWS:
        h_row = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    else:
        h_row = offs.to(tl.int64)
    y = tl.load(targets_ptr + offs, mask=row_mask, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + offs, mask=row_mask, other=0.0)
    coef_a = tl.load(coef_a_ptr + offs, mask=row_mask, other=0.0)
    coef_b = tl.load(coef_b_ptr + offs, mask=row_mask, other=0.0)
    if HAS_UNIFORM:
        coef_c = tl.load(coef_c_ptr + offs, mask=row_mask, other=0.0)
    else:
        coef_c = tl.zeros_like(coef_a)
    return h_row, y, lse, coef_a, coef_b, coef_c


@triton.jit
def second_terms(offs, row_mask, lse, lse2_ptr, coef_e_ptr, coef_f_ptr,
                 coef_g_ptr,
                 HAS_Q: tl.constexpr, HAS_GAP: tl.constexpr,
                 HAS_MIX: tl.constexpr):
    """(lse2, e, f, g) of computed tokens ``offs``: the second head's log-sum-exp (every term reads
    it) and the coefficients of its softmax, of the gap term and of the mixture gap term, each 0
    when its term is off or the token masked. ``lse``: the tokens' (BLOCK_N,) fp32 log-sum-exp (gives
    the shape)."""
    zero = tl.zeros_like(lse)
    lse2 = zero
    coef_e = zero
    coef_f = zero
    coef_g = zero
    if HAS_Q or HAS_GAP or HAS_MIX:
        lse2 = tl.load(lse2_ptr + offs, mask=row_mask, other=0.0)
    if HAS_Q:
        coef_e = tl.load(coef_e_ptr + offs, mask=row_mask, other=0.0)
    if HAS_GAP:
        coef_f = tl.load(coef_f_ptr + offs, mask=row_mask, other=0.0)
    if HAS_MIX:
        coef_g = tl.load(coef_g_ptr + offs, mask=row_mask, other=0.0)
    return lse2, coef_e, coef_f, coef_g


@triton.jit
def logs_over_mixture(x, beta):
    """``(log a - log m, log b - log m)``, ``m = (1 - beta) a + beta b``, from ``x = log a - log b``
    (fp32 tiles), for 0 < beta < 1: the generalized JSD's log-ratios of the model's (a) and the second
    head's (b) distribution to their mixture, from the two heads' own log-ratio (no offset between the
    heads enters). One exponential (of ``-|x|``) and one logarithm (of a number in [min(beta, 1 - beta),
    1]) for both: nothing overflows; +-inf x gives -inf for the head without probability, which the
    caller weighs by 0. The formulas: dft_ops.backends.partials.logs_over_mixture."""
    e = tl.exp(-tl.abs(x))
    above = x >= 0.0
    log_share = tl.log(tl.where(above, (1.0 - beta) + beta * e, (1.0 - beta) * e + beta))
    return tl.where(above, -log_share, x - log_share), tl.where(above, -x - log_share, -log_share)


@triton.jit
def log_over_mixture(x, beta):
    """``log a - log m``, ``m = (1 - beta) a + beta b``, from ``x = log a - log b`` (fp32 tile): the g
    term's log-ratio of the model's distribution to the mixture, as
    ``-log((1 - beta) + beta exp(min(-x, 80)))``. One exponential and one logarithm; the clamp keeps
    exp finite, and changes the value only where ``a < e^-80 b``, i.e. where ``a`` itself, the term's
    factor, is below e^-80 (x = +inf: -log(1 - beta); NaN x, no probability in either head: the caller
    weighs it by a = 0). (Where both log-ratios are needed, :func:`logs_over_mixture`; both are
    dft_ops.backends.partials'.)"""
    return -tl.log((1.0 - beta) + beta * tl.exp(tl.minimum(-x, 80.0)))


@triton.jit
def token_inv_temperature(inv_t_ptr, offs, row_mask, inv_temperature, TOKEN_TEMPERATURE: tl.constexpr):
    """1 / temperature of computed tokens ``offs``: a (BLOCK_N, 1) fp32 column read from ``inv_t_ptr``
    (a temperature per token), or the call's scalar ``inv_temperature``. Either broadcasts over a logit tile
    in :func:`cap_and_temper` / :func:`cap_and_temper_slope`."""
    if TOKEN_TEMPERATURE:
        return tl.load(inv_t_ptr + offs, mask=row_mask, other=1.0)[:, None]
    else:
        return inv_temperature


@triton.jit
def entropy_term(offs, row_mask, coef_k_ptr, lse, HAS_ENTROPY: tl.constexpr):
    """(BLOCK_N,) fp32 k of computed tokens ``offs``, the factor of ``s log s`` (0 when off or masked)."""
    if HAS_ENTROPY:
        return tl.load(coef_k_ptr + offs, mask=row_mask, other=0.0)
    else:
        return tl.zeros_like(lse)


@triton.jit
def logit_grad_tile(
    h_ptr, w_ptr, b_ptr, cw_ptr,
    h_rows, row_mask, cols, col_mask, y_local, lse, coef_a, coef_b, coef_c,
    softcap, inv_softcap, inv_temperature, D, stride_hd, stride_wv, stride_wd,
    h2_ptr, w2_ptr, b2_ptr, h2_rows, lse2, coef_e, coef_f,
    coef_g, mix_weight,
    softcap2, inv_softcap2, D2, stride_h2d, stride_w2v, stride_w2d,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_GAP: tl.constexpr, HAS_BIAS2: tl.constexpr,
    HAS_SOFTCAP2: tl.constexpr, COMPUTE_DTYPE2: tl.constexpr,
    HAS_MIX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_D2: tl.constexpr, FP32_PRECISION: tl.constexpr,
    coef_k=0.0, HAS_ENTROPY: tl.constexpr = False,
):
    """The logit gradient G of one tile, (BLOCK_N, BLOCK_V) fp32, 0 outside the masks.

    G, the contract's formula (dft_ops.backends.protocol),
    from logits rebuilt exactly as the forward built them; the second head's tile r
    (q = exp(r - lse2)) only when HAS_Q, HAS_GAP or HAS_MIX (the mixture gap, ``mix_weight``
    the second head's weight in m). y_local: (BLOCK_N,) int32 target minus the tile's first column.
    ``inv_temperature``: a scalar or a (BLOCK_N, 1) column (:func:`token_inv_temperature`). ``coef_k``
    (BLOCK_N,): the entropy term's factor, read only when HAS_ENTROPY.
    """
    if HAS_Q or HAS_GAP or HAS_MIX:
        # the second head's tile first: only it stays live through the model's product
        r = second_tile(
            h2_ptr, w2_ptr, b2_ptr, h2_rows, row_mask, cols, col_mask,
            softcap2, inv_softcap2, inv_temperature, D2, stride_h2d, stride_w2v, stride_w2d,
            HAS_BIAS2, HAS_SOFTCAP2, COMPUTE_DTYPE2, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D2,
            FP32_PRECISION,
        )
    u = logit_tile(
        h_ptr, w_ptr, b_ptr, h_rows, row_mask, cols, col_mask,
        D, stride_hd, stride_wv, stride_wd,
        HAS_BIAS, COMPUTE_DTYPE, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, FP32_PRECISION,
    )
    z = cap_and_temper(u, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP)
    # exp(-inf - lse) = 0: masked-vocabulary (-inf) logits get no gradient
    s = tl.exp(z - lse[:, None])
    if HAS_ENTROPY:
        # a s + k s log s as s (a + k log s): no third tile live beside z and s (sm_80 spills otherwise). The
        # entropy's term is the gap term without a second head; no probability, no gradient (0 * -inf)
        g = tl.where(s > 0.0, s * (coef_a[:, None] + coef_k[:, None] * (z - lse[:, None])), 0.0)
    else:
        g = coef_a[:, None] * s
    g -= tl.where(tl.arange(0, BLOCK_V)[None, :] == y_local[:, None], coef_b[:, None], 0.0)
    if HAS_UNIFORM:
        g -= coef_c[:, None] * class_weights(cw_ptr, cols, col_mask, HAS_CLASS_WEIGHT)[None, :]
    if HAS_Q:
        g -= coef_e[:, None] * tl.exp(r - lse2[:, None])
    if HAS_GAP:
        # log s - log q, each head relative to its own lse: no offset between the heads enters.
        # A logit without probability gets no gradient, whatever its gap (0 * inf)
        g += coef_f[:, None] * tl.where(s > 0.0, s * ((z - lse[:, None]) - (r - lse2[:, None])), 0.0)
    if HAS_MIX:
        # log s - log m, m = mix_weight q + (1 - mix_weight) s, from the same two log-ratios
        over_s = log_over_mixture((z - lse[:, None]) - (r - lse2[:, None]), mix_weight)
        g += coef_g[:, None] * tl.where(s > 0.0, s * over_s, 0.0)
    g = g * cap_and_temper_slope(z, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP)
    return tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
