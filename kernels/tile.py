"""Building blocks shared by the forward and backward kernels.

A *logit tile* is the (BLOCK_N tokens x BLOCK_V vocabulary rows) block of
``hidden @ weight.T (+ bias)``, soft-capped if asked, accumulated in fp32 from a
loop over the hidden dimension. Both passes build it the same way, so the
backward recomputes exactly the logits the forward normalised.
"""

import os

import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1) stores bfloat16 as raw uint16 bits and
# its tl.dot multiplies those bits as integers; it also rounds fp32->bf16 by
# truncation. Upcasting the operands of a dot to fp32 is exact (products of
# bf16 values are exact in fp32), so under the interpreter we do that.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


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
    # tl has no tanh that works on every backend and the interpreter; this
    # form saturates correctly at +-inf (exp overflow -> 1, underflow -> -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr, softcap,
    h_rows, row_mask, cols, col_mask,
    D, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    """Logits of one tile, (BLOCK_N, BLOCK_V) fp32, before masking.

    h_rows: (BLOCK_N,) int64 element offset of each token's row in hidden
    (row * stride); cols: (BLOCK_V,) int64 vocabulary indices. Only these
    per-row / per-column offsets live across the loop: a loop-carried tensor of
    64-bit pointers per tile element costs ~2 registers per element and spills.
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
        acc = dot(h, w, acc, FP32_PRECISION)
    if not EVEN_D:
        k = (D // BLOCK_D) * BLOCK_D + offs_d
        h = tl.load(h_ptr + h_rows[:, None] + k[None, :] * stride_hd,
                    mask=row_mask[:, None] & (k < D)[None, :], other=0.0)
        w = tl.load(w_ptr + w_cols[None, :] + k[:, None] * stride_wd,
                    mask=col_mask[None, :] & (k < D)[:, None], other=0.0)
        acc = dot(h, w, acc, FP32_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc
