"""The fused backward: gradients of hidden, weight and bias from recomputed logit tiles, no workspace.

Every objective with every option has the contract's logit gradient G
(:mod:`dft_ops.backends.protocol`), from per-token terms with the upstream
gradient folded in (0 for ignored tokens). Each program owns one (BLOCK_N
tokens x BLOCK_V vocabulary) tile: it rebuilds the logits exactly as the forward
did, forms G in fp32, and adds ``G @ W`` into d(hidden) and ``G.T @ H`` into
d(weight), BLOCK_DM columns at a time, with fp32 atomics. Nothing of size tokens x vocabulary reaches global memory.

fp32 accumulation: every tile's contribution lands in an fp32 buffer and is
rounded to the parameter dtype once at the end. Peers that accumulate in bf16
round after every tile (hundreds of times for d(hidden)), which is what breaks
training. To bound the fp32 buffer for d(weight) the vocabulary is processed
in chunks: each chunk's rows of d(weight) are complete when its launch ends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# absolute: transformers may import this directory as a top-level `kernels` when the
# repository root is on sys.path (it probes for Hugging Face's kernels package)
from dft_ops.backends.protocol import Grads, GradTerms, Head, Needs, Tokens, assert_inputs, fp32_gradients
from .launch import Config, Launch, Tuner, bucket, kernel_operands, round_down
from .logit_grad import gradient_family, gradient_inputs, gradient_per_config
from .second_head import second_head_key
from .tile import (dot, entropy_term, grouped_tile, logit_grad_tile, second_terms, round_to, token_inv_temperature,
                   token_terms)


@triton.jit
def _fused_backward_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, cw_ptr, filter_ptr,
    h2_ptr, w2_ptr, b2_ptr, lse2_ptr, coef_e_ptr, coef_f_ptr,
    coef_g_ptr, mix_weight,
    dh_ptr, dw_ptr, db_ptr, coef_k_ptr, inv_t_ptr,
    softcap, inv_softcap, inv_temperature, M, D, v_lo, v_hi,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn, stride_dwv,
    softcap2, inv_softcap2, D2, stride_h2n, stride_h2d, stride_w2v, stride_w2d,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_UNIFORM: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_FILTER: tl.constexpr, GRAD_HIDDEN: tl.constexpr, GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr, PRECISE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_GAP: tl.constexpr, HAS_BIAS2: tl.constexpr,
    HAS_SOFTCAP2: tl.constexpr, COMPUTE_DTYPE2: tl.constexpr,
    HAS_MIX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DM: tl.constexpr,
    GROUP_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DM: tl.constexpr, EVEN_D2: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, TOKEN_TEMPERATURE: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_N), tl.cdiv(v_hi - v_lo, BLOCK_V), GROUP_N)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < M
    rows, y, lse, coef_a, coef_b, coef_c = token_terms(
        offs, row_mask, rows_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, HAS_ROWS, HAS_UNIFORM)
    lse2, coef_e, coef_f, coef_g = second_terms(offs, row_mask, lse, lse2_ptr, coef_e_ptr, coef_f_ptr,
                                                coef_g_ptr,
                                                HAS_Q, HAS_GAP,
                                                HAS_MIX)
    size = tl.abs(coef_a) + tl.abs(coef_b)
    if HAS_UNIFORM:
        size += tl.abs(coef_c)
    if HAS_Q:
        size += tl.abs(coef_e)
    if HAS_GAP:
        size += tl.abs(coef_f)
    if HAS_MIX:
        size += tl.abs(coef_g)
    coef_k = entropy_term(offs, row_mask, coef_k_ptr, lse, HAS_ENTROPY)
    if HAS_ENTROPY:
        size += tl.abs(coef_k)
    # tiles of ignored tokens (or zero upstream gradient) add exactly nothing
    if tl.max(size, axis=0) == 0.0:
        return

    # tile-local int32 column indices for compares, int64 only for addresses
    v0 = v_lo + pid_v * BLOCK_V
    local = tl.arange(0, BLOCK_V)
    cols = v0 + local.to(tl.int64)
    col_mask = local < v_hi - v0
    inv_t = token_inv_temperature(inv_t_ptr, offs, row_mask, inv_temperature, TOKEN_TEMPERATURE)
    g = logit_grad_tile(
        h_ptr, w_ptr, b_ptr, cw_ptr, rows * stride_hn, row_mask, cols, col_mask, y - v0, lse,
        coef_a, coef_b, coef_c, softcap, inv_softcap, inv_t, D, stride_hd, stride_wv, stride_wd,
        h2_ptr, w2_ptr, b2_ptr, rows * stride_h2n, lse2, coef_e, coef_f,
        coef_g, mix_weight,
        softcap2, inv_softcap2, D2, stride_h2d, stride_w2v, stride_w2d,
        HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, HAS_CLASS_WEIGHT, COMPUTE_DTYPE,
        HAS_Q, HAS_GAP, HAS_BIAS2, HAS_SOFTCAP2, COMPUTE_DTYPE2,
        HAS_MIX,
        BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, EVEN_D2, FP32_PRECISION, coef_k=coef_k, HAS_ENTROPY=HAS_ENTROPY,
    )
    if HAS_FILTER:
        # gradient filtering (opt-in): skip tiles whose every entry is negligible
        if tl.max(tl.max(tl.abs(g), axis=1), axis=0) < tl.load(filter_ptr):
            return

    local_cols = cols - v_lo
    if GRAD_BIAS:
        tl.atomic_add(db_ptr + local_cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")

    # G is rounded to the compute dtype for the tensor-core products; PRECISE
    # also keeps the rounding error as a second 16-bit tile (G = hi + lo to
    # ~2^-16 relative) and adds its products too.
    g_hi = round_to(g, COMPUTE_DTYPE)
    g_lo = g_hi
    if PRECISE:
        g_lo = round_to(g - g_hi.to(tl.float32), COMPUTE_DTYPE)
    # Two passes over D rather than one: a single loop keeps G live in both
    # dot-operand layouts (G and G.T) at once, and that register pressure
    # spills. Each pass runs whole BLOCK_DM steps, then one masked ragged step.
    if GRAD_HIDDEN:
        # d_hidden[rows] += G @ W[cols]
        _add_product(g_hi, g_lo, w_ptr, cols * stride_wv, col_mask, stride_wd, dh_ptr, rows * stride_dhn, row_mask,
                     D, EVEN_DM, PRECISE, BLOCK_N, BLOCK_DM, FP32_PRECISION)
    if GRAD_WEIGHT:
        # d_weight[cols] += G.T @ H[rows]
        _add_product(tl.trans(g_hi), tl.trans(g_lo), h_ptr, rows * stride_hn, row_mask, stride_hd, dw_ptr,
                     local_cols * stride_dwv, col_mask, D, EVEN_DM, PRECISE, BLOCK_V, BLOCK_DM, FP32_PRECISION)


@triton.jit
def _add_product(a_hi, a_lo, src_ptr, src_rows, src_mask, stride_src_d, dst_ptr, dst_rows, dst_mask, D,
                 EVEN_DM: tl.constexpr, PRECISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DM: tl.constexpr,
                 FP32_PRECISION: tl.constexpr):
    """dst[dst_rows, :D] += (a_hi (+ a_lo)) @ src[src_rows, :D], BLOCK_DM columns at a time, fp32 atomics.

    a_hi, a_lo: (BLOCK_M, K) gradient tile (a_lo used only if PRECISE);
    src_rows: (K,) int64 element offsets of the source rows; dst_rows:
    (BLOCK_M,) int64 offsets into the fp32 buffer (unit stride along D).
    Whole steps carry only row masks; a ragged end of D gets one peeled masked step.
    """
    for d in range(0, D // BLOCK_DM):
        _add_product_step(a_hi, a_lo, src_ptr, src_rows, src_mask, stride_src_d, dst_ptr, dst_rows, dst_mask,
                          d * BLOCK_DM, D, False, PRECISE, BLOCK_M, BLOCK_DM, FP32_PRECISION)
    if not EVEN_DM:
        _add_product_step(a_hi, a_lo, src_ptr, src_rows, src_mask, stride_src_d, dst_ptr, dst_rows, dst_mask,
                          (D // BLOCK_DM) * BLOCK_DM, D, True, PRECISE, BLOCK_M, BLOCK_DM, FP32_PRECISION)


@triton.jit
def _add_product_step(a_hi, a_lo, src_ptr, src_rows, src_mask, stride_src_d, dst_ptr, dst_rows, dst_mask, d0, D,
                      MASK_D: tl.constexpr, PRECISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DM: tl.constexpr,
                      FP32_PRECISION: tl.constexpr):
    k = d0 + tl.arange(0, BLOCK_DM)
    src_m = src_mask[:, None]
    dst_m = dst_mask[:, None]
    if MASK_D:
        src_m = src_m & (k < D)[None, :]
        dst_m = dst_m & (k < D)[None, :]
    src = tl.load(src_ptr + src_rows[:, None] + k[None, :] * stride_src_d, mask=src_m, other=0.0)
    src = round_to(src, a_hi.dtype)
    prod = dot(a_hi, src, tl.zeros((BLOCK_M, BLOCK_DM), dtype=tl.float32), FP32_PRECISION)
    if PRECISE:
        prod = dot(a_lo, src, prod, FP32_PRECISION)
    tl.atomic_add(dst_ptr + dst_rows[:, None] + k[None, :], prod, mask=dst_m, sem="relaxed")

# Only configurations that compile for sm_80 and sm_90 without spills, with every
# optional feature on and off (tests/test_compile.py). 128 x 128 tiles spill on
# sm_80 here; fp32 (tf32x3) needs small tiles and narrow BLOCK_DM.
CONFIGS = {
    "16bit": [
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 64, "BLOCK_DM": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "BLOCK_DM": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64, "BLOCK_DM": 64, "GROUP_N": 8}, num_warps=4, num_stages=3),
    ],
    "fp32": [
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "BLOCK_DM": 16, "GROUP_N": 8}, num_warps=8, num_stages=2),
        Config({"BLOCK_N": 64, "BLOCK_V": 32, "BLOCK_D": 32, "BLOCK_DM": 32, "GROUP_N": 8}, num_warps=4, num_stages=2),
        Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32, "BLOCK_DM": 16, "GROUP_N": 8}, num_warps=8, num_stages=2),
    ],
    # with a second head (ASFT): its tile stays live through the model's product
    "fp32+second": [
        Config({"BLOCK_N": 64, "BLOCK_V": 32, "BLOCK_D": 32, "BLOCK_DM": 32, "GROUP_N": 8}, num_warps=4, num_stages=2),
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16, "BLOCK_DM": 16, "GROUP_N": 8}, num_warps=8, num_stages=2),
        Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 16, "BLOCK_DM": 16, "GROUP_N": 8}, num_warps=8, num_stages=2),
    ],
}
# of the 16-bit tiles, only the 64-row 8-warp one leaves room for the second head's tile and the
# reverse KL's log s - log q with mixed dtypes (the others spill on sm_80)
CONFIGS["16bit+second"] = [CONFIGS["16bit"][1]]
INTERPRET_CONFIG = Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16, "BLOCK_DM": 16, "GROUP_N": 2},
                          num_warps=1, num_stages=1)
TUNER = Tuner(CONFIGS, INTERPRET_CONFIG)

# rows of the fp32 d(weight) chunk buffer: about 32 MB whatever the hidden size
_CHUNK_BYTES = 32 * 1024 * 1024


def default_vocab_chunk(vocab: int, hidden_size: int) -> int:
    """Vocabulary rows per launch: about 32 MB of fp32 d(weight) buffer, in whole tiles of every configuration."""
    tile = max(c.blocks["BLOCK_V"] for cs in CONFIGS.values() for c in cs)
    return min(vocab, round_down(max(1024, _CHUNK_BYTES // (4 * hidden_size)), tile))


def _d_blocks(config: Config, D: int, narrow: bool) -> dict:
    """Hidden-dimension constexprs: BLOCK_DM shrinks (not below 16) until it divides D.

    A ragged last step in the d(hidden) / d(weight) passes keeps G live across
    extra code and spills on sm_80; every hidden size that is a multiple of 16
    avoids it this way. Sizes that are not (no vectorized loads either) take the
    masked tail step. ``narrow`` (an fp32 operand of 16-bit products, or the
    precise mode's second G tile) caps BLOCK_D and BLOCK_DM at 32: the wider
    operand tiles, or two G tiles, otherwise spill on sm_80.
    """
    block_d, block_dm = config.blocks["BLOCK_D"], config.blocks["BLOCK_DM"]
    if narrow:
        block_d, block_dm = min(block_d, 32), min(block_dm, 32)
    while block_dm > 16 and D % block_dm:
        block_dm //= 2
    return {"BLOCK_D": block_d, "BLOCK_DM": block_dm, "EVEN_DM": D % block_dm == 0, "EVEN_D": D % block_d == 0}


def backward_launch(hidden, head: Head, tokens: Tokens, terms: GradTerms, filter_threshold, d_hidden,
                    d_weight_chunk, d_bias_chunk, v_lo, v_hi, *, precise):
    """The launch for vocabulary rows [v_lo, v_hi); d_weight_chunk/d_bias_chunk start at row v_lo.

    Operands as :func:`~dft_ops.kernels.launch.kernel_operands` returns them.
    """
    M = tokens.count
    D = hidden.shape[1]
    any_buf = terms.lse  # stands in for pointers a flag switches off
    compute = head.compute_dtype
    precise = bool(precise) and compute != torch.float32
    narrow = precise or (compute != torch.float32 and torch.float32 in (hidden.dtype, head.weight.dtype))
    args, constexprs = gradient_inputs(hidden, head, tokens, terms)
    return Launch(
        kernel=_fused_backward_kernel,
        args=dict(
            args,
            filter_ptr=filter_threshold if filter_threshold is not None else any_buf,
            dh_ptr=d_hidden if d_hidden is not None else any_buf,
            dw_ptr=d_weight_chunk if d_weight_chunk is not None else any_buf,
            db_ptr=d_bias_chunk if d_bias_chunk is not None else any_buf,
            M=M, v_lo=v_lo, v_hi=v_hi,
            stride_dhn=d_hidden.stride(0) if d_hidden is not None else 0,
            stride_dwv=d_weight_chunk.stride(0) if d_weight_chunk is not None else 0,
        ),
        constexprs=dict(
            constexprs, HAS_FILTER=filter_threshold is not None, GRAD_HIDDEN=d_hidden is not None,
            GRAD_WEIGHT=d_weight_chunk is not None, GRAD_BIAS=d_bias_chunk is not None, PRECISE=precise,
        ),
        grid=lambda c: (triton.cdiv(M, c.blocks["BLOCK_N"]) * triton.cdiv(v_hi - v_lo, c.blocks["BLOCK_V"]),),
        per_config=lambda c: {**_d_blocks(c, D, narrow), **gradient_per_config(c, head, terms)},
        accumulators=[t for t in (d_hidden, d_weight_chunk, d_bias_chunk) if t is not None],
        family=gradient_family(head, terms, tokens),
    )


def fused_backward(hidden, head: Head, tokens: Tokens, terms: GradTerms, needs: Needs, *, filter_eps=None,
                   precise=False, vocab_chunk=None) -> Grads:
    """The contract's gradients (:class:`~dft_ops.backends.protocol.Grads`) of G given by ``terms``, in one
    atomic kernel per vocabulary chunk.

    Args:
        hidden, head, tokens, terms, needs: the contract's (:mod:`dft_ops.backends.protocol`).
        filter_eps: skip a tile when every |G| in it is below
            ``filter_eps * max_t max(|a_t|, |b_t|, |e_t|, |f_t|, |g_t|) / temperature`` (None: exact).
            The uniform term is then added exactly outside the kernel (it is
            rank one); with a softcap it is not, and filtering is off (exact).
        precise: G goes into the products as two 16-bit parts (high + low) instead
            of one, for elementwise-accurate gradients where terms cancel
            (twice the product work; no effect when the products run in fp32).
        vocab_chunk: vocabulary rows per launch (bounds the fp32 d(weight) buffer).

    Returns:
        :class:`~dft_ops.backends.protocol.Grads`; rows of hidden not computed get 0.
    """
    M = assert_inputs(hidden, head, tokens, terms)
    D = hidden.shape[1]
    weight, bias = head.weight, head.bias
    V = weight.shape[0]
    need_bias = needs.bias and bias is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # a 16-bit d(weight) is written chunk by chunk from an fp32 scratch: no (V, D) fp32 buffer
    d_hidden, d_weight, d_bias = fp32_gradients(hidden, head, needs, weight=weight.dtype == torch.float32)
    if needs.weight and d_weight is None:
        d_weight = torch.empty_like(weight)
    if M > 0:
        hidden, head, tokens, terms = kernel_operands(hidden, head, tokens, terms,
                                                      class_weight=terms.uniform is not None,
                                                      second=terms.reads_second_head)
        # the skip threshold is scaled by the call's one temperature (dft_ops.token_logprobs never filters)
        assert filter_eps is None or tokens.inv_temperature is None, "filtering takes one temperature per call"
        if filter_eps is not None and terms.uniform is not None and head.softcap is not None:
            filter_eps = None  # a capped uniform term is dense and not rank one: nothing to skip exactly
        threshold = uniform = None
        if filter_eps is not None:
            size = torch.stack([t.abs().max() for t in (terms.softmax, terms.target, terms.second, terms.gap,
                                                        terms.mix_gap)
                                if t is not None]).max()
            threshold = (size * (filter_eps * head.inv_temperature)).reshape(1)
            # the kernel's skip test would drop the small, dense c_t u_j entries of every tile:
            # add that rank-one term exactly outside instead
            uniform = _RankOneUniform.build(hidden, head, tokens.rows, terms.uniform)
            terms = terms._replace(uniform=None)
        fp32_weight = weight.dtype == torch.float32
        chunk = V if fp32_weight else (vocab_chunk or default_vocab_chunk(V, D))
        scratch = torch.empty(min(chunk, V), D, **f32) if needs.weight and not fp32_weight else None
        key = (D, V, chunk, hidden.dtype, weight.dtype, head.compute_dtype, bucket(M), bias is not None,
               head.softcap is not None, head.temperature is not None, terms.uniform is not None,
               head.class_weight is not None, needs.hidden, needs.weight, need_bias, filter_eps is not None, precise,
               terms.second is not None, terms.gap is not None, terms.entropy is not None,
               tokens.inv_temperature is not None, *second_head_key(head.second if terms.reads_second_head else None),
               terms.mix_gap is not None)
        config = None
        for v_lo in range(0, V, chunk):
            v_hi = min(v_lo + chunk, V)
            dw = None
            if needs.weight:
                dw = d_weight[v_lo:v_hi] if fp32_weight else scratch[: v_hi - v_lo].zero_()
            db = d_bias[v_lo:v_hi] if need_bias else None
            launch = backward_launch(hidden, head, tokens, terms, threshold, d_hidden, dw, db, v_lo, v_hi,
                                     precise=precise)
            if config is None:
                # tuned on the first chunk, before anything is accumulated (the tuner zeroes its trials)
                config = TUNER.pick(launch, key)
            launch.run(config)
            if uniform is not None:
                uniform.add_to_weight_rows(dw, db, v_lo, v_hi)
            if needs.weight and not fp32_weight:
                d_weight[v_lo:v_hi].copy_(dw)
        if uniform is not None and d_hidden is not None:
            uniform.add_to_hidden(d_hidden)
    elif needs.weight and weight.dtype != torch.float32:
        d_weight.zero_()
    if d_hidden is not None and hidden.dtype != torch.float32:
        d_hidden = d_hidden.to(hidden.dtype)
    if d_bias is not None and bias.dtype != torch.float32:
        d_bias = d_bias.to(bias.dtype)
    return Grads(d_hidden, d_weight, d_bias)


class _RankOneUniform:
    """The uniform term ``-c_t u_j / temperature`` of G without a softcap: an outer product.

    Its contributions are ``d_hidden[rows_t] -= c_t (u^T W) / T``, ``d_weight[j]
    -= u_j (c^T H[rows]) / T`` and ``d_bias[j] -= u_j sum(c) / T``: two (D,)
    vectors (from the operands rounded to the compute dtype, as the kernel
    sees them), built in chunks so no (M, D) or (V, D) fp32 copy exists.
    """

    _CHUNK = 4096

    def __init__(self, c, u, rows, u_weight, c_hidden, scale):
        self.c, self.u, self.rows = c, u, rows
        self.u_weight, self.c_hidden, self.scale = u_weight, c_hidden, scale
        self.bias_row_scale = c.sum() * scale  # a device scalar: no sync

    @classmethod
    def build(cls, hidden, head: Head, rows, c):
        if c is None:
            return None
        weight, class_weight, compute = head.weight, head.class_weight, head.compute_dtype
        V, M = weight.shape[0], c.numel()
        u = class_weight.to(torch.float32) if class_weight is not None else weight.new_ones(V, dtype=torch.float32)
        u_weight = sum(u[lo:lo + cls._CHUNK] @ weight[lo:lo + cls._CHUNK].to(compute).float()
                       for lo in range(0, V, cls._CHUNK))
        c_hidden = sum(c[lo:lo + cls._CHUNK] @ hidden[_token_slice(rows, lo, lo + cls._CHUNK)].to(compute).float()
                       for lo in range(0, M, cls._CHUNK))
        return cls(c, u, rows, u_weight, c_hidden, -head.inv_temperature)

    def add_to_weight_rows(self, d_weight_rows, d_bias_rows, v_lo, v_hi):
        if d_weight_rows is not None:
            d_weight_rows.addr_(self.u[v_lo:v_hi], self.c_hidden, alpha=self.scale)
        if d_bias_rows is not None:
            d_bias_rows.add_(self.u[v_lo:v_hi] * self.bias_row_scale)

    def add_to_hidden(self, d_hidden):
        M = self.c.numel()
        for lo in range(0, M, self._CHUNK):
            hi = min(lo + self._CHUNK, M)
            if self.rows is None:
                d_hidden[lo:hi].addr_(self.c[lo:hi], self.u_weight, alpha=self.scale)
            else:
                d_hidden.index_add_(0, self.rows[lo:hi], torch.outer(self.c[lo:hi], self.u_weight), alpha=self.scale)


def _token_slice(rows, lo, hi):
    return slice(lo, hi) if rows is None else rows[lo:hi]
