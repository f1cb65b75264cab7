"""The door's checks: every tensor argument of ``linear_cross_entropy``, validated once.

The functional API calls these before any work (settings are
:class:`~dft_ops.LossOptions`' own checks); the layers below receive
validated values and only assert shapes. Each check raises a TypeError /
ValueError whose message starts with the argument's name, never a kernel's
out-of-bounds read. Nothing here synchronises the device: values (labels in
range, class weights finite, ``num_items_in_batch``) are read in the call's
one synchronisation (:meth:`dft_ops.TokenLayout.compact`).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .backends.protocol import FLOAT_DTYPES, SecondHead, product_dtype

TOKEN_INPUTS = ("old_logprobs", "ref_logprobs")
"""The objectives' per-token inputs a call can pass (:attr:`dft_ops.objectives.Objective.token_inputs`)."""


def check_dense(name: str, t: Tensor) -> None:
    """A clear error for tensors that carry no data (meta) or are not strided (sparse, nested)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name}: {t.layout} tensors are not supported; pass a dense (strided) tensor")
    if t.is_meta:
        raise ValueError(f"{name}: is a meta tensor (no data); pass a tensor with values on a real device")


def _tensor(name: str, t, optional: bool = False) -> None:
    if optional and t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    check_dense(name, t)


def _float(name: str, t: Tensor | None) -> None:
    if t is not None and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; use float32, bfloat16 or float16")


def _same_device(name: str, t: Tensor | None, device: torch.device) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device} but hidden is on {device}; put all inputs on one device")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The float dtype autocast runs ``nn.Linear`` in on ``device`` now, or None (autocast off)."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        if dtype in FLOAT_DTYPES:
            return dtype
    return None


def compute_dtype(weight_name: str, hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a head's products run in (the one rule for the model's head and a second head).

    Under autocast for hidden's device: the autocast dtype (what ``nn.Linear``
    would compute in). Otherwise the 16-bit dtype of hidden and weight, or
    float32 when both are (:func:`~dft_ops.backends.protocol.product_dtype`).
    bfloat16 with float16 has no common lower precision: a TypeError naming
    ``weight_name``. A bias (any float dtype) is added in fp32 and never decides.
    """
    requested = autocast_dtype(hidden.device)
    if requested is None and {hidden.dtype, weight.dtype} == {torch.bfloat16, torch.float16}:
        raise TypeError(f"{weight_name}: dtype {weight.dtype} cannot be combined with the hidden states' "
                        f"{hidden.dtype} (no common lower precision); cast one of them")
    return product_dtype(hidden.dtype, weight.dtype, requested)


def check_head_inputs(hidden, weight, labels, bias, *, vocab_rows: bool = False) -> None:
    """hidden (..., D), weight (V, D), labels (...), bias (V,) | None: types, dtypes, shapes, one device.

    ``vocab_rows``: weight holds some rows of a vocabulary split over ranks (possibly none).
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        _tensor(name, t)
    _tensor("bias", bias, optional=True)
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        _float(name, t)
    if hidden.ndim < 2:
        raise ValueError(f"hidden: expected shape (..., D) with at least one token dimension, got {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError("hidden: hidden size D (last dimension) is 0")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected shape (V, D), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match hidden size D={hidden.shape[-1]}; "
                         "expected (V, D)")
    if weight.shape[0] == 0 and not vocab_rows:
        raise ValueError("weight: vocabulary size V (first dimension) is 0")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) (V,), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        _same_device(name, t, hidden.device)
    compute_dtype("weight", hidden, weight)


def check_labels(labels: Tensor, shift: int = 0) -> None:
    """An integer tensor of at least one dimension (two with a shift); values are checked in compaction."""
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels: expected an integer tensor (int64), got {labels.dtype}")
    if labels.ndim == 0:
        raise ValueError("labels: expected at least one dimension (the positions), got a 0-d tensor")
    if labels.dtype == torch.uint64:
        raise TypeError(f"labels: {labels.dtype} is not supported (values past 2**63 would wrap to negative ids, "
                        "e.g. into ignore_index); use int64")
    if shift and labels.ndim < 2:
        raise ValueError(
            f"shift: needs labels with a sequence dimension, shape (batch, seq) or (..., seq); got shape "
            f"{tuple(labels.shape)}. Flattened tokens of several sequences cannot be shifted safely: "
            "shift them yourself or pass 2-D labels."
        )


def check_position_ids(position_ids, labels: Tensor) -> None:
    if position_ids is None:
        return
    if not isinstance(position_ids, Tensor) or position_ids.dtype.is_floating_point \
            or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError("position_ids: expected an integer tensor of the labels' shape or None")
    check_dense("position_ids", position_ids)
    if tuple(position_ids.shape) != tuple(labels.shape):
        raise ValueError(f"position_ids: shape {tuple(position_ids.shape)} does not match labels' "
                         f"{tuple(labels.shape)}")
    if position_ids.device != labels.device:
        raise ValueError(f"position_ids: on {position_ids.device} but the labels are on {labels.device}")


def check_num_items(value) -> float | Tensor | None:
    """None, a finite float >= 0, or a 0-d real tensor to read with the labels (its value is checked
    after reading, with :func:`num_items_divisor`)."""
    if value is None:
        return None
    name = "num_items_in_batch"
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a positive number or a tensor holding one, got bool")
    if isinstance(value, Tensor):
        check_dense(name, value)
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name}: expected a real (integer or floating) tensor, got {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a single number, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive number or a tensor holding one, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: must be a positive finite number, got {value}")
    return value


def num_items_divisor(value: float, n_computed: int) -> float:
    """The "mean" divisor from a read ``num_items_in_batch``.

    0 is the count of a batch with no token to train on (transformers.Trainer
    passes it for a micro-batch whose labels are all ignored): with nothing
    to divide either, the loss is 0 and its gradients are zero, as for every
    all-ignored batch. With tokens to train on, 0 is an error.
    """
    if value == 0 and n_computed == 0:
        return 1.0
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"num_items_in_batch: must be a positive finite number, got {value}"
                         + (f" with {n_computed} token(s) to train on" if value == 0 else ""))
    return value


def check_class_weight(class_weight: Tensor, V: int, device: torch.device) -> None:
    """Length and device (the option checked type and rank; values are read in compaction)."""
    if tuple(class_weight.shape) != (V,):
        raise ValueError(f"class_weight: expected shape ({V},) (V, the whole vocabulary's size), "
                         f"got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"class_weight: on {class_weight.device} but hidden is on {device}; "
                         "put it on hidden's device")


def check_token_input(name: str, t, loss_shape: tuple, shift: int, device: torch.device) -> None:
    """A per-token input of an objective (``old_logprobs``, ``ref_logprobs``): a float tensor of the loss
    positions' shape (labels, or ``labels[..., shift:]``) on the labels' device."""
    _tensor(name, t)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(loss_shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}; expected the loss positions' shape {tuple(loss_shape)}"
                         + (f" (labels[..., {shift}:] with shift={shift})" if shift else ""))
    if t.device != device:
        raise ValueError(f"{name}: on {t.device} but the labels are on {device}")


def check_second_head(second, leading_shape: tuple, V: int, hidden: Tensor) -> SecondHead:
    """A call's ``second_head`` as the backends take it: hidden viewed as (N, D2), its compute dtype decided.

    The same rules as the model's head (:func:`check_head_inputs`, :func:`compute_dtype`); errors name
    ``second_head.<field>``. Replicated DTensors are read as their local tensors.
    """
    from .distributed.dtensor_inputs import replicated_local

    if not isinstance(second, SecondHead):
        raise TypeError(f"second_head: expected a dft_ops.SecondHead or None, got {type(second).__name__}")
    fields = {f: replicated_local(f"second_head.{f}", getattr(second, f)) for f in ("hidden", "weight", "bias")}
    for f, t in fields.items():
        _tensor(f"second_head.{f}", t, optional=f == "bias")
        _float(f"second_head.{f}", t)
        _same_device(f"second_head.{f}", t, hidden.device)
    h2, w2, b2 = fields["hidden"], fields["weight"], fields["bias"]
    if h2.ndim < 1 or tuple(h2.shape[:-1]) != tuple(leading_shape):
        raise ValueError(f"second_head.hidden: shape {tuple(h2.shape)} does not match hidden's leading shape "
                         f"{tuple(leading_shape)}; expected (..., D2)")
    if h2.shape[-1] == 0:
        raise ValueError("second_head.hidden: hidden size D2 (last dimension) is 0")
    D2 = h2.shape[-1]
    if tuple(w2.shape) != (V, D2):
        raise ValueError(f"second_head.weight: expected shape ({V}, {D2}) (the model's vocabulary, the second "
                         f"head's hidden size), got {tuple(w2.shape)}")
    if b2 is not None and tuple(b2.shape) != (V,):
        raise ValueError(f"second_head.bias: expected shape ({V},) (V,), got {tuple(b2.shape)}")
    softcap = second.softcap
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not (math.isfinite(softcap) and softcap > 0)):
        raise ValueError(f"second_head.softcap: must be a positive finite number or None, got {softcap!r}")
    dtype = compute_dtype("second_head.weight", h2, w2)
    return SecondHead(h2.detach().reshape(-1, D2), w2.detach(), None if b2 is None else b2.detach(),
                      None if softcap is None else float(softcap), dtype)


def check_token_input_presence(objective, given: set[str]) -> None:
    """Refuses a per-token input the objective does not read, or one it reads that is missing (``given``: the
    names passed)."""
    wanted = set(objective.token_inputs)
    for name in TOKEN_INPUTS:
        if name in wanted and name not in given:
            raise ValueError(f"{name}: objective {type(objective).__name__} needs this batch's {name}: pass "
                             f"linear_cross_entropy(..., {name}=...) (a patched model takes the forward keyword "
                             f"{name}=...)")
        if name not in wanted and name in given:
            raise ValueError(f"{name}: objective {type(objective).__name__} takes no {name} (its per-token inputs: "
                             f"{list(objective.token_inputs) or 'none'})")


def check_second_head_presence(objective, given: bool) -> None:
    """Refuses a second head missing for an objective that compares with one, or given to another."""
    if objective.needs_second_head and not given:
        raise ValueError(f"second_head: objective {type(objective).__name__} compares with a frozen second "
                         "head: pass second_head=dft_ops.SecondHead(hidden2, weight2, bias=None, softcap=None) "
                         "for this batch (dft_ops.patch(..., reference=...) does it per batch)")
    if given and not objective.needs_second_head:
        raise ValueError(f"second_head: objective {type(objective).__name__} takes no second head "
                         "(only objectives such as ASFT and Distill compare with one)")


def check_distill_mask(distill_mask, objective, loss_shape: tuple, shift: int, device: torch.device) -> Tensor | None:
    """The loss positions without a label that a call computes anyway, as a bool tensor of the loss positions'
    shape, or None: ``Distill(distill_unlabeled=True)``'s ``distill_mask`` (any nonzero entry: distilled), every
    loss position when it gives none; refused for any other objective."""
    from .objectives import Distill

    distills_unlabeled = isinstance(objective, Distill) and objective.distill_unlabeled
    if distill_mask is None:
        return torch.ones(loss_shape, dtype=torch.bool, device=device) if distills_unlabeled else None
    if not distills_unlabeled:
        raise ValueError(f"distill_mask: says which tokens without a label are distilled, for "
                         f"objectives.Distill(distill_unlabeled=True); objective {objective!r} computes only "
                         "the tokens with a label")
    _tensor("distill_mask", distill_mask)
    if distill_mask.dtype.is_floating_point or distill_mask.dtype.is_complex:
        raise TypeError(f"distill_mask: expected a bool (or integer) tensor, got {distill_mask.dtype}")
    if tuple(distill_mask.shape) != tuple(loss_shape):
        raise ValueError(f"distill_mask: shape {tuple(distill_mask.shape)}; expected the loss positions' shape "
                         f"{tuple(loss_shape)}" + (f" (labels[..., {shift}:] with shift={shift})" if shift else ""))
    if distill_mask.device != device:
        raise ValueError(f"distill_mask: on {distill_mask.device} but the labels are on {device}")
    return distill_mask != 0
