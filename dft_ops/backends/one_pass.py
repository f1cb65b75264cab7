"""The one-pass head: the loss's statistics and its gradients in one pass over chunks of tokens (6NDV).

Per chunk of C computed tokens (:class:`OnePass`, for any :class:`~dft_ops.backends.protocol.RowPasses`)::

    U  = H_c W^T (+ b)                 one product into an fp32 (C x V) workspace (cuBLAS / the CPU's BLAS)
    stats = row_stats(U)               max, lse, label logit and log-prob, entropy, argmax, smoothing sum,
                                       the second head's terms from its own workspace R = H2_c W2^T
    terms = terms_of(stats)            the objective table on the chunk's O(C) statistics
    G  = logit_grad(U) in place        the contract's G (:mod:`dft_ops.backends.protocol`)
    d_hidden[c] = G W,  d_weight += G^T H_c,  d_bias += sum G      products again

The two products a two-pass backward needs to rebuild the logits are gone: 2NDV
(logits) + 4NDV (gradients) in all, each a BLAS product, where the two-pass modes
do 8NDV. The gradients are formed for a unit upstream gradient and kept in fp32
until the backward scales them (the upstream gradient of a "mean" or "sum" loss
is one number). What the chunk loop keeps: the workspace ``4 C V`` bytes (twice
with a second head; 16-bit G is written into the first half of each fp32 row),
the fp32 d(weight) ``4 V D`` and d(hidden) ``4 N D`` (a frozen head: none), and
the O(tokens) statistics. It applies only where the upstream gradient is one
scalar and the objective's weights come from one token's statistics;
``dft_ops.backends.backward_mode`` decides (docs/backward.md).

:class:`TorchRowPasses` are the row passes in PyTorch (any device; fp32 G: the
accurate path); the Triton ones are ``dft_ops.kernels.row_pass``.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from .partials import log_over_mixture, mixture_kl_sums
from .products import add_product, fp32_product
from .protocol import (Backend, ForwardStats, Grads, GradTerms, Head, Needs, RowPasses, TermsOf, Tokens,
                       assert_inputs, fp32_gradients)

ROW_ALIGN = 16
"""Workspace rows are padded to a multiple of this many elements (64 bytes): aligned vector loads for odd V."""


def padded(V: int) -> int:
    """The workspace's row stride for V columns."""
    return -(-V // ROW_ALIGN) * ROW_ALIGN


CUDA_MIN_CHUNK = 1024
"""Fewest tokens per chunk on CUDA (with ``2^22 / D``): below it the fp32 d(weight) accumulator's traffic
(8 V D bytes per chunk) and the products' own efficiency cost the chunk its speed."""
MIN_CHUNK = 512
"""Fewest tokens per chunk elsewhere: the CPU BLAS reaches most of its rate there (measured at D 1024, V 32000,
fp32, 2 cores: 256 tokens 7% slower than 1024, 512 tokens 3%; the workspace 4 C V bytes)."""
GRANULE = 128
"""Chunks are whole multiples of this many tokens."""


def chunk_tokens(V: int, D: int, *, device_type: str, workspace_bytes: int | None, second_head: bool) -> tuple[int, bool]:
    """(tokens per chunk, whether that chunk fits ``workspace_bytes``), from global shapes and options only.

    The floor: ``max(CUDA_MIN_CHUNK, 2^22 / D)`` on CUDA, ``MIN_CHUNK`` elsewhere (read at call time), in
    whole ``GRANULE`` s. ``workspace_bytes`` None: the floor (the mode's default budget); else the most whole
    granules the budget holds, at least the floor (``fits`` False when the budget holds less).
    """
    floor = max(CUDA_MIN_CHUNK, 2**22 // D) if device_type == "cuda" else MIN_CHUNK
    floor = -(-floor // GRANULE) * GRANULE
    per_token = 4 * padded(V) * (2 if second_head else 1)
    if workspace_bytes is None:
        return floor, True
    fit = workspace_bytes // per_token // GRANULE * GRANULE
    return max(fit, floor), fit >= floor


class OnePass:
    """A :class:`~dft_ops.backends.protocol.OnePassBackend`: the chunk loop around a backend's row passes.

    Args:
        rows: the row passes (:class:`TorchRowPasses` or ``dft_ops.kernels.row_pass.TritonRowPasses``).
        two_pass: the backend whose ``lse_forward`` / ``grad_backward`` serve the calls one-pass does not
            (statistics only; per-token upstream gradients).
        chunk: tokens per chunk (:func:`chunk_tokens`).
        g_dtype: "compute" (G in the products' dtype: 16-bit for 16-bit products, as cuBLAS takes them) or
            "fp32" (G never rounded).
    """

    def __init__(self, rows: RowPasses, two_pass: Backend, chunk: int, *, g_dtype: str = "compute"):
        assert chunk > 0 and g_dtype in ("compute", "fp32")
        self.rows, self.two_pass, self.chunk, self.g_dtype = rows, two_pass, chunk, g_dtype
        self.name = f"{two_pass.name.split('-')[0]}-onepass"

    def __repr__(self) -> str:
        return f"OnePass({type(self.rows).__name__}, {self.two_pass!r}, chunk={self.chunk}, g_dtype={self.g_dtype!r})"

    def lse_forward(self, hidden, head, tokens, *, with_stats=False, smoothing=False) -> ForwardStats:
        return self.two_pass.lse_forward(hidden, head, tokens, with_stats=with_stats, smoothing=smoothing)

    def grad_backward(self, hidden, head, tokens, terms, needs) -> Grads:
        return self.two_pass.grad_backward(hidden, head, tokens, terms, needs)

    def loss_and_grads(self, hidden: Tensor, head: Head, tokens: Tokens, terms_of: TermsOf, needs: Needs, *,
                       with_stats=False, smoothing=False) -> tuple[ForwardStats, Grads]:
        M = assert_inputs(hidden, head, tokens)
        # per-token temperatures come with per-token upstream gradients (dft_ops.token_logprobs): two passes
        assert tokens.inv_temperature is None, "a temperature per token runs the two-pass backends"
        grads = fp32_gradients(hidden, head, needs)
        sweep = _Sweep(hidden, head, tokens, min(self.chunk, max(M, 1)), self.rows,
                       head.compute_dtype if self.g_dtype == "compute" else torch.float32)
        parts = []
        for lo in range(0, M, sweep.chunk):
            hi = min(lo + sweep.chunk, M)
            stats, grad_rows = sweep.chunk_stats(lo, hi, with_stats=with_stats, smoothing=smoothing)
            terms = terms_of(stats, lo, hi)
            if any(needs):
                sweep.add_gradients(terms, grad_rows, grads)
            parts.append(stats)
        return concatenate(parts, M, hidden.device, with_stats, smoothing, head.second is not None,
                           head.mix_weight is not None), grads


class _Sweep:
    """One call's chunk loop: the workspaces and the operands in the products' dtype."""

    def __init__(self, hidden: Tensor, head: Head, tokens: Tokens, chunk: int, rows: RowPasses,
                 g_dtype: torch.dtype):
        self.hidden, self.head, self.tokens, self.chunk, self.rows, self.g_dtype = hidden, head, tokens, chunk, rows, \
            g_dtype
        V = head.weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        self.ws = torch.empty(chunk, padded(V), **f32)
        self.ws2 = torch.empty(chunk, padded(V), **f32) if head.second is not None else None
        # the weight in the products' dtype: the head itself when it already is (no copy)
        self.weight = head.weight.to(head.compute_dtype)
        second = head.second
        self.weight2 = None if second is None else second.weight.to(second.compute_dtype)

    def _rows(self, lo: int, hi: int):
        return slice(lo, hi) if self.tokens.rows is None else self.tokens.rows[lo:hi]

    def chunk_stats(self, lo: int, hi: int, *, with_stats: bool, smoothing: bool):
        """(the chunk's statistics, its hidden rows in the products' dtype): U (and R) in the workspaces."""
        head, idx = self.head, self._rows(lo, hi)
        h = self.hidden[idx].to(head.compute_dtype)
        U = self.ws[: hi - lo, : self.weight.shape[0]]
        fp32_product(U, h, self.weight.T)
        if head.bias is not None:
            U += head.bias.to(torch.float32)
        R = None
        if head.second is not None:
            second = head.second
            R = self.ws2[: hi - lo, : self.weight.shape[0]]
            fp32_product(R, second.hidden[idx].to(second.compute_dtype), self.weight2.T)
            if second.bias is not None:
                R += second.bias.to(torch.float32)
        self.U, self.R = U, R
        stats = self.rows.row_stats(U, self.tokens.targets[lo:hi], head, with_stats=with_stats,
                                    smoothing=smoothing, second_logits=R)
        return stats, (lo, hi, idx, h)

    def add_gradients(self, terms: GradTerms, grad_rows, grads: Grads) -> None:
        """G of the chunk in place, then its contributions to d(hidden), d(weight), d(bias)."""
        lo, hi, idx, h = grad_rows
        assert terms.entropy is None, "the entropy's gradient term is the two-pass backends'"
        n = hi - lo
        G = self.rows.logit_grad(self.U, self.tokens.targets[lo:hi], self.head, terms, second_logits=self.R,
                                 out_dtype=self.g_dtype)
        w = self.weight if G.dtype == self.weight.dtype else self.weight.to(G.dtype)
        if grads.hidden is not None:
            if isinstance(idx, slice):
                fp32_product(grads.hidden[idx], G, w)
            else:
                rows = torch.empty(n, w.shape[1], dtype=torch.float32, device=G.device)
                fp32_product(rows, G, w)
                grads.hidden.index_copy_(0, idx, rows)  # the chunk's rows are distinct
        if grads.weight is not None:
            add_product(grads.weight, G.T, h if h.dtype == G.dtype else h.to(G.dtype))
        if grads.bias is not None:
            grads.bias.add_(G.sum(dim=0, dtype=torch.float32))


def concatenate(parts: list[ForwardStats], M: int, device, with_stats: bool, smoothing: bool,
                two_heads: bool, mixing: bool = False) -> ForwardStats:
    """The chunks' statistics as one (M,) ForwardStats (an empty one for M = 0)."""
    if parts:
        return ForwardStats(*(torch.cat(field) if field[0] is not None else None for field in zip(*parts)))
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    return ForwardStats(empty, empty, *(empty if with_stats else None,) * 2,
                        torch.zeros(0, dtype=torch.int64, device=device) if with_stats else None,
                        empty if smoothing else None, *(empty if two_heads else None,) * 3, empty,
                        *(empty if mixing else None,) * 2)


# ---------------------------------------------------------------------------------------------------- in PyTorch


class TorchRowPasses:
    """The row passes in PyTorch ops on the workspace (any device): the reference of the Triton ones.

    Two forms. The general one computes from the raw logits in temporaries and leaves the workspace as it
    found it. The plain one (no soft-cap, no second head, neither statistics nor a smoothing sum asked for:
    the usual training call) works in place: the workspace becomes ``e = exp(z - m)`` (``m`` the row's
    maximum) in the statistics pass, and G is ``e`` scaled per row in the gradient pass, five sweeps over the
    chunk and no (C, V) temporary. On a CPU those sweeps and the pages of fresh temporaries, not the
    arithmetic, are what the row passes cost next to the products. Its ``logit_grad`` therefore reads the
    workspace as its ``row_stats`` left it; the row maxima it needs are kept per thread for the one
    workspace they belong to.
    """

    def __init__(self):
        self._held = threading.local()

    def row_stats(self, logits: Tensor, targets: Tensor, head: Head, *, with_stats: bool, smoothing: bool,
                  second_logits: Tensor | None) -> ForwardStats:
        self._held.exp_of = None
        if head.softcap is None and second_logits is None and not with_stats and not smoothing:
            return self._exp_in_place(logits, targets, head)
        z = _capped(logits, head.softcap, head.inv_temperature)
        C, V = z.shape
        m = z.amax(dim=1)
        shift = torch.where(m == float("-inf"), 0.0, m)
        d = z - shift[:, None]
        e = torch.exp(d)
        sumexp = e.sum(dim=1)
        lse = shift + torch.log(sumexp)
        inside = (targets >= 0) & (targets < V)
        label = targets.clamp(0, V - 1)[:, None]
        zy = torch.where(inside, z.gather(1, label).squeeze(1), 0.0)
        # log p without the cancellation of z_y - lse: the label's distance to the max, and the log of
        # 1 + (the rest of the mass) summed without the label's own term
        d_y = d.gather(1, label).squeeze(1)
        others = e.scatter(1, label, 0.0).sum(dim=1)  # summed apart: sumexp - e_y would cancel on peaked rows
        logp = torch.where(inside, d_y - torch.log1p(torch.expm1(d_y) + others), float("-inf"))
        entropy = max_logit = argmax = smooth = None
        if with_stats:
            entropy = torch.log(sumexp) - (e * torch.where(e > 0, d, 0.0)).sum(dim=1) / sumexp
            entropy = torch.where(m == float("-inf"), 0.0, entropy)
            max_logit, argmax = m, z.argmax(dim=1)
        if smoothing:
            u = head.class_weight.float() if head.class_weight is not None else torch.ones(V, device=z.device)
            smooth = (u * torch.where(u != 0, z, 0.0)).sum(dim=1)  # a zero weight times a -inf logit is 0
        lse2 = reverse_kl = forward_kl = model_mix_kl = second_mix_kl = None
        if second_logits is not None:
            second = head.second
            r = _capped(second_logits, second.softcap, head.inv_temperature)
            m2 = r.amax(dim=1)
            d2 = r - torch.where(m2 == float("-inf"), 0.0, m2)[:, None]
            e2 = torch.exp(d2)
            sumexp2 = e2.sum(dim=1)
            lse2 = torch.where(m2 == float("-inf"), 0.0, m2) + torch.log(sumexp2)
            # each head relative to its own maximum: no offset between the heads enters (partials.combine_kl)
            gap = d - d2
            log_ratio = torch.log(sumexp / sumexp2)
            reverse_kl = (e * torch.where(e > 0, gap, 0.0)).sum(dim=1) / sumexp - log_ratio
            forward_kl = log_ratio - (e2 * torch.where(e2 > 0, gap, 0.0)).sum(dim=1) / sumexp2
            if head.mix_weight is not None:  # a second read of the rows, now that both log-sum-exps are known
                model_mix_kl, second_mix_kl = mixture_kl_sums(z - _finite(lse)[:, None], r - _finite(lse2)[:, None],
                                                              head.mix_weight)
        return ForwardStats(lse, zy, entropy, max_logit, argmax, smooth, lse2, reverse_kl, forward_kl, logp,
                            model_mix_kl, second_mix_kl)

    def _exp_in_place(self, logits: Tensor, targets: Tensor, head: Head) -> ForwardStats:
        """The plain form's statistics pass: ``logits`` (raw u) become ``e = exp(z - m)`` in place."""
        z = logits
        C, V = z.shape
        if head.inv_temperature != 1.0:
            z.mul_(head.inv_temperature)
        m = z.amax(dim=1)
        shift = torch.where(m == float("-inf"), 0.0, m)
        inside = (targets >= 0) & (targets < V)
        label = targets.clamp(0, V - 1)[:, None]
        zy = torch.where(inside, z.gather(1, label).squeeze(1), 0.0)
        z.sub_(shift[:, None])
        d_y = z.gather(1, label).squeeze(1)
        e = z.exp_()
        # the rest of the mass summed without the label's own term (sumexp - e_y cancels on peaked rows): the
        # label's entry zeroed for the sum, then put back
        e_y = e.gather(1, label)
        e.scatter_(1, label, 0.0)
        others = e.sum(dim=1)
        e.scatter_(1, label, e_y)
        lse = shift + torch.log(others + e_y.squeeze(1))
        logp = torch.where(inside, d_y - torch.log1p(torch.expm1(d_y) + others), float("-inf"))
        self._held.exp_of = (weakref.ref(logits), shift)
        return ForwardStats(lse, zy, None, None, None, None, None, None, None, logp)

    def _held_shift(self, logits: Tensor) -> Tensor | None:
        held = getattr(self._held, "exp_of", None)
        self._held.exp_of = None
        if held is None:
            return None
        ref, shift = held
        if ref() is not logits:
            raise RuntimeError("TorchRowPasses.logit_grad: the workspace is not the one its row_stats rewrote")
        return shift

    def logit_grad(self, logits: Tensor, targets: Tensor, head: Head, terms: GradTerms, *,
                   second_logits: Tensor | None, out_dtype: torch.dtype) -> Tensor:
        shift = self._held_shift(logits)
        if shift is not None:
            return self._scale_in_place(logits, shift, targets, head, terms, out_dtype)
        u = logits
        z = _capped(u, head.softcap, head.inv_temperature)
        C, V = z.shape
        a, b = terms.softmax[:, None], terms.target
        log_s = z - terms.lse[:, None]
        s = torch.exp(log_s)
        g = a * s
        inside = (targets >= 0) & (targets < V)
        label = targets.clamp(0, V - 1)[:, None]
        # the label's entry a s_y - b as a expm1(log p) + (a - b): s_y - 1 cancels on peaked rows
        logp = terms.logprob if terms.logprob is not None else z.gather(1, label).squeeze(1) - terms.lse
        entry = terms.softmax * torch.expm1(logp) + (terms.softmax - b)
        # written with a gather / scatter rather than boolean indexing (a host sync); rows without a label in
        # the vocabulary keep their entry
        g.scatter_(1, label, torch.where(inside, entry, g.gather(1, label).squeeze(1))[:, None])
        if terms.uniform is not None:
            cw = head.class_weight.float() if head.class_weight is not None else torch.ones(V, device=z.device)
            g -= terms.uniform[:, None] * cw[None, :]
        if terms.reads_second_head:
            log_q = _capped(second_logits, head.second.softcap, head.inv_temperature) - terms.second_lse[:, None]
            if terms.second is not None:
                g -= terms.second[:, None] * torch.exp(log_q)
            if terms.gap is not None:
                # a logit without probability gets no gradient, whatever its gap (0 * inf)
                g += terms.gap[:, None] * torch.where(s > 0, s * (log_s - log_q), 0.0)
            if terms.mix_gap is not None:
                g += terms.mix_gap[:, None] * torch.where(
                    s > 0, s * log_over_mixture(log_s - log_q, head.mix_weight), 0.0)
        if head.softcap is not None:
            g *= torch.cosh(u * (1.0 / head.softcap)).pow(-2) * head.inv_temperature
        elif head.temperature is not None:
            g *= head.inv_temperature
        logits.copy_(g)
        return logits if out_dtype == torch.float32 else logits.to(out_dtype)

    @staticmethod
    def _scale_in_place(e: Tensor, shift: Tensor, targets: Tensor, head: Head, terms: GradTerms,
                        out_dtype: torch.dtype) -> Tensor:
        """The plain form's G from ``e = exp(z - m)``: ``a s = e (a exp(m - lse))`` per row, the label's entry
        as the general form writes it; the temperature's factor folded into both."""
        C, V = e.shape
        inv_t = head.inv_temperature
        inside = (targets >= 0) & (targets < V)
        label = targets.clamp(0, V - 1)[:, None]
        logp = terms.logprob if terms.logprob is not None else \
            torch.log(e.gather(1, label).squeeze(1)) + shift - terms.lse
        e.mul_((terms.softmax * torch.exp(shift - terms.lse) * inv_t)[:, None])
        entry = (terms.softmax * torch.expm1(logp) + (terms.softmax - terms.target)) * inv_t
        # a gather / scatter, not boolean indexing (a host sync); rows without a label in the vocabulary keep
        # their entry
        e.scatter_(1, label, torch.where(inside, entry, e.gather(1, label).squeeze(1))[:, None])
        if terms.uniform is not None:
            cw = head.class_weight.float() if head.class_weight is not None else torch.ones(V, device=e.device)
            e.sub_(terms.uniform[:, None] * inv_t * cw[None, :])
        return e if out_dtype == torch.float32 else e.to(out_dtype)


def _finite(x: Tensor) -> Tensor:
    """x with -inf taken as 0 (a row of -inf logits normalized by it has exponentials 0, not NaN)."""
    return torch.where(x == float("-inf"), 0.0, x)


def _capped(u: Tensor, softcap, inv_temperature: float) -> Tensor:
    """The contract's z from raw logits u (u itself when that is z: callers never write it)."""
    if softcap is None:
        return u if inv_temperature == 1.0 else u * inv_temperature
    return (float(softcap) * inv_temperature) * torch.tanh(u * (1.0 / float(softcap)))
