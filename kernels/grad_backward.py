"""Backward pass: gradients of hidden, weight and bias from recomputed logit tiles.

The loss of every objective has the gradient ``scale_t * (softmax - onehot)``
w.r.t. the logits of token t, where ``scale_t`` is the upstream gradient times
the objective's detached weight (0 for ignored tokens). Each program owns one
(BLOCK_N tokens x BLOCK_V vocabulary) tile: it rebuilds the logits exactly as
the forward did, forms that gradient G in fp32, and adds ``G @ W`` into
d(hidden) and ``G.T @ H`` into d(weight), BLOCK_DM columns at a time, with fp32
atomics. Nothing of size tokens x vocabulary reaches global memory.

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

from .launch import Config, Launch, Tuner, bucket, family
from .tile import dot, logit_tile


@triton.jit
def _grad_backward_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, scale_ptr, filter_ptr,
    dh_ptr, dw_ptr, db_ptr,
    softcap, M, D, v_lo, v_hi,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn, stride_dwv,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_FILTER: tl.constexpr, GRAD_HIDDEN: tl.constexpr, GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DM: tl.constexpr,
    GROUP_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DM: tl.constexpr,
):
    # Grouped order: GROUP_N token tiles sweep the vocabulary together, so a
    # weight tile is read from HBM once per group and the group's hidden tiles
    # stay in L2.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(M, BLOCK_N)
    v_tiles = tl.cdiv(v_hi - v_lo, BLOCK_V)
    per_group = GROUP_N * v_tiles
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_tiles - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < M
    scale = tl.load(scale_ptr + offs, mask=row_mask, other=0.0)
    # tiles of ignored tokens (or zero upstream gradient) add exactly nothing
    if tl.max(tl.abs(scale), axis=0) == 0.0:
        return

    if HAS_ROWS:
        rows = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    else:
        rows = offs.to(tl.int64)
    lse = tl.load(lse_ptr + offs, mask=row_mask, other=0.0)

    # tile-local int32 column indices for compares, int64 only for addresses
    v0 = v_lo + pid_v * BLOCK_V
    local = tl.arange(0, BLOCK_V)
    cols = v0 + local.to(tl.int64)
    col_mask = local < v_hi - v0
    y_local = tl.load(targets_ptr + offs, mask=row_mask, other=-1).to(tl.int32) - v0
    z = logit_tile(
        h_ptr, w_ptr, b_ptr, softcap, rows * stride_hn, row_mask, cols, col_mask,
        D, stride_hd, stride_wv, stride_wd,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, FP32_PRECISION,
    )
    g = tl.exp(z - lse[:, None]) - tl.where(local[None, :] == y_local[:, None], 1.0, 0.0)
    g = g * scale[:, None]
    if HAS_SOFTCAP:
        # z is already capped: d(c tanh(u/c))/du = 1 - (z/c)^2
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
    if HAS_FILTER:
        # gradient filtering (opt-in): skip tiles whose every entry is negligible
        if tl.max(tl.max(tl.abs(g), axis=1), axis=0) < tl.load(filter_ptr):
            return

    local_cols = cols - v_lo
    if GRAD_BIAS:
        tl.atomic_add(db_ptr + local_cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")

    gq = g.to(h_ptr.dtype.element_ty)
    # Two passes over D rather than one: a single loop keeps G live in both
    # dot-operand layouts (G and G.T) at once, and that register pressure
    # spills. Each pass runs whole BLOCK_DM steps, then one masked ragged step.
    if GRAD_HIDDEN:
        # d_hidden[rows] += G @ W[cols]
        _add_product(gq, w_ptr, cols * stride_wv, col_mask, stride_wd, dh_ptr, rows * stride_dhn, row_mask,
                     D, EVEN_DM, BLOCK_N, BLOCK_DM, FP32_PRECISION)
    if GRAD_WEIGHT:
        # d_weight[cols] += G.T @ H[rows]
        _add_product(tl.trans(gq), h_ptr, rows * stride_hn, row_mask, stride_hd, dw_ptr, local_cols * stride_dwv,
                     col_mask, D, EVEN_DM, BLOCK_V, BLOCK_DM, FP32_PRECISION)


@triton.jit
def _add_product(a, src_ptr, src_rows, src_mask, stride_src_d, dst_ptr, dst_rows, dst_mask, D,
                 EVEN_DM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DM: tl.constexpr,
                 FP32_PRECISION: tl.constexpr):
    """dst[dst_rows, :D] += a @ src[src_rows, :D], BLOCK_DM columns at a time, fp32 atomics.

    a: (BLOCK_M, K) gradient tile; src_rows: (K,) int64 element offsets of the
    source rows; dst_rows: (BLOCK_M,) int64 offsets into the fp32 buffer (unit
    stride along D). Whole steps carry only row masks; a ragged end of D gets one
    peeled masked step.
    """
    for d in range(0, D // BLOCK_DM):
        _add_product_step(a, src_ptr, src_rows, src_mask, stride_src_d, dst_ptr, dst_rows, dst_mask,
                          d * BLOCK_DM, D, False, BLOCK_M, BLOCK_DM, FP32_PRECISION)
    if not EVEN_DM:
        _add_product_step(a, src_ptr, src_rows, src_mask, stride_src_d, dst_ptr, dst_rows, dst_mask,
                          (D // BLOCK_DM) * BLOCK_DM, D, True, BLOCK_M, BLOCK_DM, FP32_PRECISION)


@triton.jit
def _add_product_step(a, src_ptr, src_rows, src_mask, stride_src_d, dst_ptr, dst_rows, dst_mask, d0, D,
                      MASK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DM: tl.constexpr,
                      FP32_PRECISION: tl.constexpr):
    k = d0 + tl.arange(0, BLOCK_DM)
    src_m = src_mask[:, None]
    dst_m = dst_mask[:, None]
    if MASK_D:
        src_m = src_m & (k < D)[None, :]
        dst_m = dst_m & (k < D)[None, :]
    src = tl.load(src_ptr + src_rows[:, None] + k[None, :] * stride_src_d, mask=src_m, other=0.0)
    prod = dot(a, src, tl.zeros((BLOCK_M, BLOCK_DM), dtype=tl.float32), FP32_PRECISION)
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
}
INTERPRET_CONFIG = Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16, "BLOCK_DM": 16, "GROUP_N": 2},
                          num_warps=1, num_stages=1)
TUNER = Tuner(CONFIGS, INTERPRET_CONFIG)

# rows of the fp32 d(weight) chunk buffer: about 32 MB whatever the hidden size
_CHUNK_BYTES = 32 * 1024 * 1024


def default_vocab_chunk(vocab: int, hidden_size: int) -> int:
    rows = max(1024, _CHUNK_BYTES // (4 * hidden_size))
    return min(vocab, rows)


def _d_blocks(config: Config, D: int) -> dict:
    """Hidden-dimension constexprs: BLOCK_DM shrinks (not below 16) until it divides D.

    A ragged last step in the d(hidden) / d(weight) passes keeps G live across
    extra code and spills on sm_80; every hidden size that is a multiple of 16
    avoids it this way. Sizes that are not (no vectorized loads either) take the
    masked tail step.
    """
    block_dm = config.blocks["BLOCK_DM"]
    while block_dm > 16 and D % block_dm:
        block_dm //= 2
    return {"BLOCK_DM": block_dm, "EVEN_DM": D % block_dm == 0, "EVEN_D": D % config.blocks["BLOCK_D"] == 0}


def backward_launch(hidden, weight, bias, targets, rows, lse, grad_scale, filter_threshold,
                    d_hidden, d_weight_chunk, d_bias_chunk, v_lo, v_hi, *, softcap):
    """The launch for vocabulary rows [v_lo, v_hi); d_weight_chunk/d_bias_chunk start at row v_lo."""
    M = targets.numel()
    D = hidden.shape[1]
    any_buf = lse  # stands in for pointers a flag switches off
    return Launch(
        kernel=_grad_backward_kernel,
        args=dict(
            h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else weight,
            rows_ptr=rows if rows is not None else targets, targets_ptr=targets, lse_ptr=lse,
            scale_ptr=grad_scale, filter_ptr=filter_threshold if filter_threshold is not None else any_buf,
            dh_ptr=d_hidden if d_hidden is not None else any_buf,
            dw_ptr=d_weight_chunk if d_weight_chunk is not None else any_buf,
            db_ptr=d_bias_chunk if d_bias_chunk is not None else any_buf,
            softcap=float(softcap) if softcap is not None else 1.0, M=M, D=D, v_lo=v_lo, v_hi=v_hi,
            stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
            stride_wv=weight.stride(0), stride_wd=weight.stride(1),
            stride_dhn=d_hidden.stride(0) if d_hidden is not None else 0,
            stride_dwv=d_weight_chunk.stride(0) if d_weight_chunk is not None else 0,
        ),
        constexprs=dict(
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ROWS=rows is not None,
            HAS_FILTER=filter_threshold is not None, GRAD_HIDDEN=d_hidden is not None,
            GRAD_WEIGHT=d_weight_chunk is not None, GRAD_BIAS=d_bias_chunk is not None,
            FP32_PRECISION="tf32x3",
        ),
        grid=lambda c: (triton.cdiv(M, c.blocks["BLOCK_N"]) * triton.cdiv(v_hi - v_lo, c.blocks["BLOCK_V"]),),
        per_config=lambda c: _d_blocks(c, D),
        accumulators=[t for t in (d_hidden, d_weight_chunk, d_bias_chunk) if t is not None],
        family=family(hidden.dtype),
    )


def grad_backward(hidden, weight, bias, targets, rows, lse, grad_scale, *, softcap=None,
                  need_hidden=True, need_weight=True, need_bias=False, filter_eps=None, vocab_chunk=None):
    """Gradients of ``sum_t grad_scale_t * loss_t`` w.r.t. hidden, weight and bias.

    Args:
        hidden, weight, bias, targets, rows, softcap: as in :func:`lse_forward`.
        lse: (M,) fp32 log-sum-exp from the forward.
        grad_scale: (M,) fp32 per-token factor (upstream gradient x objective
            weight); the logit gradient of token t is grad_scale_t * (softmax - onehot).
        need_hidden / need_weight / need_bias: which gradients to build.
        filter_eps: skip a tile when every |gradient| in it is below
            filter_eps * max|grad_scale| (None: exact).
        vocab_chunk: vocabulary rows per launch (bounds the fp32 d(weight) buffer).

    Returns:
        (d_hidden (N, D) hidden.dtype | None, d_weight (V, D) weight.dtype | None,
        d_bias (V,) bias.dtype | None). Rows of hidden not in ``rows`` get 0.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    M = targets.numel()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(N, D, **f32) if need_hidden else None
    d_bias = torch.zeros(V, **f32) if need_bias else None
    d_weight = None
    if need_weight:
        d_weight = torch.zeros(V, D, **f32) if weight.dtype == torch.float32 else torch.empty_like(weight)
    if M > 0:
        fp32_weight = weight.dtype == torch.float32
        chunk = V if fp32_weight else (vocab_chunk or default_vocab_chunk(V, D))
        scratch = torch.empty(min(chunk, V), D, **f32) if need_weight and not fp32_weight else None
        threshold = None
        if filter_eps is not None:
            threshold = (grad_scale.abs().max() * filter_eps).to(torch.float32).reshape(1)
        for v_lo in range(0, V, chunk):
            v_hi = min(v_lo + chunk, V)
            dw = None
            if need_weight:
                dw = d_weight[v_lo:v_hi] if fp32_weight else scratch[: v_hi - v_lo].zero_()
            launch = backward_launch(
                hidden, weight, bias, targets, rows, lse, grad_scale, threshold,
                d_hidden, dw, d_bias[v_lo:v_hi] if need_bias else None, v_lo, v_hi, softcap=softcap,
            )
            key = (D, hidden.dtype, bucket(M), bias is not None, softcap is not None,
                   need_hidden, need_weight, need_bias, filter_eps is not None)
            TUNER.run(launch, key)
            if need_weight and not fp32_weight:
                d_weight[v_lo:v_hi].copy_(dw)
    elif need_weight and weight.dtype != torch.float32:
        d_weight.zero_()
    if d_hidden is not None and hidden.dtype != torch.float32:
        d_hidden = d_hidden.to(hidden.dtype)
    if d_bias is not None and bias is not None and bias.dtype != torch.float32:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias
