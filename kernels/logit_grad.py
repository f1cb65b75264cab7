"""The logit-gradient tile kernel: G of (a token chunk x a vocabulary split) into a workspace.

The GEMM backward (:mod:`dft_ops.kernels.gemm_backward`) needs the logit
gradient G (the contract's formula, :mod:`dft_ops.backends.protocol`) of a bounded block of
tokens x vocabulary rows as a dense matrix, so that cuBLAS can reduce it
against the weight (d_hidden) and the hidden states (d_weight) with the
reductions in its fp32 accumulators. This kernel recomputes that block's
logits exactly as the forward did (:func:`~dft_ops.kernels.tile.logit_grad_tile`,
shared with the fused kernel) and stores G rounded to the compute dtype -
nothing else: no atomics, no accumulation, so re-running it (tuning trials)
changes nothing.

Precise mode stores G as two parts of the compute dtype, ``hi = round(G)`` and
``lo = round(G - hi)``: G to about 16 significant bits, at the cost of two
products per gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

# absolute: transformers may import this directory as a top-level `kernels` when the
# repository root is on sys.path (it probes for Hugging Face's kernels package)
from dft_ops.backends.protocol import GradTerms, Head, Tokens
from .launch import Config, Launch, Tuner, family, torch_to_tl
from .second_head import second_even_d, second_head_inputs, tile_family
from .tile import (entropy_term, grouped_tile, logit_grad_tile, round_to, second_terms, token_inv_temperature,
                   token_terms)


@triton.jit
def _logit_grad_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, cw_ptr,
    h2_ptr, w2_ptr, b2_ptr, lse2_ptr, coef_e_ptr, coef_f_ptr,
    coef_g_ptr, mix_weight,
    g_ptr, g_lo_ptr, coef_k_ptr, inv_t_ptr,
    softcap, inv_softcap, inv_temperature, t_lo, t_count, v_lo, v_count, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_gn,
    softcap2, inv_softcap2, D2, stride_h2n, stride_h2d, stride_w2v, stride_w2d,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_UNIFORM: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, PRECISE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_GAP: tl.constexpr, HAS_BIAS2: tl.constexpr,
    HAS_SOFTCAP2: tl.constexpr, COMPUTE_DTYPE2: tl.constexpr,
    HAS_MIX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_D2: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, TOKEN_TEMPERATURE: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(t_count, BLOCK_N), tl.cdiv(v_count, BLOCK_V), GROUP_N)
    # i: row of G (token t_lo + i of the computed tokens); j: column of G (vocabulary row v_lo + j)
    i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = i < t_count
    col_mask = j < v_count
    rows, y, lse, coef_a, coef_b, coef_c = token_terms(
        t_lo + i, row_mask, rows_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, HAS_ROWS, HAS_UNIFORM)
    lse2, coef_e, coef_f, coef_g = second_terms(t_lo + i, row_mask, lse, lse2_ptr, coef_e_ptr, coef_f_ptr,
                                                coef_g_ptr,
                                                HAS_Q, HAS_GAP,
                                                HAS_MIX)
    coef_k = entropy_term(t_lo + i, row_mask, coef_k_ptr, lse, HAS_ENTROPY)
    inv_t = token_inv_temperature(inv_t_ptr, t_lo + i, row_mask, inv_temperature, TOKEN_TEMPERATURE)
    v0 = v_lo + pid_v * BLOCK_V
    g = logit_grad_tile(
        h_ptr, w_ptr, b_ptr, cw_ptr, rows * stride_hn, row_mask, v_lo + j.to(tl.int64), col_mask, y - v0, lse,
        coef_a, coef_b, coef_c, softcap, inv_softcap, inv_t, D, stride_hd, stride_wv, stride_wd,
        h2_ptr, w2_ptr, b2_ptr, rows * stride_h2n, lse2, coef_e, coef_f,
        coef_g, mix_weight,
        softcap2, inv_softcap2, D2, stride_h2d, stride_w2v, stride_w2d,
        HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, HAS_CLASS_WEIGHT, COMPUTE_DTYPE,
        HAS_Q, HAS_GAP, HAS_BIAS2, HAS_SOFTCAP2, COMPUTE_DTYPE2,
        HAS_MIX,
        BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, EVEN_D2, FP32_PRECISION, coef_k=coef_k, HAS_ENTROPY=HAS_ENTROPY,
    )
    # int64 row offsets: a large workspace passes 2**31 elements
    offsets = i.to(tl.int64)[:, None] * stride_gn + j[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    g_hi = round_to(g, COMPUTE_DTYPE)
    tl.store(g_ptr + offsets, g_hi, mask=mask)
    if PRECISE:
        tl.store(g_lo_ptr + offsets, round_to(g - g_hi.to(tl.float32), COMPUTE_DTYPE), mask=mask)


# Only configurations that compile without spills and within shared memory, with
# every feature on and off (tests/test_compile.py); ``min_arch=90`` ones are offered
# on Hopper only. The kernel keeps one fp32 accumulator tile and writes it: wider
# tiles than the fused kernel's fit (128 x 256 spills with every feature on).
CONFIGS = {
    "16bit": [
        Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
        # a deeper pipeline: fp32 operand tiles (mixed dtypes) need more shared memory than sm_80 has
        Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=8, num_stages=4, min_arch=90),
    ],
    "fp32": [
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP_N": 8}, num_warps=4, num_stages=3),
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP_N": 8}, num_warps=8, num_stages=3),
    ],
    # with a second head (ASFT): its tile stays live through the model's product
    "16bit+second": [
        Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP_N": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=4, num_stages=3),
    ],
    "fp32+second": [
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16, "GROUP_N": 8}, num_warps=4, num_stages=3),
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 16, "GROUP_N": 8}, num_warps=8, num_stages=3),
    ],
}
INTERPRET_CONFIG = Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16, "GROUP_N": 2}, num_warps=1, num_stages=1)
TUNER = Tuner(CONFIGS, INTERPRET_CONFIG)


def gradient_inputs(hidden, head: Head, tokens: Tokens, terms: GradTerms) -> tuple[dict, dict]:
    """(arguments, constexprs) of :func:`~dft_ops.kernels.tile.logit_grad_tile`'s inputs, for any kernel using it.

    The operands as :func:`~dft_ops.kernels.launch.kernel_operands` returns them
    (the class weights only with a uniform term, the second head only when
    ``terms`` reads it). Pointers a flag switches off point at ``terms.lse``
    (never read). ``EVEN_D2`` depends on the tile configuration
    (:func:`gradient_per_config`).
    """
    unused = terms.lse
    second = head.second if terms.reads_second_head else None
    second_args, second_constexprs = second_head_inputs(second, head.compute_dtype, unused)
    targets, rows, inv_t = tokens.targets, tokens.rows, tokens.inv_temperature
    weight, bias, class_weight = head.weight, head.bias, head.class_weight
    args = dict(
        h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else unused,
        rows_ptr=rows if rows is not None else targets, targets_ptr=targets, lse_ptr=terms.lse,
        coef_a_ptr=terms.softmax, coef_b_ptr=terms.target,
        coef_c_ptr=terms.uniform if terms.uniform is not None else unused,
        cw_ptr=class_weight if class_weight is not None else unused,
        softcap=float(head.softcap) if head.softcap is not None else 1.0, inv_softcap=head.inv_softcap,
        inv_temperature=head.inv_temperature, D=hidden.shape[1],
        stride_hn=hidden.stride(0), stride_hd=hidden.stride(1), stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        lse2_ptr=terms.second_lse if second is not None else unused,
        coef_e_ptr=terms.second if terms.second is not None else unused,
        coef_f_ptr=terms.gap if terms.gap is not None else unused, **second_args,
        coef_k_ptr=terms.entropy if terms.entropy is not None else unused,
        inv_t_ptr=inv_t if inv_t is not None else unused,
        coef_g_ptr=terms.mix_gap if terms.mix_gap is not None else unused,
        mix_weight=float(head.mix_weight) if terms.mix_gap is not None else 0.5,
    )
    constexprs = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=head.softcap is not None, HAS_ROWS=rows is not None,
        HAS_UNIFORM=terms.uniform is not None, HAS_CLASS_WEIGHT=terms.uniform is not None and class_weight is not None,
        COMPUTE_DTYPE=torch_to_tl(head.compute_dtype), FP32_PRECISION="tf32x3",
        HAS_Q=terms.second is not None, HAS_GAP=terms.gap is not None, **second_constexprs,
        HAS_ENTROPY=terms.entropy is not None, TOKEN_TEMPERATURE=inv_t is not None,
        HAS_MIX=terms.mix_gap is not None,
    )
    return args, constexprs


def gradient_per_config(config: Config, head: Head, terms: GradTerms) -> dict:
    """Constexprs of the logit-gradient inputs that depend on the tile configuration."""
    second = head.second if terms.reads_second_head else None
    return {"EVEN_D2": second_even_d(second, config.blocks["BLOCK_D"])}


def gradient_family(head: Head, terms: GradTerms, tokens: Tokens | None = None) -> str:
    """The tile-configuration family of a launch building G (fp32 when either head's products are).

    The "+second" tiles, which leave registers for more live values, also serve the entropy term and a
    temperature per token (dft_ops.token_logprobs): with them the plain tiles spill on sm_80 (8-16 B with
    precise + soft-cap + bias in the logit-gradient kernel under Triton 3.9, 8 B in the fused kernel's
    32 x 64 fp32 tile under 3.6; tests/test_compile_token_logprobs.py).
    """
    extra = terms.entropy is not None or (tokens is not None and tokens.inv_temperature is not None)
    if extra and not terms.reads_second_head:
        return family(head.compute_dtype) + "+second"
    return tile_family(head, terms.reads_second_head)


def logit_grad_launch(hidden, head: Head, tokens: Tokens, terms: GradTerms, g, g_lo, t_lo, t_hi, v_lo, v_hi):
    """The launch writing G of computed tokens [t_lo, t_hi) x vocabulary rows [v_lo, v_hi).

    g (and g_lo when precise): (t_hi - t_lo, v_hi - v_lo) views of the
    workspace in the compute dtype, unit stride along the vocabulary. The other
    inputs as in :func:`gradient_inputs`.
    """
    D = hidden.shape[1]
    t_count, v_count = t_hi - t_lo, v_hi - v_lo
    args, constexprs = gradient_inputs(hidden, head, tokens, terms)
    return Launch(
        kernel=_logit_grad_kernel,
        args=dict(args, g_ptr=g, g_lo_ptr=g_lo if g_lo is not None else g, t_lo=t_lo, t_count=t_count, v_lo=v_lo,
                  v_count=v_count, stride_gn=g.stride(0)),
        constexprs=dict(constexprs, PRECISE=g_lo is not None),
        grid=lambda c: (triton.cdiv(t_count, c.blocks["BLOCK_N"]) * triton.cdiv(v_count, c.blocks["BLOCK_V"]),),
        per_config=lambda c: {"EVEN_D": D % c.blocks["BLOCK_D"] == 0, **gradient_per_config(c, head, terms)},
        family=gradient_family(head, terms, tokens),
    )
