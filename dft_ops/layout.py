"""``dft_ops.TokenLayout``: which position predicts which label, and which rows the kernels compute.

One owner for everything the loss needs to know about the tokens, instead of
each caller working it out again:

- the causal shift: position t predicts ``labels[..., t + shift]`` (the hidden
  states are never sliced or copied; the last ``shift`` positions of each row
  simply predict nothing);
- the loss positions (``labels[..., shift:]``) and their mask (label not ignored);
- the compaction of ignored positions out of the kernels' work (rows and their
  targets) and the scatter of per-row results back to the positions;
- the alignment of an objective's per-token inputs with the computed rows, and
  the sequence (segment) id of each computed row.

Shapes: ``labels`` is ``(..., S)``, the leading shape of hidden; N positions in
row-major order; M <= N of them have a label to compute (the rows).
"""

from __future__ import annotations

import torch
from torch import Tensor


class TokenLayout:
    """The token layout of one batch of labels.

    Args (validated by the caller, ``dft_ops.linear_cross_entropy``'s door):
        labels: (..., S) integer tensor (any strides); ``ignore_index`` marks
            positions that contribute nothing. Unsigned dtypes up to 32 bits are
            read exactly.
        shift: position t predicts ``labels[..., t + shift]`` (0: no shift;
            ``labels.ndim >= 2`` otherwise, so sequences cannot run into each other).
        ignore_index: an int64.
        position_ids: (..., S) integer tensor or None: packed documents start
            where it is 0 (sequence ids, :meth:`segments`).
        unlabeled: (loss_shape) bool tensor or None: loss positions computed even
            where their label is ignored (a distillation objective's tokens
            without a label, ``Distill(distill_unlabeled=True)``); their rows
            get the target -1 (no label, whatever ``ignore_index`` is).

    Attributes (no device synchronisation until :meth:`compact`):
        shape: labels' shape, the positions (hidden's leading shape).
        loss_shape: the loss positions' shape, ``(..., max(S - shift, 0))``.
        n_positions: N.
        mask: (loss_shape) bool, True where the label is not ignored.
        targets: (N,) int64 contiguous, the label each position predicts
            (``ignore_index`` for the last ``shift`` positions of a row).
        valid: (N,) bool, ``targets != ignore_index``.
        computed: (N,) bool, the positions to compute: ``valid``, or ``valid`` or ``unlabeled``.
        rows: (M,) int64 positions the kernels compute, or None (all N); set by :meth:`compact`.
        row_targets: (M,) int64 contiguous targets of the rows; set by :meth:`compact` (or :meth:`keep_all`).
        row_labeled: (M,) bool, the rows with a label, when ``unlabeled`` was given (else None: all of
            them); set by :meth:`compact`.
        row_mask: (M,) bool, the rows whose loss counts, or None (every row: after :meth:`compact`); set by
            :meth:`keep_all`, which computes every position and masks the ignored ones.
        row_poison: (M,) bool, the rows whose loss and gradients are NaN (a label outside [0, V) found without
            a host read), or None; set by :meth:`keep_all`.
    """

    def __init__(self, labels: Tensor, *, shift: int = 0, ignore_index: int = -100,
                 position_ids: Tensor | None = None, unlabeled: Tensor | None = None):
        assert labels.ndim >= (2 if shift else 1) and not labels.dtype.is_floating_point, labels.shape
        self.shift, self.ignore_index = int(shift), int(ignore_index)
        self.shape = tuple(labels.shape)
        S = self.shape[-1]
        self.loss_shape = (*self.shape[:-1], max(S - self.shift, 0))
        self.n_positions = labels.numel()
        labels = labels.long()
        if self.shift:
            pad = labels.new_full((*self.shape[:-1], min(self.shift, S)), self.ignore_index)
            targets = torch.cat([labels[..., self.shift:], pad], dim=-1)
        else:
            targets = labels
        # contiguous: a strided or expanded view read as if contiguous is a wrong label (or an out-of-bounds read)
        self.targets = targets.reshape(-1).contiguous()
        self.valid = self.targets != self.ignore_index
        self.mask = labels[..., self.shift:] != self.ignore_index
        self.computed = self.valid
        if unlabeled is not None:
            assert tuple(unlabeled.shape) == self.loss_shape and unlabeled.dtype == torch.bool, unlabeled.shape
            if self.shift:  # the last `shift` positions of a row predict nothing: never computed
                pad = unlabeled.new_zeros((*self.shape[:-1], self.shape[-1] - self.loss_shape[-1]))
                unlabeled = torch.cat([unlabeled, pad], dim=-1)
            self.computed = self.valid | unlabeled.reshape(-1)
        self.has_unlabeled = unlabeled is not None
        assert position_ids is None or tuple(position_ids.shape) == self.shape
        self.position_ids = None if position_ids is None else position_ids.contiguous()
        self.rows: Tensor | None = None
        self.row_targets: Tensor | None = None
        self.row_mask: Tensor | None = None
        self.row_poison: Tensor | None = None
        self.row_labeled: Tensor | None = None
        self.n_computed: int | None = None
        self._kept_all = False

    # ------------------------------------------------------------------------------------------ compaction

    def compact(self, vocab_size: int, *read_along: Tensor) -> list[float]:
        """Checks the labels against the vocabulary and drops ignored positions from the work: one device sync.

        Sets :attr:`rows`, :attr:`row_targets`, :attr:`row_labeled` and :attr:`n_computed`.

        Args:
            vocab_size: V; a label that is not ``ignore_index`` must be in [0, V).
            read_along: 0-d tensors to read in the same synchronisation (e.g.
                the Trainer's ``num_items_in_batch``, a device tensor every step).

        Returns:
            the values of ``read_along``, as floats.

        Raises:
            ValueError("labels: ...") for labels outside [0, V) that are not ignore_index.
        """
        flat, valid, computed = self.targets, self.valid, self.computed
        bad = valid & ((flat < 0) | (flat >= vocab_size))
        values = [bad.sum(), computed.sum(), *(t.to(flat.device) for t in read_along)]
        read = torch.stack([v.to(torch.float64) for v in values]).tolist()
        n_bad, n_computed = int(read[0]), int(read[1])
        if n_bad:
            raise ValueError(f"labels: {n_bad} value(s) outside [0, {vocab_size}) (vocabulary size from weight) that "
                             f"are not ignore_index={self.ignore_index}")
        self.n_computed = n_computed
        if self.has_unlabeled:
            flat = torch.where(valid, flat, -1)  # a computed row without a label has none, even if ignore_index < V
        if n_computed == self.n_positions:
            self.rows, self.row_targets = None, flat
        else:
            self.rows = _positions_of_true(computed, n_computed)
            self.row_targets = flat[self.rows]
        if self.has_unlabeled:
            self.row_labeled = self.pick(valid)
        return read[2:]

    def keep_all(self, vocab_size: int) -> None:
        """The sync-free alternative to :meth:`compact`: every position is a row (M = N), nothing is read.

        Sets :attr:`row_targets` (the targets as they are: ignored positions' and out-of-range labels
        included; the backends give a target outside [0, V) no label term), :attr:`row_mask` (the
        positions whose loss counts) and :attr:`row_poison` (non-ignored labels outside [0, V), which
        :meth:`compact` would refuse with a ValueError: their loss and gradients become NaN instead).
        :attr:`n_computed` stays None: the count is a device tensor, ``row_mask.sum()``.
        """
        flat, valid = self.targets, self.valid
        self.rows, self.row_targets = None, flat
        self.row_mask = valid
        self.row_poison = valid & ((flat < 0) | (flat >= vocab_size))
        self._kept_all = True

    def _computed(self) -> None:
        if self.n_computed is None and not self._kept_all:
            raise RuntimeError("TokenLayout: call compact(vocab_size) before asking for the computed rows")

    def pick(self, t: Tensor) -> Tensor:
        """(N, ...) per position -> (M, ...) per computed row."""
        self._computed()
        return t if self.rows is None else t[self.rows]

    def scatter(self, values: Tensor) -> Tensor:
        """(M,) values of the computed rows -> (N,), zero (False) at the other positions."""
        self._computed()
        if self.row_mask is not None:  # every position computed: the ignored ones are zeroed, not dropped
            return torch.where(self.row_mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
        if self.rows is None:
            return values
        return values.new_zeros(self.n_positions).index_copy_(0, self.rows, values)

    def to_loss_positions(self, values: Tensor) -> Tensor:
        """(N,) per position -> (loss_shape) values of the loss positions (a view, no copy)."""
        return values.reshape(self.shape)[..., : self.loss_shape[-1]]

    # ------------------------------------------------------------------------------------------ per-token inputs

    def align(self, t: Tensor) -> Tensor:
        """A per-token input of the loss positions' shape (validated) -> (M,) float32 contiguous, aligned with
        the rows (detached: an objective's per-token inputs are constants)."""
        assert tuple(t.shape) == self.loss_shape, (tuple(t.shape), self.loss_shape)
        t = t.detach().to(torch.float32)
        if self.shift:  # the last `shift` positions of a row predict nothing: any value, never computed
            t = torch.cat([t, t.new_zeros((*self.shape[:-1], self.shape[-1] - t.shape[-1]))], dim=-1)
        return self.pick(t.reshape(-1)).contiguous()

    def segments(self) -> Tensor:
        """(M,) int64 sequence id of each computed row, numbered 0, 1, ... in order (TokenBatch.segments).

        Sequences are the rows of the labels (last dimension), split further
        where ``position_ids`` restarts at 0 (packed documents). A position
        belongs to the sequence of its own token, whose successor it predicts.
        """
        starts = torch.zeros(self.shape, dtype=torch.bool, device=self.targets.device)
        if self.shape[-1] > 0:
            starts[..., 0] = True
        if self.position_ids is not None:
            starts |= self.position_ids == 0
        ids = self.pick(torch.cumsum(starts.reshape(-1).long(), dim=0) - 1)
        return _renumber(ids)


def _positions_of_true(mask: Tensor, count: int) -> Tensor:
    """(count,) int64 indices where the (N,) bool ``mask`` is True, in order, without a device sync.

    ``count`` is the number of True entries, already read. False entries scatter
    to a spare slot past the end, which is dropped.
    """
    slot = torch.where(mask, torch.cumsum(mask.long(), dim=0) - 1, count)
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    return out.scatter_(0, slot, torch.arange(mask.numel(), device=mask.device))[:count]


def _renumber(segments: Tensor) -> Tensor:
    """Non-decreasing sequence ids -> 0, 1, 2, ... in order (TokenBatch.segments' contract).

    Dropping ignored tokens leaves gaps (a fully ignored sequence, or ids up to
    N for M < N tokens); consecutive ids keep per-sequence sums in an (M,)
    buffer without asking the device how many sequences there are.
    """
    if segments.numel() == 0:
        return segments
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[1:] = segments[1:] != segments[:-1]
    return torch.cumsum(starts.long(), dim=0) - 1
