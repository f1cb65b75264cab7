"""The logit-gradient tile kernel: G of (a token chunk x a vocabulary split) into a workspace.

The GEMM backward (:mod:`dft_ops.kernels.gemm_backward`) needs the logit
gradient ``G = (a s - b onehot - c u - e q + f s (log s - log q)) dz/du`` of a bounded block of
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

import torch
import triton
import triton.language as tl

# absolute: transformers may import this directory as a top-level `kernels` when the
# repository root is on sys.path (it probes for Hugging Face's kernels package)
from dft_ops.backend_contract import GradCoefficients, logit_scales
from .launch import Config, Launch, Tuner, torch_to_tl, unit_column_strides, unit_stride_inputs
from .reference import reference_even_d, reference_inputs, tile_family
from .tile import grouped_tile, logit_grad_tile, reference_terms, round_to, token_terms


@triton.jit
def _logit_grad_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, cw_ptr,
    rh_ptr, rw_ptr, rb_ptr, ref_lse_ptr, coef_e_ptr, coef_f_ptr,
    g_ptr, g_lo_ptr,
    softcap, inv_softcap, inv_temperature, t_lo, t_count, v_lo, v_count, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_gn,
    ref_softcap, ref_inv_softcap, D_ref, stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_UNIFORM: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, PRECISE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    HAS_REF_Q: tl.constexpr, HAS_REF_GAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr,
    REF_HAS_SOFTCAP: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_D: tl.constexpr, REF_EVEN_D: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(t_count, BLOCK_N), tl.cdiv(v_count, BLOCK_V), GROUP_N)
    # i: row of G (token t_lo + i of the computed tokens); j: column of G (vocabulary row v_lo + j)
    i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = i < t_count
    col_mask = j < v_count
    rows, y, lse, coef_a, coef_b, coef_c = token_terms(
        t_lo + i, row_mask, rows_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, HAS_ROWS, HAS_UNIFORM)
    ref_lse, coef_e, coef_f = reference_terms(t_lo + i, row_mask, lse, ref_lse_ptr, coef_e_ptr, coef_f_ptr,
                                              HAS_REF_Q, HAS_REF_GAP)
    v0 = v_lo + pid_v * BLOCK_V
    g = logit_grad_tile(
        h_ptr, w_ptr, b_ptr, cw_ptr, rows * stride_hn, row_mask, v_lo + j.to(tl.int64), col_mask, y - v0, lse,
        coef_a, coef_b, coef_c, softcap, inv_softcap, inv_temperature, D, stride_hd, stride_wv, stride_wd,
        rh_ptr, rw_ptr, rb_ptr, rows * stride_rhn, ref_lse, coef_e, coef_f,
        ref_softcap, ref_inv_softcap, D_ref, stride_rhd, stride_rwv, stride_rwd,
        HAS_BIAS, HAS_SOFTCAP, HAS_UNIFORM, HAS_CLASS_WEIGHT, COMPUTE_DTYPE,
        HAS_REF_Q, HAS_REF_GAP, REF_HAS_BIAS, REF_HAS_SOFTCAP, REF_COMPUTE_DTYPE,
        BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, REF_EVEN_D, FP32_PRECISION,
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
    # with a reference head (ASFT): its tile stays live through the model's product
    "16bit+ref": [
        Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP_N": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=4, num_stages=3),
    ],
    "fp32+ref": [
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16, "GROUP_N": 8}, num_warps=4, num_stages=3),
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 16, "GROUP_N": 8}, num_warps=8, num_stages=3),
    ],
}
INTERPRET_CONFIG = Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16, "GROUP_N": 2}, num_warps=1, num_stages=1)
TUNER = Tuner(CONFIGS, INTERPRET_CONFIG)


def backward_operands(hidden, weight, bias, targets, rows, lse, coef: GradCoefficients, class_weight, reference,
                      ref_lse):
    """A backward's operands as its kernels read them, for both backward modes (M > 0).

    Unit-stride vectors and targets clamped (:func:`~dft_ops.kernels.launch.unit_stride_inputs`),
    matrices with unit column stride (:func:`~dft_ops.kernels.launch.unit_column_strides`),
    coefficients and log-sum-exps fp32; what ``coef`` does not read (the class
    weights without a uniform term, the reference without a reference or gap
    term) becomes None first, so it is never copied.

    Returns:
        (hidden, weight, bias, targets, rows, lse, coef, class_weight, reference, ref_lse).
    """
    if not coef.reads_reference:
        reference = ref_lse = None
    if coef.uniform is None:
        class_weight = None
    targets, rows, bias = unit_stride_inputs(targets, rows, bias, weight.shape[0])
    hidden, weight, reference = unit_column_strides(hidden, weight, reference)
    coef = GradCoefficients(*(t.to(torch.float32).contiguous() if t is not None else None for t in coef))
    lse = lse.to(torch.float32).contiguous()
    class_weight = class_weight.contiguous() if class_weight is not None else None
    ref_lse = ref_lse.to(torch.float32).contiguous() if ref_lse is not None else None
    return hidden, weight, bias, targets, rows, lse, coef, class_weight, reference, ref_lse


def gradient_inputs(hidden, weight, bias, targets, rows, lse, coef: GradCoefficients, class_weight, *, softcap,
                    temperature, compute, reference=None, ref_lse=None, compute_dtype=None) -> tuple[dict, dict]:
    """(arguments, constexprs) of :func:`~dft_ops.kernels.tile.logit_grad_tile`'s inputs, for any kernel using it.

    The (M,) / (V,) tensors must have unit stride and targets lie in [-1, V]
    (:func:`dft_ops.kernels.launch.unit_stride_inputs`); coefficients, lse and
    ref_lse fp32. Pointers a flag switches off point at ``lse`` (never read).
    The reference head is read only when ``coef`` has a reference or gap term.
    ``REF_EVEN_D`` depends on the tile configuration (:func:`gradient_per_config`).
    """
    unused = lse
    reference = reference if coef.reads_reference else None
    ref_args, ref_constexprs = reference_inputs(reference, compute, unused, compute_dtype)
    inv_softcap, inv_temperature = logit_scales(softcap, temperature)
    args = dict(
        h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else unused,
        rows_ptr=rows if rows is not None else targets, targets_ptr=targets, lse_ptr=lse,
        coef_a_ptr=coef.softmax, coef_b_ptr=coef.target,
        coef_c_ptr=coef.uniform if coef.uniform is not None else unused,
        cw_ptr=class_weight if class_weight is not None else unused,
        softcap=float(softcap) if softcap is not None else 1.0, inv_softcap=inv_softcap,
        inv_temperature=inv_temperature, D=hidden.shape[1],
        stride_hn=hidden.stride(0), stride_hd=hidden.stride(1), stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        ref_lse_ptr=ref_lse if coef.reads_reference else unused,
        coef_e_ptr=coef.reference if coef.reference is not None else unused,
        coef_f_ptr=coef.gap if coef.gap is not None else unused, **ref_args,
    )
    constexprs = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ROWS=rows is not None,
        HAS_UNIFORM=coef.uniform is not None, HAS_CLASS_WEIGHT=coef.uniform is not None and class_weight is not None,
        COMPUTE_DTYPE=torch_to_tl(compute), FP32_PRECISION="tf32x3",
        HAS_REF_Q=coef.reference is not None, HAS_REF_GAP=coef.gap is not None, **ref_constexprs,
    )
    return args, constexprs


def gradient_per_config(config: Config, reference) -> dict:
    """Constexprs of the logit-gradient inputs that depend on the tile configuration."""
    return {"REF_EVEN_D": reference_even_d(reference, config.blocks["BLOCK_D"])}


def gradient_family(compute, coef: GradCoefficients, reference, compute_dtype=None) -> str:
    """The tile-configuration family of a launch building G (fp32 when either head's products are)."""
    return tile_family(compute, reference if coef.reads_reference else None, compute_dtype)


def logit_grad_launch(hidden, weight, bias, targets, rows, lse, coef: GradCoefficients, class_weight, g, g_lo,
                      t_lo, t_hi, v_lo, v_hi, *, softcap, temperature, compute, reference=None, ref_lse=None,
                      compute_dtype=None):
    """The launch writing G of computed tokens [t_lo, t_hi) x vocabulary rows [v_lo, v_hi).

    g (and g_lo when precise): (t_hi - t_lo, v_hi - v_lo) views of the
    workspace in ``compute`` dtype, unit stride along the vocabulary. The other
    inputs as in :func:`gradient_inputs`.
    """
    D = hidden.shape[1]
    t_count, v_count = t_hi - t_lo, v_hi - v_lo
    reference = reference if coef.reads_reference else None
    args, constexprs = gradient_inputs(hidden, weight, bias, targets, rows, lse, coef, class_weight,
                                       softcap=softcap, temperature=temperature, compute=compute,
                                       reference=reference, ref_lse=ref_lse, compute_dtype=compute_dtype)
    return Launch(
        kernel=_logit_grad_kernel,
        args=dict(args, g_ptr=g, g_lo_ptr=g_lo if g_lo is not None else g, t_lo=t_lo, t_count=t_count, v_lo=v_lo,
                  v_count=v_count, stride_gn=g.stride(0)),
        constexprs=dict(constexprs, PRECISE=g_lo is not None),
        grid=lambda c: (triton.cdiv(t_count, c.blocks["BLOCK_N"]) * triton.cdiv(v_count, c.blocks["BLOCK_V"]),),
        per_config=lambda c: {"EVEN_D": D % c.blocks["BLOCK_D"] == 0, **gradient_per_config(c, reference)},
        family=gradient_family(compute, coef, reference, compute_dtype),
    )
