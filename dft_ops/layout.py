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

from .objectives import Objective
from .options import LossOptions

def check_dense(name: str, t: Tensor) -> None:
    """A clear error for tensors that carry no data (meta) or are not strided (sparse, nested)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name}: {t.layout} tensors are not supported; pass a dense (strided) tensor")
    if t.is_meta:
        raise ValueError(f"{name}: is a meta tensor (no data); pass a tensor with values on a real device")


class TokenLayout:
    """The token layout of one batch of labels.

    Args:
        labels: (..., S) integer tensor (any strides); ``ignore_index`` marks
            positions that contribute nothing. Unsigned dtypes up to 32 bits are
            read exactly; uint64 is refused (its values past 2**63 would wrap).
        shift: position t predicts ``labels[..., t + shift]`` (0: no shift; needs
            ``labels.ndim >= 2`` otherwise, so sequences cannot run into each other).
        ignore_index: an int64.
        position_ids: (..., S) integer tensor or None: packed documents start
            where it is 0 (sequence ids, :meth:`segments`).

    Attributes (no device synchronisation until :meth:`compact`):
        shape: labels' shape, the positions (hidden's leading shape).
        loss_shape: the loss positions' shape, ``(..., max(S - shift, 0))``.
        n_positions: N.
        mask: (loss_shape) bool, True where the label is not ignored.
        targets: (N,) int64 contiguous, the label each position predicts
            (``ignore_index`` for the last ``shift`` positions of a row).
        valid: (N,) bool, ``targets != ignore_index``.
        rows: (M,) int64 positions the kernels compute, or None (all N); set by :meth:`compact`.
        row_targets: (M,) int64 contiguous targets of the rows; set by :meth:`compact`.
    """

    def __init__(self, labels: Tensor, *, shift: int = 0, ignore_index: int = -100,
                 position_ids: Tensor | None = None):
        # the options' own checks: a layout built outside the functional API validates the same way
        self.shift = LossOptions.check("shift", shift)
        self.ignore_index = LossOptions.check("ignore_index", ignore_index)
        self._check_labels(labels)
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
        self.position_ids = self._check_position_ids(position_ids, labels)
        self.rows: Tensor | None = None
        self.row_targets: Tensor | None = None
        self.n_computed: int | None = None

    # ------------------------------------------------------------------------------------------ checks

    def _check_labels(self, labels) -> None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
        check_dense("labels", labels)
        if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise TypeError(f"labels: expected an integer tensor (int64), got {labels.dtype}")
        if labels.ndim == 0:
            raise ValueError("labels: expected at least one dimension (the positions), got a 0-d tensor")
        if labels.dtype == torch.uint64:
            raise TypeError(f"labels: {labels.dtype} is not supported (values past 2**63 would wrap to negative ids, "
                            "e.g. into ignore_index); use int64")
        if self.shift and labels.ndim < 2:
            raise ValueError(
                f"shift: needs labels with a sequence dimension, shape (batch, seq) or (..., seq); got shape "
                f"{tuple(labels.shape)}. Flattened tokens of several sequences cannot be shifted safely: "
                "shift them yourself or pass 2-D labels."
            )

    @staticmethod
    def _check_position_ids(position_ids, labels: Tensor) -> Tensor | None:
        if position_ids is None:
            return None
        if not isinstance(position_ids, Tensor) or position_ids.dtype.is_floating_point \
                or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise TypeError("position_ids: expected an integer tensor of the labels' shape or None")
        check_dense("position_ids", position_ids)
        if tuple(position_ids.shape) != tuple(labels.shape):
            raise ValueError(f"position_ids: shape {tuple(position_ids.shape)} does not match labels' "
                             f"{tuple(labels.shape)}")
        if position_ids.device != labels.device:
            raise ValueError(f"position_ids: on {position_ids.device} but the labels are on {labels.device}")
        return position_ids.contiguous()

    # ------------------------------------------------------------------------------------------ compaction

    def compact(self, vocab_size: int, *read_along: Tensor) -> list[float]:
        """Checks the labels against the vocabulary and drops ignored positions from the work: one device sync.

        Sets :attr:`rows`, :attr:`row_targets` and :attr:`n_computed`.

        Args:
            vocab_size: V; a label that is not ``ignore_index`` must be in [0, V).
            read_along: 0-d tensors to read in the same synchronisation (e.g.
                the Trainer's ``num_items_in_batch``, a device tensor every step).

        Returns:
            the values of ``read_along``, as floats.

        Raises:
            ValueError("labels: ...") for labels outside [0, V) that are not ignore_index.
        """
        flat, valid = self.targets, self.valid
        bad = valid & ((flat < 0) | (flat >= vocab_size))
        values = [bad.sum(), valid.sum(), *(t.to(flat.device) for t in read_along)]
        read = torch.stack([v.to(torch.float64) for v in values]).tolist()
        n_bad, n_valid = int(read[0]), int(read[1])
        if n_bad:
            raise ValueError(f"labels: {n_bad} value(s) outside [0, {vocab_size}) (vocabulary size from weight) that "
                             f"are not ignore_index={self.ignore_index}")
        self.n_computed = n_valid
        if n_valid == self.n_positions:
            self.rows, self.row_targets = None, flat
        else:
            self.rows = _positions_of_true(valid, n_valid)
            self.row_targets = flat[self.rows]
        return read[2:]

    def _computed(self) -> None:
        if self.n_computed is None:
            raise RuntimeError("TokenLayout: call compact(vocab_size) before asking for the computed rows")

    def pick(self, t: Tensor) -> Tensor:
        """(N, ...) per position -> (M, ...) per computed row."""
        self._computed()
        return t if self.rows is None else t[self.rows]

    def scatter(self, values: Tensor) -> Tensor:
        """(M,) values of the computed rows -> (N,), zero (False) at the other positions."""
        self._computed()
        if self.rows is None:
            return values
        return values.new_zeros(self.n_positions).index_copy_(0, self.rows, values)

    def to_loss_positions(self, values: Tensor) -> Tensor:
        """(N,) per position -> (loss_shape) values of the loss positions (a view, no copy)."""
        return values.reshape(self.shape)[..., : self.loss_shape[-1]]

    # ------------------------------------------------------------------------------------------ per-token inputs

    def align(self, t, where: str) -> Tensor:
        """A per-token input of the loss positions' shape -> (M,) float32 contiguous, aligned with the rows.

        ``where`` names the input in error messages (e.g. "objective: PSFT.old_logprobs").
        """
        if not isinstance(t, Tensor):
            raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
        check_dense(where, t)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{where} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != self.loss_shape:
            raise ValueError(f"{where} has shape {tuple(t.shape)}; expected the loss positions' shape {self.loss_shape}"
                             + (f" (labels[..., {self.shift}:] with shift={self.shift})" if self.shift else ""))
        if t.device != self.targets.device:
            raise ValueError(f"{where} is on {t.device} but the labels are on {self.targets.device}")
        t = t.detach().to(torch.float32)
        if self.shift:  # the last `shift` positions of a row predict nothing: any value, never computed
            t = torch.cat([t, t.new_zeros((*self.shape[:-1], self.shape[-1] - t.shape[-1]))], dim=-1)
        return self.pick(t.reshape(-1)).contiguous()

    def objective_inputs(self, objective: Objective) -> dict[str, Tensor]:
        """The objective's per-token tensors, each aligned with the computed rows: (M,) float32."""
        out = {}
        for name, t in objective.token_tensors().items():
            where = f"objective: {type(objective).__name__}.{name}"
            if t is None:
                raise ValueError(f"{where} is None: pass this batch's tensor (objective.with_token_tensors({name}=...), "
                                 f"or the forward keyword {name}=... of a model patched with dft_ops.patch)")
            out[name] = self.align(t, where)
        return out

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
