"""One validated call of the loss: what the autograd Function and the objective terms need, built once.

``dft_ops.linear_cross_entropy`` validates its arguments (the door) and builds
a :class:`LossCall` with :func:`build_call` (as do the custom operators of
:mod:`dft_ops.custom_op`, from the same checked arguments); the Function
(:mod:`dft_ops.autograd`) and the per-token terms (:mod:`dft_ops.loss_terms`)
read it; the backend receives only the contract's types
(:mod:`dft_ops.backends.protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .backends import Plan, select_backend
from .backends.protocol import Backend, Head, Needs, SecondHead, Tokens
from .backends.sharded import ShardedBackend
from .distributed import VocabParallel
from .inputs import num_items_divisor
from .layout import TokenLayout
from .objectives import Distill
from .options import LossOptions


@dataclass(frozen=True, eq=False)
class LossCall:
    """The settings and this batch's data of one call, every piece validated.

    Attributes:
        layout: the compacted :class:`~dft_ops.TokenLayout` (its M rows are what the backends compute).
        options: the call's :class:`~dft_ops.LossOptions` (``vocab_parallel`` checked against its group).
        head: the :class:`~dft_ops.backends.protocol.Head`; its ``weight`` / ``bias`` are replaced by the
            Function's own inputs in forward (the same tensors, as autograd sees them).
        backend: the :class:`~dft_ops.backends.protocol.Backend` (wrapped for vocabulary parallelism).
        vocab_size: V of the whole vocabulary (the group's, under vocabulary parallelism).
        token_inputs: the objective's per-token inputs by name, each (M,) float32 aligned with the rows.
        segments: (M,) int64 sequence ids for objectives with ``needs_segments``, else None.
        divisor: the "mean" reduction's divisor (1.0 for "sum"), or None for reduction "none".
        plan: how the call runs (:class:`~dft_ops.backends.Plan`: one-pass or two passes), decided at the door.
        needs: which gradients the call will need (grad mode and ``requires_grad`` at the door).
    """

    layout: TokenLayout
    options: LossOptions
    head: Head
    backend: Backend
    vocab_size: int
    token_inputs: dict[str, Tensor] = field(default_factory=dict)
    segments: Tensor | None = None
    divisor: float | None = 1.0
    plan: Plan = Plan("two-pass", "")
    needs: Needs = Needs(True, True, False)

    @property
    def tokens(self) -> Tokens:
        """The computed tokens as the backends take them."""
        return Tokens(self.layout.row_targets, self.layout.rows)


def build_call(opts: LossOptions, plan: Plan, needs: Needs, weight: Tensor, bias: Tensor | None, labels: Tensor,
               position_ids: Tensor | None, num_items: float | Tensor | None, token_inputs: dict[str, Tensor],
               second: SecondHead | None, compute: torch.dtype, V: int, *, device: torch.device,
               split: VocabParallel | None = None, unlabeled: Tensor | None = None) -> LossCall:
    """The :class:`LossCall` of arguments already checked at the door (every type, shape, device and option;
    ``second`` as :func:`~dft_ops.inputs.check_second_head` returns it), decided how to run (``plan``, ``needs``,
    ``compute``): the layout, the values read (or, with ``sync_free``, computed on the device) and the divisor.

    Also what the custom operators (:mod:`dft_ops.custom_op`) build again inside their implementations.
    """
    backend = select_backend(opts, device, plan)
    if split is not None:
        backend = ShardedBackend(backend, split)
    layout = TokenLayout(labels, shift=opts.shift, ignore_index=opts.ignore_index, position_ids=position_ids,
                         unlabeled=unlabeled)
    class_weight = opts.class_weight
    if opts.sync_free:
        divisor = _device_divisor(layout, opts, num_items, V)
    else:
        divisor = _read_divisor(layout, opts, num_items, V)
    head = Head(weight, bias, opts.softcap, opts.temperature, compute, class_weight, second,
                opts.objective.mix_weight if isinstance(opts.objective, Distill) else None)
    return LossCall(layout, opts, head, backend, V,
                    token_inputs={name: layout.align(t) for name, t in token_inputs.items()},
                    segments=layout.segments() if opts.objective.needs_segments else None,
                    divisor=divisor, plan=plan, needs=needs)


def _read_divisor(layout: TokenLayout, opts: LossOptions, num_items, V: int) -> float | None:
    """Compacts the layout and returns the reduction's divisor: the call's one device synchronisation."""
    to_read = {"num_items": num_items} if isinstance(num_items, Tensor) else {}
    class_weight = opts.class_weight
    weighted_mean = class_weight is not None and opts.reduction == "mean" and num_items is None
    if class_weight is not None:
        to_read["invalid_class_weights"] = (~(torch.isfinite(class_weight) & (class_weight >= 0))).sum()
        if weighted_mean:
            # PyTorch's weighted mean: sum_t u[y_t] over non-ignored tokens (labels outside [0, V) fail in compact)
            u = class_weight.to(torch.float64).gather(0, layout.targets.clamp(0, V - 1))
            to_read["target_weight_sum"] = torch.where(layout.valid, u, 0.0).sum()
    # the call's one device sync: label range, the computed-token count, and the 0-d tensors to read with them
    read = dict(zip(to_read, layout.compact(V, *to_read.values())))
    if read.get("invalid_class_weights"):
        raise ValueError(f"class_weight: {int(read['invalid_class_weights'])} value(s) negative or not finite; "
                         "expected finite weights >= 0")
    if "num_items" in read:
        num_items = read["num_items"]
    if num_items is not None:
        divisor = num_items_divisor(num_items, layout.n_computed)
    elif weighted_mean:
        divisor = read["target_weight_sum"] or 1.0  # no weight at all (e.g. every token ignored): loss 0, not NaN
    else:
        divisor = max(layout.n_computed, 1)
    return {"none": None, "sum": 1.0}.get(opts.reduction, divisor)


def _device_divisor(layout: TokenLayout, opts: LossOptions, num_items, V: int) -> Tensor | float | None:
    """``sync_free``: every position kept (:meth:`TokenLayout.keep_all`) and the divisor as a float32 0-d device
    tensor, the default path's rules written as ``where`` s (what it would refuse becomes NaN, never a read)."""
    layout.keep_all(V)
    class_weight = opts.class_weight
    if class_weight is not None:
        # a weight the default path refuses: every row's loss and gradient NaN
        invalid = ~(torch.isfinite(class_weight) & (class_weight >= 0)).all()
        layout.row_poison = layout.row_poison | invalid
    if opts.reduction != "mean":
        return {"none": None, "sum": 1.0}[opts.reduction]
    f64 = dict(dtype=torch.float64, device=layout.targets.device)
    count = layout.valid.sum().to(torch.float64)
    if num_items is not None:
        # a filled tensor, not torch.tensor(value): a host-to-device copy cannot be captured in a CUDA graph
        num = num_items.to(**f64) if isinstance(num_items, Tensor) else torch.full((), float(num_items), **f64)
        usable = torch.isfinite(num) & (num > 0)
        divisor = torch.where((num == 0) & (count == 0), 1.0, torch.where(usable, num, float("nan")))
    elif class_weight is not None:
        u = class_weight.to(torch.float64).gather(0, layout.targets.clamp(0, V - 1))
        total = torch.where(layout.valid, u, 0.0).sum()
        divisor = torch.where(total == 0, 1.0, total)
    else:
        divisor = count.clamp(min=1.0)
    # the default path divides by a Python float, which float32 arithmetic rounds to float32
    return divisor.to(torch.float32)
