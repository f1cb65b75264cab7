"""The vocabulary-parallel wrapper: a backend over one rank's rows of a head whose statistics are the whole head's.

:class:`ShardedBackend` wraps any :class:`~dft_ops.backends.protocol.Backend`
with the same two passes (the option and the group checks live in
:mod:`dft_ops.distributed.vocab_parallel`):

- ``lse_forward`` runs the local backend on the rank's rows with the targets
  shifted by ``start`` (a label owned by another rank is outside [0, stop -
  start): no label logit, no one-hot term), then all-gathers every rank's
  per-token partials (max logit, sum-exp, entropy term, argmax, label logit,
  smoothing sum) and merges them with the same
  :func:`~dft_ops.backends.partials.combine_partials` that merges vocabulary
  chunks inside one backend. The objective table runs on these global
  statistics, so DFT's p and every other objective's weight are the whole
  vocabulary's.
- ``grad_backward`` runs the local backend with the global log-sum-exp and
  coefficients: d(weight) and d(bias) are the rank's own rows, d(hidden) is
  this rank's share and is all-reduced over the group (or left to the caller,
  ``reduce_hidden_grad=False``, whose sequence-parallel gather reduce-scatters it).

- ``loss_and_grads`` (a one-pass local backend) runs the local chunk loop;
  each chunk's partials are all-gathered and merged before the objective table
  sees them (the chunks, planned from the whole vocabulary's shapes, are the
  same on every rank), d(hidden) is all-reduced once at the end.

Communication per call: one all-gather of a few int64 per rank when the call
is checked (:func:`~dft_ops.distributed.vocab_parallel.check_group`), one
all-gather of ``k x M`` float64 per rank in the forward (k = 3 to 6
statistics, M computed tokens), one all-reduce of ``N x D`` fp32 d(hidden) in
the backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed.vocab_parallel import VocabParallel, all_gather, checked, group_of
from .partials import combine_partials
from .protocol import ForwardStats, Grads, Head, Needs, TermsOf, Tokens, fp32_gradients

__all__ = ["ShardedBackend", "shard_partials", "merge_partials"]


def shard_partials(stats: ForwardStats, start: int, *, with_stats: bool, smoothing: bool) -> Tensor:
    """One rank's forward statistics as online-softmax partials, stacked (k, M) float64 for one all-gather.

    Rows: max, sum-exp relative to it, label logit, then (with_stats) the entropy
    term relative to the max and the global argmax id, then (smoothing) the
    smoothing sum. Without stats the partial is (lse, 1): lse is a max with sum-exp 1.
    An all -inf slice (empty, or masked) is (-inf, 0).
    """
    lse = stats.lse.double()
    top = stats.max_logit.double() if with_stats else lse
    finite = top > float("-inf")
    sumexp = torch.where(finite, torch.exp(lse - torch.where(finite, top, 0.0)), 0.0)
    rows = [top, sumexp, stats.target_logit.double()]
    if with_stats:
        # sum_j e^(z_j - max) (z_j - max) = sumexp * (sum_j s_j z_j - max) = sumexp * (lse - entropy - max)
        ent = torch.where(finite, sumexp * (lse - stats.entropy.double() - torch.where(finite, top, 0.0)), 0.0)
        rows += [ent, stats.argmax.double() + start]
    if smoothing:
        rows.append(stats.smooth_sum.double())
    return torch.stack(rows)


def merge_partials(parts: Tensor, *, with_stats: bool, smoothing: bool) -> ForwardStats:
    """(S, k, M) partials of S vocabulary slices (:func:`shard_partials`) -> the whole vocabulary's ForwardStats."""
    part_max, part_sumexp, target = parts[:, 0], parts[:, 1], parts[:, 2]
    ent = argmax = None
    if with_stats:
        ent, argmax = parts[:, 3], parts[:, 4].long()
    lse, max_logit, entropy, argmax = combine_partials(part_max, part_sumexp, ent, argmax)
    f32 = (lambda t: None if t is None else t.float())
    return ForwardStats(lse=f32(lse), target_logit=f32(target.sum(dim=0)), entropy=f32(entropy),
                        max_logit=f32(max_logit) if with_stats else None, argmax=argmax,
                        smooth_sum=f32(parts[:, -1].sum(dim=0)) if smoothing else None)


def _empty_stats(M: int, device, *, with_stats: bool, smoothing: bool) -> ForwardStats:
    """The statistics of a rank holding no rows (an uneven split): no logit at all."""
    f32 = dict(dtype=torch.float32, device=device)
    zeros = torch.zeros(M, **f32)
    minus_inf = torch.full((M,), float("-inf"), **f32)
    return ForwardStats(lse=minus_inf, target_logit=zeros, entropy=zeros if with_stats else None,
                        max_logit=minus_inf if with_stats else None,
                        argmax=torch.zeros(M, dtype=torch.int64, device=device) if with_stats else None,
                        smooth_sum=zeros if smoothing else None)


class ShardedBackend:
    """A backend over one rank's vocabulary rows whose statistics are the whole vocabulary's.

    Args:
        local: the :class:`~dft_ops.backends.protocol.Backend` computing the
            rank's rows (``kernels.TritonBackend`` or ``TorchBackend``).
        vp: a :class:`~dft_ops.distributed.VocabParallel` checked by
            :func:`~dft_ops.distributed.vocab_parallel.check_group` (``vocab_size`` set).

    The passes take the contract's arguments with ``head.weight`` / ``head.bias``
    the rank's rows, ``head.class_weight`` the whole (V,) vector (the rank's
    rows are passed on) and ``tokens.targets`` global ids; both are
    collectives over the group.
    """

    def __init__(self, local, vp: VocabParallel):
        self.local, self.vp = local, checked(vp)
        self.group, self.rank, self.world = group_of(vp)
        self.name = f"{local.name} over {self.world} vocabulary shards"

    def _local(self, head: Head, tokens: Tokens) -> tuple[Head, Tokens]:
        """The rank's view: its rows of the class weights, targets relative to its first row."""
        cw = head.class_weight
        head = head._replace(class_weight=None if cw is None else cw[self.vp.start:self.vp.stop])
        return head, tokens._replace(targets=tokens.targets - self.vp.start)

    @property
    def chunk(self) -> int:
        return self.local.chunk

    def _merged(self, stats: ForwardStats, *, with_stats: bool, smoothing: bool) -> ForwardStats:
        """The whole vocabulary's statistics from every rank's (one all-gather)."""
        mine = shard_partials(stats, self.vp.start, with_stats=with_stats, smoothing=smoothing)
        everyone = mine.new_empty((self.world * mine.shape[0], mine.shape[1]))
        all_gather(everyone, mine, self.group)
        return merge_partials(everyone.reshape(self.world, *mine.shape), with_stats=with_stats, smoothing=smoothing)

    def lse_forward(self, hidden, head: Head, tokens: Tokens, *, with_stats=False, smoothing=False) -> ForwardStats:
        if self.vp.rows:
            stats = self.local.lse_forward(hidden, *self._local(head, tokens), with_stats=with_stats,
                                           smoothing=smoothing)
        else:
            stats = _empty_stats(tokens.count, hidden.device, with_stats=with_stats, smoothing=smoothing)
        return self._merged(stats, with_stats=with_stats, smoothing=smoothing)

    def loss_and_grads(self, hidden, head: Head, tokens: Tokens, terms_of: TermsOf, needs: Needs, *,
                       with_stats=False, smoothing=False) -> tuple[ForwardStats, Grads]:
        merged = []

        def merged_terms_of(local_stats: ForwardStats, lo: int, hi: int):
            # the objective sees the whole vocabulary's statistics; the local G uses the global lse
            merged.append(self._merged(local_stats, with_stats=with_stats, smoothing=smoothing))
            return terms_of(merged[-1], lo, hi)

        if self.vp.rows:
            _, grads = self.local.loss_and_grads(hidden, *self._local(head, tokens), merged_terms_of, needs,
                                                 with_stats=with_stats, smoothing=smoothing)
        else:  # no rows here: the same chunks' collectives, nothing computed
            grads = fp32_gradients(hidden, head, needs)
            M = tokens.count
            for lo in range(0, M, self.chunk):
                hi = min(lo + self.chunk, M)
                merged_terms_of(_empty_stats(hi - lo, hidden.device, with_stats=with_stats, smoothing=smoothing),
                                lo, hi)
        if grads.hidden is not None and self.vp.reduce_hidden_grad:
            dist.all_reduce(grads.hidden, group=self.group)  # fp32 shares, summed once
        if not merged:
            return _empty_stats(0, hidden.device, with_stats=with_stats, smoothing=smoothing), grads
        return ForwardStats(*(torch.cat(f) if f[0] is not None else None for f in zip(*merged))), grads

    def grad_backward(self, hidden, head: Head, tokens: Tokens, terms, needs) -> Grads:
        if self.vp.rows:
            grads = self.local.grad_backward(hidden, *self._local(head, tokens), terms, needs)
        else:
            grads = Grads(torch.zeros_like(hidden) if needs.hidden else None,
                          torch.zeros_like(head.weight) if needs.weight else None,
                          torch.zeros_like(head.bias) if needs.bias and head.bias is not None else None)
        if grads.hidden is not None and self.vp.reduce_hidden_grad:
            # summed in fp32 whatever hidden's dtype: the share's own rounding and one more, not one per rank
            total = grads.hidden.float()
            dist.all_reduce(total, group=self.group)
            grads = grads._replace(hidden=total.to(grads.hidden.dtype))
        return grads
