"""Forward pass: per-token log-sum-exp, label logit and statistics, without logits.

Each program owns BLOCK_N tokens and one contiguous slice ("split") of the
vocabulary. It streams that slice in BLOCK_V tiles, builds each logit tile from
tl.dot with fp32 accumulation, and keeps an online (max, sum-exp) per token -
plus, for the statistics, the sum of exp(z - max) * (z - max) (entropy) and the
first index of the max, and for label smoothing sum_j u_j z_j. Partials per
split are combined in PyTorch (dft_ops.backends.partials), so global
memory only ever holds O(tokens * splits) floats, never tokens x vocabulary.

With a second head (ASFT's reference model) each program also builds its tile r
(kernels/second_head.py) and keeps its online (max, sum-exp) and the two sums of
the gap ``(z - max) - (r - max_r)`` weighted by exp(z - max) and exp(r - max_r),
moved as either maximum grows: the KL's terms in the same pass, still without
logits, and free of any constant offset between the heads. With a mixture weight
(Distill's generalized JSD) a second pass, :mod:`~dft_ops.kernels.mixture`, sums
both heads' KLs to their mixture once both log-sum-exps are known.

Splitting the vocabulary keeps the GPU busy when there are few token tiles
(short sequences) and keeps the working set of weight tiles small enough for
L2 when there are many.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# absolute: transformers may import this directory as a top-level `kernels` when the
# repository root is on sys.path (it probes for Hugging Face's kernels package)
from dft_ops.backends.partials import combine_kl, combine_partials
from dft_ops.backends.protocol import ForwardStats, Head, Tokens, assert_inputs
from .launch import (MAX_SPLITS, Config, Launch, Tuner, bucket, device_arch, forward_splits, interpreting,  # noqa: F401
                     kernel_operands, sm_count, torch_to_tl)
from .second_head import second_even_d, second_head_inputs, second_head_key, tile_family
from .tile import cap_and_temper, class_weights, logit_tile, second_tile, token_inv_temperature


@triton.jit
def _lse_forward_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, cw_ptr,
    part_max_ptr, part_sumexp_ptr, part_ent_ptr, part_arg_ptr, part_smooth_ptr, target_logit_ptr,
    h2_ptr, w2_ptr, b2_ptr, part_max2_ptr, part_sumexp2_ptr, part_gap_ptr, part_gap2_ptr, inv_t_ptr,
    softcap, inv_softcap, inv_temperature, M, D, V, SPLITS,
    stride_hn, stride_hd, stride_wv, stride_wd,
    softcap2, inv_softcap2, D2, stride_h2n, stride_h2d, stride_w2v, stride_w2d,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    WITH_STATS: tl.constexpr, SMOOTHING: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    HAS_SECOND: tl.constexpr, HAS_BIAS2: tl.constexpr, HAS_SOFTCAP2: tl.constexpr,
    COMPUTE_DTYPE2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_D2: tl.constexpr, TOKEN_TEMPERATURE: tl.constexpr,
):
    pid = tl.program_id(0)
    # consecutive programs share a token tile and walk different splits, so the
    # few hidden tiles in flight stay in L2 while the weight streams through
    pid_s = pid % SPLITS
    pid_n = pid // SPLITS

    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < M
    if HAS_ROWS:
        rows = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    else:
        rows = offs.to(tl.int64)
    h_rows = rows * stride_hn
    # targets were clamped to [-1, V] by the launcher: int32 compares keep the
    # (tokens x vocab) masks narrow, and out-of-range labels never match a column
    y = tl.load(targets_ptr + offs, mask=row_mask, other=-1).to(tl.int32)
    # the call's 1 / temperature, or a (BLOCK_N, 1) column of each token's
    inv_t = token_inv_temperature(inv_t_ptr, offs, row_mask, inv_temperature, TOKEN_TEMPERATURE)

    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), SPLITS)
    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)

    # the running max starts at -inf (logits may all sit below any finite
    # sentinel); `shift` below keeps every exp() argument free of -inf - -inf
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ent = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m)
    arg = tl.zeros((BLOCK_N,), dtype=tl.int32) + v_lo
    smooth = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum u_j * z_j
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # the second head: its own online (max, sum-exp), and for x = z and x = r the gap sums
    # sum exp(x - max_x) * ((z - max_z) - (r - max_r)) (dft_ops.backends.partials.combine_kl)
    m_r = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sumexp_r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gap_r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        local = tl.arange(0, BLOCK_V)
        cols = v0 + local.to(tl.int64)
        col_mask = local < v_hi - v0
        if HAS_SECOND:
            # the second head's tile first: only it stays live through the model's product (after it,
            # the model's tile, its exponentials and the second head's product would all be)
            r = second_tile(
                h2_ptr, w2_ptr, b2_ptr, rows * stride_h2n, row_mask, cols, col_mask,
                softcap2, inv_softcap2, inv_t, D2, stride_h2d, stride_w2v, stride_w2d,
                HAS_BIAS2, HAS_SOFTCAP2, COMPUTE_DTYPE2, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D2,
                FP32_PRECISION,
            )
        u = logit_tile(
            h_ptr, w_ptr, b_ptr, h_rows, row_mask, cols, col_mask,
            D, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, COMPUTE_DTYPE, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, FP32_PRECISION,
        )
        z = cap_and_temper(u, softcap, inv_softcap, inv_t, HAS_SOFTCAP)
        # gathered from the same tile the max is taken over, so "label is the
        # argmax" is an exact comparison later
        zy += tl.sum(tl.where(local[None, :] == (y - v0)[:, None], z, 0.0), axis=1)
        if SMOOTHING:
            cw = class_weights(cw_ptr, cols, col_mask, HAS_CLASS_WEIGHT)
            # a zero weight times a -inf logit (masked vocabulary) is 0
            smooth += tl.sum(cw[None, :] * tl.where(cw[None, :] != 0.0, z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, tile_max)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        d = z - shift[:, None]
        e = tl.exp(d)
        if WITH_STATS:
            # e == 0 covers -inf logits (0 * -inf) and masked columns
            rescale = tl.where(sumexp > 0.0, m - shift, 0.0) * sumexp
            ent = alpha * (ent + rescale) + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=1)
            # first index of the tile's max. Read only where the tile raises the running max,
            # and there shift == tile_max, so d == 0 exactly at the max (x - y == 0 iff x == y).
            # Strictly greater: an earlier tile keeps a tie. (A min over column indices of d
            # costs fewer registers than tl.argmax's value/index pairs on z.)
            first = tl.min(tl.where(d == 0.0, local[None, :], BLOCK_V), axis=1)
            arg = tl.where(tile_max > m, v0 + first, arg)
        if HAS_SECOND:
            # Both heads' logits relative to their own running maxima (d, d_r): a constant offset between
            # the heads never enters the gap sums. r is finite on masked columns (zero loads), so the gap
            # there is -inf and never read; a column without probability (e == 0: masked, or a -inf
            # logit) adds 0 whatever its gap.
            m_r_new = tl.maximum(m_r, tl.max(tl.where(col_mask[None, :], r, float("-inf")), axis=1))
            shift_r = tl.where(m_r_new == float("-inf"), 0.0, m_r_new)
            alpha_r = tl.exp(m_r - shift_r)
            d_r = r - shift_r[:, None]
            e_r = tl.exp(tl.where(col_mask[None, :], d_r, float("-inf")))
            gap_tile = d - d_r
            # the sums so far are relative to the previous maxima (taken as 0 while -inf): move them
            # to the new ones, as the entropy sum is moved
            moved = ((tl.where(m == float("-inf"), 0.0, m) - shift)
                     - (tl.where(m_r == float("-inf"), 0.0, m_r) - shift_r))
            gap = alpha * (gap + moved * sumexp) + tl.sum(e * tl.where(e > 0.0, gap_tile, 0.0), axis=1)
            gap_r = alpha_r * (gap_r + moved * sumexp_r) + tl.sum(e_r * tl.where(e_r > 0.0, gap_tile, 0.0), axis=1)
            sumexp_r = sumexp_r * alpha_r + tl.sum(e_r, axis=1)
            m_r = m_r_new
        sumexp = sumexp * alpha + tl.sum(e, axis=1)
        m = m_new

    part = pid_s.to(tl.int64) * M + offs
    tl.store(part_max_ptr + part, m, mask=row_mask)
    tl.store(part_sumexp_ptr + part, sumexp, mask=row_mask)
    if WITH_STATS:
        tl.store(part_ent_ptr + part, ent, mask=row_mask)
        tl.store(part_arg_ptr + part, arg, mask=row_mask)
    if SMOOTHING:
        tl.store(part_smooth_ptr + part, smooth, mask=row_mask)
    if HAS_SECOND:
        tl.store(part_max2_ptr + part, m_r, mask=row_mask)
        tl.store(part_sumexp2_ptr + part, sumexp_r, mask=row_mask)
        tl.store(part_gap_ptr + part, gap, mask=row_mask)
        tl.store(part_gap2_ptr + part, gap_r, mask=row_mask)
    tl.store(target_logit_ptr + offs, zy, mask=row_mask & (y >= v_lo) & (y < v_hi))


# Each list holds only configurations that compile for sm_80 and sm_90 without
# spills and within shared memory, with every optional feature on and off
# (tests/test_compile.py keeps it that way). fp32 runs tf32x3 dots: three times
# the operand registers, hence smaller tiles.
CONFIGS = {
    "16bit": [
        Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        # Hopper only: on sm_80 under Triton 3.6 it needs an 8 B stack frame with a bf16 model and an fp32
        # head (autocast), and sits at 255 registers with fp32 operands rounded to bf16
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3, min_arch=90),
    ],
    # (64 x 128 x 32, 8 warps, was dropped: 255 registers on sm_80 with every input under Triton 3.6,
    # and 8 / 16 B of stack at a hidden size no BLOCK_D divides, on sm_80 / sm_90)
    "fp32": [
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=3),
    ],
    # with a second head (ASFT): its tile stays live through the model's product
    "16bit+second": [
        # BLOCK_D 32 spills on sm_80 with the gap sums live (and fp32 operands rounded to bf16)
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 16}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    ],
    # 128-row tiles spill on sm_80 with the gap sums live (a bf16 model beside an fp32 second head)
    "fp32+second": [
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    ],
}
# Small tiles under the interpreter: test shapes span several tiles each way.
INTERPRET_CONFIG = Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1)
TUNER = Tuner(CONFIGS, INTERPRET_CONFIG)


def _tile_blocks(config: Config, D: int, heavy_epilogue: bool) -> dict:
    """Per-config constexprs. Statistics, smoothing or a second head keep more per-element values
    live after the product (entropy and argmax terms, class weights, the model's tile during the
    second head's product): BLOCK_V is capped at 64 there, as 128-wide tiles spill on sm_80
    (tests/test_compile.py)."""
    block_v = min(config.blocks["BLOCK_V"], 64) if heavy_epilogue else config.blocks["BLOCK_V"]
    return {"BLOCK_V": block_v, "EVEN_D": D % config.blocks["BLOCK_D"] == 0}


def forward_launch(hidden, head: Head, tokens: Tokens, *, with_stats: bool, smoothing: bool, splits=None):
    """Build the forward launch and its output buffers (see :func:`lse_forward`); operands as
    :func:`~dft_ops.kernels.launch.kernel_operands` returns them."""
    targets, rows, inv_t = tokens.targets, tokens.rows, tokens.inv_temperature
    M = targets.numel()
    D = hidden.shape[1]
    weight, bias, second, class_weight = head.weight, head.bias, head.second, head.class_weight
    V = weight.shape[0]
    tiles = tile_family(head, second is not None)

    def splits_for(config: Config) -> int:
        if splits:
            return splits
        # the interpreter: a fixed small count, so tests combine several slices
        return (2 if V > 64 else 1) if interpreting() else forward_splits(config, M, V, sm_count(hidden.device))

    # partials for the most splits any allowed configuration takes; the picked one fills the first rows
    S = max(splits_for(c) for c in TUNER.allowed(tiles, device_arch(hidden.device))) \
        if not interpreting() else splits_for(INTERPRET_CONFIG)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    unused = torch.empty(1, **f32)
    out = {
        "part_max": torch.empty(S, M, **f32),
        "part_sumexp": torch.empty(S, M, **f32),
        "part_ent": torch.empty(S, M, **f32) if with_stats else unused,
        "part_arg": torch.empty(S, M, dtype=torch.int32, device=hidden.device) if with_stats else unused,
        "part_smooth": torch.empty(S, M, **f32) if smoothing else unused,
        "target_logit": torch.zeros(M, **f32),
    }
    for name in ("part_max2", "part_sumexp2", "part_gap", "part_gap2"):
        out[name] = torch.empty(S, M, **f32) if second is not None else unused
    second_args, second_constexprs = second_head_inputs(second, head.compute_dtype, unused)
    launch = Launch(
        kernel=_lse_forward_kernel,
        args=dict(
            h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else unused,
            rows_ptr=rows if rows is not None else targets, targets_ptr=targets,
            cw_ptr=class_weight if class_weight is not None else unused,
            part_max_ptr=out["part_max"], part_sumexp_ptr=out["part_sumexp"], part_ent_ptr=out["part_ent"],
            part_arg_ptr=out["part_arg"], part_smooth_ptr=out["part_smooth"], target_logit_ptr=out["target_logit"],
            part_max2_ptr=out["part_max2"], part_sumexp2_ptr=out["part_sumexp2"],
            part_gap_ptr=out["part_gap"], part_gap2_ptr=out["part_gap2"], **second_args,
            inv_t_ptr=inv_t if inv_t is not None else unused,
            softcap=float(head.softcap) if head.softcap is not None else 1.0, inv_softcap=head.inv_softcap,
            inv_temperature=head.inv_temperature, M=M, D=D, V=V,
            stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
            stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        ),
        constexprs=dict(
            HAS_BIAS=bias is not None, HAS_SOFTCAP=head.softcap is not None, HAS_ROWS=rows is not None,
            WITH_STATS=with_stats, SMOOTHING=smoothing, HAS_CLASS_WEIGHT=class_weight is not None,
            COMPUTE_DTYPE=torch_to_tl(head.compute_dtype), FP32_PRECISION="tf32x3", HAS_SECOND=second is not None,
            **second_constexprs, TOKEN_TEMPERATURE=inv_t is not None,
        ),
        grid=lambda c: (triton.cdiv(M, c.blocks["BLOCK_N"]) * splits_for(c),),
        per_config=lambda c: {**_tile_blocks(c, D, heavy_epilogue=with_stats or smoothing or second is not None),
                              "SPLITS": splits_for(c), "EVEN_D2": second_even_d(second, c.blocks["BLOCK_D"])},
        family=tiles,
    )
    return launch, out, splits_for


def lse_forward(hidden, head: Head, tokens: Tokens, *, with_stats=False, smoothing=False,
                splits=None) -> ForwardStats:
    """Per-token log-sum-exp and label logit of the contract's logits, without logits.

    Args:
        hidden: (N, D), any strides (stride(1) != 1: copied, see
            :func:`~dft_ops.kernels.launch.kernel_operands`).
        head: the :class:`~dft_ops.backends.protocol.Head`; its class weights
            are read for smoothing only; with a second head, also returns its
            lse2 and both KLs, from the same pass.
        tokens: the computed tokens (targets outside [0, V) give target_logit 0).
        with_stats: also return entropy, max logit and argmax.
        smoothing: also return smooth_sum = sum_j u_j z_j.
        splits: vocabulary slices to split over (default: from the picked tiles and the SM count,
            :func:`forward_splits`).

    Returns:
        :class:`~dft_ops.backends.protocol.ForwardStats`, each field (M,).
    """
    M = assert_inputs(hidden, head, tokens)
    two_heads = head.second is not None
    mixing = head.mix_weight is not None
    if M == 0:
        def empty(on, dtype=torch.float32):
            return torch.zeros(0, dtype=dtype, device=hidden.device) if on else None
        return ForwardStats(empty(True), empty(True), empty(with_stats), empty(with_stats),
                            empty(with_stats, torch.int64), empty(smoothing), empty(two_heads), empty(two_heads),
                            empty(two_heads), model_mix_kl=empty(mixing), second_mix_kl=empty(mixing))
    hidden, head, tokens, _ = kernel_operands(hidden, head, tokens, class_weight=smoothing, second=two_heads)
    launch, out, splits_for = forward_launch(hidden, head, tokens, with_stats=with_stats, smoothing=smoothing,
                                             splits=splits)
    key = (hidden.shape[1], head.weight.shape[0], hidden.dtype, head.weight.dtype, head.compute_dtype, bucket(M),
           head.bias is not None, head.softcap is not None, head.temperature is not None, with_stats, smoothing,
           head.class_weight is not None, splits, tokens.inv_temperature is not None, *second_head_key(head.second))
    S = splits_for(TUNER.run(launch, key))
    part_max, part_sumexp = out["part_max"][:S], out["part_sumexp"][:S]
    lse, max_logit, entropy, argmax = combine_partials(
        part_max, part_sumexp, out["part_ent"][:S] if with_stats else None,
        out["part_arg"][:S] if with_stats else None)
    second_lse = reverse_kl = forward_kl = None
    if two_heads:
        second_parts = out["part_max2"][:S], out["part_sumexp2"][:S]
        second_lse = combine_partials(*second_parts)[0]
        reverse_kl, forward_kl = combine_kl(part_max, part_sumexp, *second_parts, out["part_gap"][:S],
                                            out["part_gap2"][:S])
    model_mix_kl = second_mix_kl = None
    if mixing:  # the generalized JSD's KLs to the mixture need both lse first: a second pass
        from .mixture import mixture_kls

        model_mix_kl, second_mix_kl = mixture_kls(hidden, head, tokens, lse, second_lse, splits=splits)
    return ForwardStats(
        lse=lse, target_logit=out["target_logit"], entropy=entropy, max_logit=max_logit if with_stats else None,
        argmax=argmax, smooth_sum=out["part_smooth"][:S].sum(dim=0) if smoothing else None,
        second_lse=second_lse, reverse_kl=reverse_kl, forward_kl=forward_kl,
        model_mix_kl=model_mix_kl, second_mix_kl=second_mix_kl,
    )
