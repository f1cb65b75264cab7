"""The autograd Function joining the objective table to a backend's two passes.

forward: backend.lse_forward -> loss_terms.token_loss (objective value with the options, gradient
coefficients). backward: upstream gradient x coefficients per token -> backend.grad_backward.

Saved for backward: the inputs themselves (no copies) and O(tokens) floats
(log-sum-exp, gradient coefficients) - never logits.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from .backend_contract import FLOAT_DTYPES, GradCoefficients, ReferenceHead, select_backend
from .dtensor_inputs import replicated_local
from .layout import TokenLayout, check_dense
from .loss_terms import token_loss
from .objectives import ASFT, Objective
from .options import LossOptions
from .vocab_parallel import ShardedBackend


class FunctionOutputs(NamedTuple):
    """The Function's outputs, each (N,) and zero at the positions not computed.

    ``value`` (float32) is the only differentiable one. ``logprob`` (float32)
    is always computed; the others only with ``options.return_stats`` (else
    None): ``entropy`` float32, ``is_top1`` bool, ``lse`` float32 (log-sum-exp
    of the capped, tempered logits), ``predicted`` int64 (first index of the
    largest logit), ``z_loss`` float32 (``options.z_loss * lse^2``, the part of
    ``value`` that is z-loss; None when the option is 0), ``kl`` float32 (the
    KL to the reference of an ASFT objective, unscaled; None for other objectives).
    """

    value: Tensor
    logprob: Tensor
    entropy: Tensor | None = None
    is_top1: Tensor | None = None
    lse: Tensor | None = None
    predicted: Tensor | None = None
    z_loss: Tensor | None = None
    kl: Tensor | None = None


class HeadGrads(NamedTuple):
    """What backward returns for the differentiable inputs of the Function (None where not needed)."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


# the Function's inputs after the three tensors (layout, options): never differentiable
_NOT_DIFFERENTIABLE = (None, None)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The float dtype autocast runs ``nn.Linear`` in on ``device`` now, or None (autocast off)."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    return None


def reference_head(objective: Objective, layout: TokenLayout, hidden: Tensor, weight: Tensor,
                   vocab_parallel=None) -> ReferenceHead | None:
    """An ASFT objective's reference as a :class:`ReferenceHead` of hidden's (N, .) rows; None for other rows.

    ``ref_hidden`` (..., D_ref) must have the labels' (hidden's leading) shape;
    it is viewed as (N, D_ref) like hidden (a copy only when it cannot be).
    ``Replicate()`` DTensors are read as their local tensors; other placements
    are refused. Errors name the argument of :meth:`ASFT.with_reference`.
    """
    if not isinstance(objective, ASFT):
        return None
    if not objective.has_reference:
        raise ValueError("objective: ASFT needs a reference: pass objective.with_reference(ref_hidden, ref_weight, "
                         "ref_bias=None, ref_softcap=None) for this batch (dft_ops.patch(..., reference=...) does "
                         "it per batch)")
    if vocab_parallel is not None:
        raise ValueError("vocab_parallel: ASFT is not supported with a vocabulary-parallel head yet (the reference's "
                         "log-sum-exp and KL sums would need their own all-reduces); gather the heads or use "
                         "another objective")
    # replicated DTensors (a reference under tensor parallelism or FSDP's gathered views) compute locally
    ref_hidden, ref_weight, ref_bias = (replicated_local(name, t) for name, t in (
        ("ref_hidden", objective.ref_hidden), ("ref_weight", objective.ref_weight), ("ref_bias", objective.ref_bias)))
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is None:
            continue
        check_dense(name, t)
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported; use float32, bfloat16 or float16")
        if t.device != hidden.device:
            raise ValueError(f"{name}: on {t.device} but hidden is on {hidden.device}; put all inputs on one device")
    if ref_hidden.ndim < 1 or tuple(ref_hidden.shape[:-1]) != layout.shape:
        raise ValueError(f"ref_hidden: shape {tuple(ref_hidden.shape)} does not match hidden's leading shape "
                         f"{layout.shape}; expected (..., D_ref)")
    if ref_hidden.shape[-1] == 0:
        raise ValueError("ref_hidden: hidden size D_ref (last dimension) is 0")
    V, D_ref = weight.shape[0], ref_hidden.shape[-1]
    if tuple(ref_weight.shape) != (V, D_ref):
        raise ValueError(f"ref_weight: expected shape ({V}, {D_ref}) (the model's vocabulary, ref_hidden's "
                         f"D_ref), got {tuple(ref_weight.shape)}")
    if ref_bias is not None and tuple(ref_bias.shape) != (V,):
        raise ValueError(f"ref_bias: expected shape ({V},) (V,), got {tuple(ref_bias.shape)}")
    return ReferenceHead(ref_hidden.reshape(-1, D_ref), ref_weight, ref_bias, objective.ref_softcap)


def _no_autocast(device: torch.device):
    """The backends choose their own precisions: autocast must not recast their matmuls (forward or backward)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token objective values of ``hidden @ weight.T + bias`` at the positions of a TokenLayout.

    ``apply(hidden, weight, bias, layout, options)``:
        hidden (N, D), weight (V, D), bias (V,) | None, float32 / bfloat16 /
        float16, dtypes may differ (the backends round the products' operands
        to the lower precision in registers; each gradient comes back in its
        input's dtype); under autocast, the products run in autocast's dtype;
        layout: a :class:`~dft_ops.layout.TokenLayout` of N positions, already
        compacted (its rows and targets, in [0, V), are what the kernels compute);
        options: :class:`~dft_ops.LossOptions`, every field but shift,
        ignore_index (the layout's) and reduction (the caller's) read here;
        ``class_weight`` already checked against V and hidden's device; the
        backend from ``backend``, ``backward_mode`` and ``workspace_mb``.
        With ``vocab_parallel`` (checked: ``vocab_size`` set) weight, bias and
        the backends' share of ``class_weight`` are the rank's rows and both
        passes are collectives; ``class_weight`` itself is the whole (V,) vector.

    Returns the tuple of :class:`FunctionOutputs` (``FunctionOutputs(*apply(...))``).

    Not twice differentiable: asking for a graph through the gradient
    (``create_graph=True``) raises a RuntimeError.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, layout: TokenLayout, options: LossOptions):
        backend = select_backend(options, hidden.device)
        vocab_size = weight.shape[0]
        if options.vocab_parallel is not None:  # weight holds rows of a vocabulary split over ranks
            backend, vocab_size = ShardedBackend(backend, options.vocab_parallel), options.vocab_parallel.vocab_size
        objective = options.objective
        # every check of the objective's inputs happens here, before any kernel runs
        reference = reference_head(objective, layout, hidden, weight, options.vocab_parallel)
        inputs = layout.objective_inputs(objective)
        segments = layout.segments() if objective.needs_segments else None
        # read here, not in backward: the engine runs backward outside the autocast region
        compute_dtype = autocast_dtype(hidden.device)
        smoothing = options.label_smoothing > 0
        with _no_autocast(hidden.device):
            stats = backend.lse_forward(hidden, weight, bias, layout.row_targets, layout.rows,
                                        softcap=options.softcap, temperature=options.temperature,
                                        with_stats=options.return_stats, smoothing=smoothing,
                                        class_weight=options.class_weight if smoothing else None,
                                        compute_dtype=compute_dtype, **_reference_kwargs(reference))
        terms = token_loss(stats, layout.row_targets, objective, vocab_size=vocab_size, inputs=inputs,
                           segments=segments, label_smoothing=options.label_smoothing,
                           class_weight=options.class_weight, z_loss=options.z_loss)

        ref_tensors = (reference.hidden, reference.weight, reference.bias) if reference is not None else (None,) * 3
        ctx.save_for_backward(hidden, weight, bias, stats.lse, *terms.coef, *ref_tensors, stats.ref_lse)
        ctx.backend, ctx.layout, ctx.options, ctx.compute_dtype = backend, layout, options, compute_dtype
        ctx.ref_softcap = None if reference is None else reference.softcap

        out = FunctionOutputs(layout.scatter(terms.value), layout.scatter(terms.logp))
        if options.return_stats:
            out = out._replace(entropy=layout.scatter(stats.entropy),
                               is_top1=layout.scatter(stats.target_logit >= stats.max_logit),
                               # a copy: stats.lse is saved for backward, and the caller may edit what it gets
                               lse=layout.scatter(stats.lse.clone()), predicted=layout.scatter(stats.argmax),
                               z_loss=None if terms.z_loss is None else layout.scatter(terms.z_loss),
                               kl=None if terms.kl is None else layout.scatter(terms.kl))
        ctx.mark_non_differentiable(*[t for t in out[1:] if t is not None])
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_value, *_):
        if torch.is_grad_enabled():
            # the engine enables grad mode in backward exactly when create_graph=True
            raise RuntimeError(
                "dft_ops.linear_cross_entropy: double backward is not supported: the fused backward's gradients are "
                "not differentiable, so a loss built from them (e.g. a gradient penalty through "
                "autograd.grad(..., create_graph=True)) would silently miss its second-order terms"
            )
        hidden, weight, bias, lse, *saved = ctx.saved_tensors
        n_coef = len(GradCoefficients._fields)
        coef, (ref_hidden, ref_weight, ref_bias, ref_lse) = saved[:n_coef], saved[n_coef:]
        reference = None if ref_hidden is None else ReferenceHead(ref_hidden, ref_weight, ref_bias, ctx.ref_softcap)
        layout, options = ctx.layout, ctx.options
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_hidden or need_weight or need_bias):
            return (*HeadGrads(None, None, None), *_NOT_DIFFERENTIABLE)
        upstream = layout.pick(grad_value).to(torch.float32)
        coef = GradCoefficients(*(upstream * c if c is not None else None for c in coef))
        with _no_autocast(hidden.device):
            d_hidden, d_weight, d_bias = ctx.backend.grad_backward(
                hidden, weight, bias, layout.row_targets, layout.rows, lse, coef,
                softcap=options.softcap, temperature=options.temperature,
                class_weight=options.class_weight if coef.uniform is not None else None,
                need_hidden=need_hidden, need_weight=need_weight, need_bias=bias is not None and need_bias,
                filter_eps=options.filter_eps, precise=options.precise, compute_dtype=ctx.compute_dtype,
                **_reference_kwargs(reference, ref_lse),
            )
        return (*HeadGrads(d_hidden, d_weight, d_bias), *_NOT_DIFFERENTIABLE)


def _reference_kwargs(reference: ReferenceHead | None, ref_lse: Tensor | None = None) -> dict:
    """Backend keywords for a reference head: none at all without one (wrapped backends need not know them)."""
    if reference is None:
        return {}
    return {"reference": reference} if ref_lse is None else {"reference": reference, "ref_lse": ref_lse}
