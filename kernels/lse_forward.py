"""Forward pass: per-token log-sum-exp, label logit and statistics, without logits.

Each program owns BLOCK_N tokens and one contiguous slice ("split") of the
vocabulary. It streams that slice in BLOCK_V tiles, builds each logit tile from
tl.dot with fp32 accumulation, and keeps an online (max, sum-exp) per token -
plus, for the entropy, the sum of exp(z - max) * (z - max). Partials per split
are combined in PyTorch, so global memory only ever holds O(tokens * splits)
floats, never tokens x vocabulary.

Splitting the vocabulary keeps the GPU busy when there are few token tiles
(short sequences) and keeps the working set of weight tiles small enough for
L2 when there are many.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Config, Launch, Tuner, bucket, family, interpreting
from .tile import logit_tile

# fp32 max starts here rather than at -inf so that the first rescale
# (m_old - m_new) * sum_old is 0 * finite, not -inf * 0.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _lse_forward_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr,
    part_max_ptr, part_sumexp_ptr, part_ent_ptr, target_logit_ptr,
    softcap, M, D, V, SPLITS,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    WITH_STATS: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
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
    # labels < V < 2**31: int32 compares keep the (tokens x vocab) masks narrow
    y = tl.load(targets_ptr + offs, mask=row_mask, other=-1).to(tl.int32)

    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), SPLITS)
    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)

    m = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ent = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        local = tl.arange(0, BLOCK_V)
        cols = v0 + local.to(tl.int64)
        col_mask = local < v_hi - v0
        z = logit_tile(
            h_ptr, w_ptr, b_ptr, softcap, h_rows, row_mask, cols, col_mask,
            D, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, FP32_PRECISION,
        )
        # gathered from the same tile the max is taken over, so "label is the
        # argmax" is an exact comparison later
        zy += tl.sum(tl.where(local[None, :] == (y - v0)[:, None], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        if WITH_STATS:
            ez = e * tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            ent = alpha * (ent + (m - m_new) * sumexp) + tl.sum(ez, axis=1)
        sumexp = sumexp * alpha + tl.sum(e, axis=1)
        m = m_new

    part = pid_s.to(tl.int64) * M + offs
    tl.store(part_max_ptr + part, m, mask=row_mask)
    tl.store(part_sumexp_ptr + part, sumexp, mask=row_mask)
    if WITH_STATS:
        tl.store(part_ent_ptr + part, ent, mask=row_mask)
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
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    ],
    "fp32": [
        Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=3),
    ],
}
# Small tiles under the interpreter: test shapes span several tiles each way.
INTERPRET_CONFIG = Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1)
TUNER = Tuner(CONFIGS, INTERPRET_CONFIG)


def default_splits(n_tokens: int, vocab: int, device: torch.device) -> int:
    """How many vocabulary slices to split the forward over (>= 1)."""
    if interpreting():
        return 2 if vocab > 64 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_tiles = triton.cdiv(n_tokens, 128)
    # two waves of programs; the (splits, tokens) partials stay <= 32 per token
    return max(1, min(triton.cdiv(2 * sms, token_tiles), 32, triton.cdiv(vocab, 1024)))


def forward_launch(hidden, weight, bias, targets, rows, *, softcap, with_stats, splits=None):
    """Build the forward launch and its output buffers (see :func:`lse_forward`)."""
    M = targets.numel()
    D = hidden.shape[1]
    V = weight.shape[0]
    S = splits or default_splits(M, V, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    out = {
        "part_max": torch.empty(S, M, **f32),
        "part_sumexp": torch.empty(S, M, **f32),
        "part_ent": torch.empty(S, M, **f32) if with_stats else torch.empty(1, **f32),
        "target_logit": torch.zeros(M, **f32),
    }
    launch = Launch(
        kernel=_lse_forward_kernel,
        args=dict(
            h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else weight,
            rows_ptr=rows if rows is not None else targets, targets_ptr=targets,
            part_max_ptr=out["part_max"], part_sumexp_ptr=out["part_sumexp"],
            part_ent_ptr=out["part_ent"], target_logit_ptr=out["target_logit"],
            softcap=float(softcap) if softcap is not None else 1.0, M=M, D=D, V=V, SPLITS=S,
            stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
            stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        ),
        constexprs=dict(
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ROWS=rows is not None,
            WITH_STATS=with_stats, FP32_PRECISION="tf32x3",
        ),
        grid=lambda c: (triton.cdiv(M, c.blocks["BLOCK_N"]) * S,),
        per_config=lambda c: {"EVEN_D": D % c.blocks["BLOCK_D"] == 0},
        family=family(hidden.dtype),
    )
    return launch, out


def lse_forward(hidden, weight, bias, targets, rows=None, *, softcap=None, with_stats=False, splits=None):
    """Per-token log-sum-exp and label logit of ``hidden @ weight.T + bias``.

    Args:
        hidden: (N, D) fp32/bf16/fp16, any strides.
        weight: (V, D) same dtype as hidden.
        bias: (V,) or None.
        targets: (M,) int64 label of each computed token, in [0, V).
        rows: (M,) int64 row of ``hidden`` for each computed token, or None
            for rows 0..M-1 (then M == N).
        softcap: logits become softcap * tanh(logits / softcap) when given.
        with_stats: also return the entropy and the max logit.
        splits: vocabulary slices to split over (default: by device size).

    Returns:
        (lse, target_logit, entropy, max_logit), each (M,) float32; the last
        two are None unless ``with_stats``.
    """
    M = targets.numel()
    if M == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone(), (empty.clone() if with_stats else None), (empty.clone() if with_stats else None)
    launch, out = forward_launch(hidden, weight, bias, targets, rows, softcap=softcap,
                                 with_stats=with_stats, splits=splits)
    key = (hidden.shape[1], weight.shape[0], hidden.dtype, bucket(M), bias is not None, softcap is not None, with_stats)
    TUNER.run(launch, key)
    return combine_splits(out["part_max"], out["part_sumexp"], out["part_ent"] if with_stats else None,
                          out["target_logit"])


def combine_splits(part_max, part_sumexp, part_ent, target_logit):
    """Merge per-split online softmax partials, each (S, M), into per-token values."""
    if part_max.shape[0] == 1:
        max_logit, sumexp = part_max[0], part_sumexp[0]
        ent = part_ent[0] if part_ent is not None else None
    else:
        max_logit = part_max.max(dim=0).values
        delta = part_max - max_logit  # <= 0; -1e30 for empty splits
        scale = torch.exp(delta)
        sumexp = (part_sumexp * scale).sum(dim=0)
        ent = (scale * (part_ent + delta * part_sumexp)).sum(dim=0) if part_ent is not None else None
    log_sumexp = torch.log(sumexp)
    lse = max_logit + log_sumexp
    if ent is None:
        return lse, target_logit, None, None
    # H = lse - E[z] = log(sumexp) - E[z - max]: both terms O(1), no cancellation of large logits
    entropy = log_sumexp - ent / sumexp
    return lse, target_logit, entropy, max_logit
