"""Backward pass at GEMM speed: logit-gradient tiles per vocabulary split, reduced by cuBLAS.

The fused backward (:mod:`dft_ops.kernels.fused_backward`) reduces d(hidden)
over the vocabulary and d(weight) over the tokens with fp32 atomics, one per
(token tile x vocabulary tile) and output element: about N.D.V.(1/BLOCK_V +
1/BLOCK_N) additions through L2, several times the GEMM time at LM-head sizes.
Here every reduction is the K loop of a GEMM instead:

    for each vocabulary split s (rows [v_lo, v_hi), whole tiles):
        for each token chunk c (all computed tokens when they fit):
            G = logit gradient of (c x s)           # kernels/logit_grad.py, into the workspace
            d_hidden[c] += G @ W[s]                 # fp32 accumulation (cuBLAS)
            d_weight[s] (+)= G.T @ H[c]             # rows owned by the split: written once
            d_bias[s] += G.sum(0)

Costs 8NDV of GEMM-speed work (forward 2, recompute 2, two products 4) plus
the memory traffic of G (written once, read twice) and of the fp32 d(hidden)
accumulator (read and written once per split), and a workspace of
chunk x split elements of the compute dtype, bounded by ``workspace_bytes``
(:func:`plan_splits`).

Ignored tokens never enter G: the rows are the layout's computed tokens, and
the hidden rows of a chunk are gathered (bounded: one chunk at a time) only
when the layout dropped some. G is stored in the compute dtype (bf16/fp16 for
16-bit products: the trade every fused peer makes; the GEMMs accumulate in
fp32), fp32 for fp32 products. ``precise`` stores G as two 16-bit parts
(high + low) and runs each product twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# absolute: transformers may import this directory as a top-level `kernels` when the
# repository root is on sys.path (it probes for Hugging Face's kernels package)
from dft_ops.backends.protocol import DEFAULT_WORKSPACE_MB, MB, Grads, GradTerms, Head, Needs, Tokens, assert_inputs
from . import logit_grad
from .launch import Config, bucket, interpreting, kernel_operands, round_down
from dft_ops.backends.products import add_product, write_product
from .second_head import second_head_key

# Splits narrower than this many tiles make the fp32 d(hidden) accumulator's traffic (8 bytes
# per token and hidden unit, every split) rival the GEMM itself: chunk the tokens instead.
# (Two under the interpreter, so that small test vocabularies take several splits.)
MIN_SPLIT_TILES = 32
MIN_SPLIT_TILES_INTERPRETED = 2
# rows gathered / cast per copy when staging hidden rows or writing d(hidden) back: bounds the temporaries
_COPY_ROWS = 4096


@dataclass(frozen=True)
class SplitPlan:
    """How the backward walks (computed tokens x vocabulary), and the memory it takes.

    Attributes:
        split: vocabulary rows per split (the last one may be shorter).
        chunk: computed tokens per chunk (the last one may be shorter); all of them when they fit.
        parts: G parts, 1 or 2 (precise: high + low).
        stage_hidden: hidden rows are gathered (ignored tokens dropped) or cast to the
            compute dtype, one chunk at a time, for d(weight).
        stage_weight: weight rows are cast to the compute dtype, one split at a time, for d(hidden).
        weight_scratch: d(weight) rows of a split accumulate in an fp32 (split x D) buffer
            (several chunks or parts, or a 16-bit weight of another dtype than the products).
        workspace_bytes: all of the above: G, the staged rows and the scratch.
    """

    split: int
    chunk: int
    parts: int
    stage_hidden: bool
    stage_weight: bool
    weight_scratch: bool
    workspace_bytes: int


def plan_splits(M: int, V: int, D: int, *, compute: torch.dtype, hidden_dtype: torch.dtype,
                weight_dtype: torch.dtype, has_rows: bool, need_hidden: bool, need_weight: bool, precise: bool,
                workspace_bytes: int) -> SplitPlan:
    """Splits and chunks within ``workspace_bytes``, in whole tiles of every G-kernel configuration.

    All computed tokens in one chunk and the widest split that fits, as long as
    it is at least MIN_SPLIT_TILES tiles (or all of V); else splits of that
    width and token chunks as large as fit; with a budget too small for one
    tile-high chunk of such a split, one-tile chunks and the widest split that
    fits, at least one tile (so any budget works; the smallest plan may exceed
    a budget below one tile x one tile).
    """
    tile_n, tile_v = tile_granules()
    min_split = min(V, (MIN_SPLIT_TILES_INTERPRETED if interpreting() else MIN_SPLIT_TILES) * tile_v)
    item = compute.itemsize
    parts = 2 if precise and compute != torch.float32 else 1
    stage_hidden = need_weight and (has_rows or hidden_dtype != compute)
    stage_weight = need_hidden and weight_dtype != compute
    per_logit = item * parts
    per_token = D * item if stage_hidden else 0
    per_row = D * item if stage_weight else 0

    def scratch(chunk: int) -> bool:
        return need_weight and weight_dtype != torch.float32 and (
            chunk < M or parts > 1 or weight_dtype != compute)

    def size(chunk: int, split: int, scratch_rows: bool) -> int:
        return chunk * split * per_logit + chunk * per_token + split * (per_row + (4 * D if scratch_rows else 0))

    def row_bytes(chunk: int) -> int:
        return per_row + (4 * D if scratch(chunk) else 0)

    budget = workspace_bytes
    # every token in one chunk, the widest split that fits
    chunk = M
    split = min(V, round_down((budget - M * per_token) // (M * per_logit + row_bytes(M)), tile_v))
    if split < min_split or size(chunk, split, scratch(chunk)) > budget:
        # token chunks (d(weight) rows then accumulate in the fp32 scratch), as many as fit
        split = min_split
        chunk = round_down((budget - split * row_bytes(0)) // (split * per_logit + per_token), tile_n)
        if size(chunk, split, scratch(0)) > budget:
            chunk = tile_n
            split = min(V, round_down((budget - chunk * per_token) // (chunk * per_logit + row_bytes(0)), tile_v))
        chunk = min(chunk, M)
    total = size(chunk, split, scratch(chunk))
    return SplitPlan(split, chunk, parts, stage_hidden, stage_weight, scratch(chunk), total)


def tile_granules() -> tuple[int, int]:
    """(tokens, vocabulary rows) every G-kernel configuration's tiles divide: chunk and split granules."""
    pool = [logit_grad.INTERPRET_CONFIG] if interpreting() else [c for cs in logit_grad.CONFIGS.values() for c in cs]
    return max(c.blocks["BLOCK_N"] for c in pool), max(c.blocks["BLOCK_V"] for c in pool)


def gemm_backward(hidden, head: Head, tokens: Tokens, terms: GradTerms, needs: Needs, *, precise=False,
                  workspace_bytes: int = DEFAULT_WORKSPACE_MB * MB) -> Grads:
    """The contract's gradients (:class:`~dft_ops.backends.protocol.Grads`) of G given by ``terms``, split by
    split with cuBLAS GEMMs.

    Args:
        hidden, head, tokens, terms, needs: the contract's (:mod:`dft_ops.backends.protocol`).
        precise: G as two parts of the compute dtype (high + low), each product
            run twice; no effect when the products run in fp32.
        workspace_bytes: bound on the workspace (G, staged rows, d(weight)
            scratch; :func:`plan_splits`); the fp32 (M, D) d(hidden) accumulator
            and the gradients themselves are not part of it.

    Returns:
        :class:`~dft_ops.backends.protocol.Grads`; rows of hidden not computed get 0.
    """
    M = assert_inputs(hidden, head, tokens, terms)
    assert workspace_bytes > 0
    N, D = hidden.shape
    weight, bias = head.weight, head.bias
    V = weight.shape[0]
    need_bias = needs.bias and bias is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # fp32 accumulators: d(hidden) of the computed rows (the output itself when it is fp32 and
    # every row is computed), d(weight) when the weight is fp32, d(bias)
    direct_hidden = hidden.dtype == torch.float32 and tokens.rows is None
    acc_hidden = torch.zeros(M, D, **f32) if needs.hidden else None
    d_weight = None
    if needs.weight:
        # contiguous whatever weight's strides: each split writes whole rows of it (cuBLAS out=)
        d_weight = torch.zeros(V, D, **f32) if weight.dtype == torch.float32 else \
            torch.empty(V, D, dtype=weight.dtype, device=weight.device)
    d_bias = torch.zeros(V, **f32) if need_bias else None
    rows = tokens.rows
    if M == 0:
        if needs.weight and weight.dtype != torch.float32:
            d_weight.zero_()
    else:
        plan = plan_splits(M, V, D, compute=head.compute_dtype, hidden_dtype=hidden.dtype, weight_dtype=weight.dtype,
                           has_rows=rows is not None, need_hidden=needs.hidden, need_weight=needs.weight,
                           precise=precise, workspace_bytes=workspace_bytes)
        operands = kernel_operands(hidden, head, tokens, terms, class_weight=terms.uniform is not None,
                                   second=terms.reads_second_head)
        _Sweep(*operands, plan, acc_hidden, d_weight, d_bias).run()
        hidden, rows = operands[0], operands[2].rows
    return Grads(_finish_hidden(acc_hidden, hidden, rows, N, direct_hidden) if needs.hidden else None, d_weight,
                 d_bias.to(bias.dtype) if need_bias else None)


class _Sweep:
    """One backward call's loop over splits and chunks, with its workspace."""

    def __init__(self, hidden, head: Head, tokens: Tokens, terms: GradTerms, plan: SplitPlan, acc_hidden, d_weight,
                 d_bias):
        self.hidden, self.head, self.tokens, self.terms, self.plan = hidden, head, tokens, terms, plan
        self.weight, self.rows = head.weight, tokens.rows
        self.acc_hidden, self.d_weight, self.d_bias = acc_hidden, d_weight, d_bias
        self.M, self.D = tokens.count, hidden.shape[1]
        self.V = head.weight.shape[0]
        on = dict(dtype=head.compute_dtype, device=hidden.device)
        self.g = torch.empty(plan.parts, plan.chunk, plan.split, **on)
        self.staged_weight = torch.empty(plan.split, self.D, **on) if plan.stage_weight else None
        self.staged_hidden = torch.empty(plan.chunk, self.D, **on) if plan.stage_hidden else None
        self.scratch = torch.empty(plan.split, self.D, dtype=torch.float32, device=hidden.device) \
            if plan.weight_scratch else None
        self.config: Config | None = None

    def run(self) -> None:
        plan, M = self.plan, self.M
        single_chunk = plan.chunk >= M
        h_all = self._hidden_rows(0, M) if single_chunk and self.d_weight is not None else None
        for v_lo in range(0, self.V, plan.split):
            v_hi = min(v_lo + plan.split, self.V)
            w_split = self._weight_rows(v_lo, v_hi) if self.acc_hidden is not None else None
            dw_target = None
            if self.d_weight is not None:
                dw_target = self.scratch[: v_hi - v_lo].zero_() if self.scratch is not None \
                    else self.d_weight[v_lo:v_hi]
            for t_lo in range(0, M, plan.chunk):
                t_hi = min(t_lo + plan.chunk, M)
                g_parts = self._logit_grad(t_lo, t_hi, v_lo, v_hi)
                for g in g_parts:
                    if w_split is not None:
                        add_product(self.acc_hidden[t_lo:t_hi], g, w_split)
                    if dw_target is not None:
                        h = h_all if single_chunk else self._hidden_rows(t_lo, t_hi)
                        if self.scratch is None and self.d_weight.dtype != torch.float32:
                            write_product(dw_target, g.T, h)  # one chunk, one part: written once
                        else:
                            add_product(dw_target, g.T, h)
                    if self.d_bias is not None:
                        self.d_bias[v_lo:v_hi] += g.sum(dim=0, dtype=torch.float32)
            if self.scratch is not None:
                self.d_weight[v_lo:v_hi].copy_(dw_target)

    def _logit_grad(self, t_lo, t_hi, v_lo, v_hi) -> list[Tensor]:
        """G of computed tokens [t_lo, t_hi) x vocabulary rows [v_lo, v_hi): views of the workspace."""
        views = [self.g[p, : t_hi - t_lo, : v_hi - v_lo] for p in range(self.plan.parts)]
        head, terms = self.head, self.terms
        launch = logit_grad.logit_grad_launch(self.hidden, head, self.tokens, terms, views[0],
                                              views[1] if len(views) > 1 else None, t_lo, t_hi, v_lo, v_hi)
        if self.config is None:
            # G is only written: tuning trials on the workspace leave nothing behind
            key = (self.D, self.V, self.plan.split, bucket(self.plan.chunk), self.hidden.dtype, self.weight.dtype,
                   head.compute_dtype, head.bias is not None, head.softcap is not None, head.temperature is not None,
                   terms.uniform is not None, head.class_weight is not None, self.rows is not None,
                   self.plan.parts, terms.second is not None, terms.gap is not None, terms.entropy is not None,
                   self.tokens.inv_temperature is not None, *second_head_key(head.second if terms.reads_second_head else None),
                   terms.mix_gap is not None)
            self.config = logit_grad.TUNER.pick(launch, key)
        launch.run(self.config)
        return views

    def _weight_rows(self, v_lo, v_hi) -> Tensor:
        """weight[v_lo:v_hi] in the compute dtype (a view when it already is)."""
        rows = self.weight[v_lo:v_hi]
        if self.staged_weight is None:
            return rows
        return self.staged_weight[: v_hi - v_lo].copy_(rows)

    def _hidden_rows(self, t_lo, t_hi) -> Tensor:
        """The hidden rows of computed tokens [t_lo, t_hi) in the compute dtype (a view when they are)."""
        if self.staged_hidden is None:
            return self.hidden[t_lo:t_hi]
        out = self.staged_hidden[: t_hi - t_lo]
        for lo in range(t_lo, t_hi, _COPY_ROWS):
            hi = min(lo + _COPY_ROWS, t_hi)
            src = self.hidden[lo:hi] if self.rows is None else self.hidden[self.rows[lo:hi]]
            out[lo - t_lo: hi - t_lo].copy_(src)
        return out


def _finish_hidden(acc: Tensor, hidden: Tensor, rows: Tensor | None, N: int, direct: bool) -> Tensor:
    """The (N, D) d(hidden) in hidden's dtype from the fp32 (M, D) accumulator of the computed rows."""
    if direct:
        return acc
    if rows is None:
        return acc.to(hidden.dtype)
    out = torch.zeros(N, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    for lo in range(0, acc.shape[0], _COPY_ROWS):
        hi = min(lo + _COPY_ROWS, acc.shape[0])
        out.index_copy_(0, rows[lo:hi], acc[lo:hi].to(hidden.dtype))
    return out
