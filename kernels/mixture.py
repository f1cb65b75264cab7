"""The generalized JSD's mixture pass: both heads' KLs to their mixture, given both log-sum-exps.

``JSD(beta) = beta KL(q || m) + (1 - beta) KL(p || m)`` with the mixture ``m = beta q + (1 - beta) p``
is no online reduction: ``log m_j`` needs both heads' normalized probabilities, hence both heads'
log-sum-exps over the whole vocabulary first. The two-pass forward runs this pass after
:func:`~dft_ops.kernels.lse_forward.lse_forward` (which gives ``lse`` and ``lse2``): each program
rebuilds both heads' logit tiles of its token tile and vocabulary split exactly as the forward did
(:func:`~dft_ops.kernels.tile.second_tile` first, so only it is live through the model's product) and
sums per token

    sum_j p_j log(p_j / m_j)    and    sum_j q_j log(q_j / m_j)

with :func:`~dft_ops.kernels.tile.logs_over_mixture` of the heads' own log-ratio ``(z - lse) - (r -
lse2)`` (no offset between the heads enters). The sums are absolute (nothing to rescale as a maximum
moves): the splits' partials merge by a plain sum. A column without probability under the weighting
head adds 0.

Cost: the forward's products once more (2NDV + 2N D2 V); the one-pass head needs no such pass (its
row_stats reads its workspace a second time, :mod:`dft_ops.kernels.row_pass`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# absolute: see lse_forward.py
from dft_ops.backends.protocol import Head, Tokens
from .launch import Config, Launch, Tuner, bucket, device_arch, forward_splits, interpreting, sm_count, torch_to_tl
from .second_head import second_even_d, second_head_inputs, second_head_key, tile_family
from .tile import cap_and_temper, logit_tile, logs_over_mixture, second_tile


@triton.jit
def _mixture_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, lse_ptr, lse2_ptr,
    h2_ptr, w2_ptr, b2_ptr, part_model_ptr, part_second_ptr,
    softcap, inv_softcap, inv_temperature, mix_weight, M, D, V, SPLITS,
    stride_hn, stride_hd, stride_wv, stride_wd,
    softcap2, inv_softcap2, D2, stride_h2n, stride_h2d, stride_w2v, stride_w2d,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    HAS_BIAS2: tl.constexpr, HAS_SOFTCAP2: tl.constexpr, COMPUTE_DTYPE2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_D2: tl.constexpr,
):
    # the forward's order: consecutive programs share a token tile and walk different splits
    pid = tl.program_id(0)
    pid_s = pid % SPLITS
    pid_n = pid // SPLITS
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < M
    if HAS_ROWS:
        rows = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    else:
        rows = offs.to(tl.int64)
    # a row of -inf logits has lse -inf: shift by 0 instead, so its exponentials are 0, not NaN
    lse = tl.load(lse_ptr + offs, mask=row_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    lse2 = tl.load(lse2_ptr + offs, mask=row_mask, other=0.0)
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)

    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), SPLITS)
    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)
    to_model = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum p log(p / m)
    to_second = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum q log(q / m)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        local = tl.arange(0, BLOCK_V)
        cols = v0 + local.to(tl.int64)
        col_mask = local < v_hi - v0
        r = second_tile(
            h2_ptr, w2_ptr, b2_ptr, rows * stride_h2n, row_mask, cols, col_mask,
            softcap2, inv_softcap2, inv_temperature, D2, stride_h2d, stride_w2v, stride_w2d,
            HAS_BIAS2, HAS_SOFTCAP2, COMPUTE_DTYPE2, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D2,
            FP32_PRECISION,
        )
        u = logit_tile(
            h_ptr, w_ptr, b_ptr, rows * stride_hn, row_mask, cols, col_mask,
            D, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, COMPUTE_DTYPE, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, FP32_PRECISION,
        )
        # masked columns (zero loads: finite logits) get no probability under either head
        log_s = tl.where(col_mask[None, :], cap_and_temper(u, softcap, inv_softcap, inv_temperature, HAS_SOFTCAP)
                         - lse[:, None], float("-inf"))
        log_q = tl.where(col_mask[None, :], r - lse2[:, None], float("-inf"))
        s = tl.exp(log_s)
        q = tl.exp(log_q)
        over_s, over_q = logs_over_mixture(log_s - log_q, mix_weight)
        to_model += tl.sum(tl.where(s > 0.0, s * over_s, 0.0), axis=1)
        to_second += tl.sum(tl.where(q > 0.0, q * over_q, 0.0), axis=1)
    part = pid_s.to(tl.int64) * M + offs
    tl.store(part_model_ptr + part, to_model, mask=row_mask)
    tl.store(part_second_ptr + part, to_second, mask=row_mask)


# The forward's second-head tile lists (kernels/lse_forward.py): the same two tiles live through the
# model's product, fewer running sums after it. Each compiles for sm_80 and sm_90 without spills
# (tests/test_compile.py).
CONFIGS = {
    "16bit+second": [
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 16}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    ],
    # the forward's BLOCK_D 32 needs 24 B of stack on sm_80 with both heads in fp32 (two fp32 tiles and the
    # mixture's logarithms live together); 16 does not
    "fp32+second": [
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16}, num_warps=8, num_stages=3),
    ],
}
INTERPRET_CONFIG = Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1)
TUNER = Tuner(CONFIGS, INTERPRET_CONFIG)


def mixture_launch(hidden, head: Head, tokens: Tokens, lse, second_lse, *, splits=None):
    """The launch of :func:`mixture_kls` and its (splits, M) partial buffers; operands as
    :func:`~dft_ops.kernels.launch.kernel_operands` returns them (the second head kept)."""
    targets, rows = tokens.targets, tokens.rows
    M, D, V = targets.numel(), hidden.shape[1], head.weight.shape[0]
    weight, bias, second = head.weight, head.bias, head.second
    assert second is not None and head.mix_weight is not None and 0.0 < head.mix_weight < 1.0
    tiles = tile_family(head, True)

    def splits_for(config: Config) -> int:
        if splits:
            return splits
        return (2 if V > 64 else 1) if interpreting() else forward_splits(config, M, V, sm_count(hidden.device))

    S = max(splits_for(c) for c in TUNER.allowed(tiles, device_arch(hidden.device))) \
        if not interpreting() else splits_for(INTERPRET_CONFIG)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    parts = torch.empty(2, S, M, **f32)
    unused = parts
    second_args, second_constexprs = second_head_inputs(second, head.compute_dtype, unused)
    launch = Launch(
        kernel=_mixture_kernel,
        args=dict(
            h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else unused,
            rows_ptr=rows if rows is not None else targets, lse_ptr=lse.contiguous(),
            lse2_ptr=second_lse.contiguous(), part_model_ptr=parts[0], part_second_ptr=parts[1], **second_args,
            softcap=float(head.softcap) if head.softcap is not None else 1.0, inv_softcap=head.inv_softcap,
            inv_temperature=head.inv_temperature, mix_weight=float(head.mix_weight), M=M, D=D, V=V,
            stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
            stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        ),
        constexprs=dict(
            HAS_BIAS=bias is not None, HAS_SOFTCAP=head.softcap is not None, HAS_ROWS=rows is not None,
            COMPUTE_DTYPE=torch_to_tl(head.compute_dtype), FP32_PRECISION="tf32x3", **second_constexprs,
        ),
        grid=lambda c: (triton.cdiv(M, c.blocks["BLOCK_N"]) * splits_for(c),),
        per_config=lambda c: {"SPLITS": splits_for(c), "EVEN_D": D % c.blocks["BLOCK_D"] == 0,
                              "EVEN_D2": second_even_d(second, c.blocks["BLOCK_D"])},
        family=tiles,
    )
    return launch, parts, splits_for


def mixture_kls(hidden, head: Head, tokens: Tokens, lse, second_lse, *, splits=None) -> tuple:
    """``(KL(p || m), KL(q || m))``, each (M,) float32, of the computed tokens (M > 0).

    Args:
        hidden, head, tokens: as :func:`~dft_ops.kernels.lse_forward.lse_forward` has them after
            :func:`~dft_ops.kernels.launch.kernel_operands` (the second head kept); ``head.mix_weight``
            is beta, the second head's weight in the mixture ``m = beta q + (1 - beta) p``.
        lse, second_lse: (M,) float32 log-sum-exps of both heads (the forward's).
        splits: vocabulary slices (None: as the forward picks them).
    """
    launch, parts, splits_for = mixture_launch(hidden, head, tokens, lse, second_lse, splits=splits)
    key = (hidden.shape[1], head.weight.shape[0], hidden.dtype, head.weight.dtype, head.compute_dtype,
           bucket(tokens.targets.numel()), head.bias is not None, head.softcap is not None,
           head.temperature is not None, tokens.rows is not None, splits, *second_head_key(head.second))
    S = splits_for(TUNER.run(launch, key))
    model, second = parts[:, :S].sum(dim=1)
    return model, second
