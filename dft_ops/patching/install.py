"""Installing and removing the patch: ``patch``, ``unpatch``, the patched ``forward`` and its options.

The patched forward only decides, per call, whether the call is a fused
training call (training mode with labels, or a caller protocol's call that
this patch serves) and hands it to :mod:`.fused_call`; everything else runs
the forward it wraps untouched.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch
from torch import nn

from ..options import LossOptions
from . import fused_call, protocols
from .head import PatchError, check_head, output_head
from .probe import probe_head_transform, transform_inputs
from .reference import Reference, make_reference, reference_inputs
from .state import STATE_ATTR, PatchState, causal_lm_of, probe_unpatched

# what the model or each forward call decides: never a patch option (every other LossOptions field is one)
_MODEL_OPTIONS = ("softcap", "shift", "vocab_parallel")
_CALL_INPUTS = ("bias", "num_items_in_batch", "position_ids", "weight", "hidden", "labels")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- public API


def patch(model: nn.Module, objective="dft", reference=None, **loss_options) -> nn.Module:
    """Make ``model``'s training loss dft-ops' fused linear + objective loss, in place.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (transformers 5.x), a PEFT
            model wrapping one (adapters anywhere but on the output head), or
            a ``DistributedDataParallel`` / DeepSpeed engine wrapping either
            (its ``.module`` is patched).
        objective: "dft", "ce" or an instance from :mod:`dft_ops.objectives`.
        reference: for the objectives with a second head only (required
            there): ``objectives.ASFT``'s frozen reference model of the KL
            term, ``objectives.Distill``'s teacher. Either another causal LM
            with the same vocabulary (any family or size; not modified, not
            made a submodule; its soft-cap and logit scale are probed like the
            model's), or ``"adapters_disabled"`` for a PEFT model: the same
            model with its adapters switched off (no second copy). Its forward
            runs on each training call's inputs under ``torch.no_grad()`` in
            eval mode; no logits of either model are built. With
            ``Distill(distill_unlabeled=True)`` a call's 2-D attention mask
            says which tokens without a label are distilled (no padding).
        **loss_options: every :class:`dft_ops.LossOptions` field but
            ``softcap`` and ``shift``, as in :func:`dft_ops.linear_cross_entropy`:
            ``ignore_index``, ``reduction`` ("mean" | "sum"), ``return_stats``
            (attach :class:`dft_ops.TokenStats` to the output as
            ``output.token_stats``), ``backend``, ``filter_eps``,
            ``label_smoothing``, ``z_loss``, ``temperature``, ``class_weight``,
            ``precise`` (and the backward options). The soft-cap, logit scale,
            bias, shift, ``num_items_in_batch`` and ``position_ids`` come from
            the model and the call; ``vocab_parallel`` from a tensor-parallel
            head's DTensor weight.

    Returns:
        ``model`` itself. Patching again replaces the options (it never stacks).

    Raises:
        PatchError (a ValueError) naming the reason when the loss cannot be
        computed exactly: adapters or a non-``nn.Linear`` output head, a
        vocabulary slice / mask or unknown transform of the logits, a forward
        that does not compute its loss through ``self.loss_function``; a
        reference the loss cannot use (another vocabulary, a sharded or
        non-``nn.Linear`` head, no adapters to disable).
        TypeError / ValueError naming a bad option, or ``reference:`` for a
        reference missing (ASFT, Distill), given to another objective, or the model itself.
    """
    options = _validate_options(objective, loss_options)
    causal_lm = causal_lm_of(model)
    check_head(output_head(causal_lm))
    reference = _validate_reference(options.objective, reference, causal_lm)
    existing = causal_lm.__dict__.get(STATE_ATTR)
    if existing is not None and causal_lm.__dict__.get("forward") is existing.forward:
        if existing.options.objective != options.objective:
            _say_what_trains(causal_lm, options)
        existing.options, existing.reference = options, reference
        return model
    # an older patch that something else wrapped (e.g. TRL) must be inert while probing and after
    causal_lm.__dict__.pop(STATE_ATTR, None)
    try:
        transform, measured = probe_head_transform(causal_lm), transform_inputs(causal_lm)
    except BaseException:
        if existing is not None:
            causal_lm.__dict__[STATE_ATTR] = existing
        raise
    state = PatchState(options=options, transform=transform, transform_inputs=measured,
                       previous_forward=causal_lm.__dict__.get("forward"), reference=reference)
    state.forward = _PatchedForward(causal_lm, state)
    causal_lm.__dict__[STATE_ATTR] = state
    causal_lm.forward = state.forward
    _BypassGuard.install(causal_lm)
    _say_what_trains(causal_lm, options)
    return model


def _say_what_trains(causal_lm: nn.Module, options: LossOptions) -> None:
    # patch() defaults to DFT (the package's purpose) where the functional API defaults to CE: say which, once
    logger.info("patch: %s trains %r through the fused head%s", type(causal_lm).__name__, options.objective,
                " (dft_ops.patch(model, objective='ce') trains cross-entropy)"
                if type(options.objective).__name__ == "DFT" else "")


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the forward that :func:`patch` replaced. A model that is not patched is returned as is."""
    causal_lm = causal_lm_of(model)
    state = causal_lm.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return model
    _BypassGuard.remove(causal_lm)
    if causal_lm.__dict__.get("forward") is state.forward:
        if state.previous_forward is None:
            del causal_lm.forward
        else:
            causal_lm.forward = state.previous_forward
    # else someone wrapped our forward after patching (e.g. TRL): it stays in their chain but is inert now
    return model


# ----------------------------------------------------------------------------------------------- options


def _validate_options(objective, loss_options: dict) -> LossOptions:
    """The patch's LossOptions: every option but those the model and each call decide."""
    for name in loss_options:
        if name in _MODEL_OPTIONS or name in _CALL_INPUTS:
            raise ValueError(
                f"{name}: is not a patch option; dft-ops reads it from the model or the forward call "
                "(soft-cap and logit scale from the model, the vocabulary split from a tensor-parallel head's DTensor "
                "weight, labels / shift_labels / num_items_in_batch / position_ids "
                "from the call)"
            )
    user_options = tuple(n for n in LossOptions.names() if n not in _MODEL_OPTIONS and n != "objective")
    for name in loss_options:
        if name not in user_options:
            raise TypeError(f"{name}: unknown loss option for dft_ops.patch; expected one of {user_options}")
    options = LossOptions.from_dict({"objective": objective, **loss_options})
    if options.reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: a patched model returns a scalar loss; use 'mean' or 'sum', got "
                         f"{options.reduction!r}")
    return options


def _validate_reference(objective, reference, causal_lm: nn.Module) -> Reference | None:
    """The patch's reference: required by an objective that compares with a second head (ASFT's reference model,
    Distill's teacher), refused otherwise."""
    wants_reference = objective.needs_second_head
    if getattr(objective, "has_reference", False):
        raise ValueError("objective: pass ASFT to patch without a reference head (no with_reference): the reference "
                         "model supplies each batch's hidden states")
    if wants_reference and reference is None:
        raise ValueError(f"reference: objective {type(objective).__name__} needs a reference model: "
                         "dft_ops.patch(model, objective=..., reference=frozen_causal_lm), or "
                         "reference='adapters_disabled' for a PEFT model")
    if not wants_reference and reference is not None:
        raise ValueError(f"reference: only ASFT and Distill compare with a reference (teacher) model; objective "
                         f"{objective!r} takes none")
    return make_reference(reference, causal_lm)


# ----------------------------------------------------------------------------------------- the forward


class _PatchedForward:
    """The patched ``forward``: an object (not a closure) so that ``copy.deepcopy(model)`` rebinds it to the copy.

    It wraps the forward found at patch time (the class's bound forward, or an
    instance attribute set by accelerate hooks, TRL or an older patch) and
    keeps its name, docstring and signature: ``generate()`` and ``Trainer``
    inspect them.
    """

    def __init__(self, causal_lm: nn.Module, state: PatchState):
        previous = causal_lm.forward
        self.model, self.state = causal_lm, state
        self.__wrapped__ = previous
        self.__signature__ = inspect.signature(previous)
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            value = getattr(previous, attr, None)
            if value is not None:
                setattr(self, attr, value)

    def __call__(self, *args, **kwargs):
        model, state, previous = self.model, self.state, self.__wrapped__
        if model.__dict__.get(STATE_ATTR) is not state:  # unpatched, or a newer patch wraps us: stay inert
            return previous(*args, **kwargs)
        state.active += 1
        try:
            return self._dispatch(model, state, previous, args, kwargs)
        finally:
            state.active -= 1

    def _dispatch(self, model, state: PatchState, previous, args, kwargs):
        # the patch's own protocol first: several may answer the same keyword (TRL's SFT and GRPO heads)
        own = state.protocol
        protocol = own if own is not None and own.claims(kwargs) else \
            next((p for p in protocols.registered() if p.claims(kwargs)), None)
        if protocol is not None and protocol is not state.protocol:
            raise PatchError(protocol.refusal())
        # per-token inputs of the objective (e.g. PSFT's old_logprobs) come as forward keywords,
        # a dataset column the Trainer passes along; the model's own forward never sees them
        token_tensors = {n: kwargs.pop(n) for n in state.options.objective.token_inputs if n in kwargs}
        signature = self.__signature__
        bound = signature.bind_partial(*args, **kwargs).arguments
        var_keyword = _var_keyword(signature)
        call_kwargs = bound.get(var_keyword) or {}

        def argument(name):
            return bound.get(name, call_kwargs.get(name))

        labels, shift_labels = bound.get("labels"), argument("shift_labels")
        if protocol is None and not (model.training and (labels is not None or shift_labels is not None)):
            if model.training and torch.is_grad_enabled() and not state.warned_unfused:
                _warn_unfused_training_call(state)
            return previous(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("labels: a fused head call needs labels or shift_labels")
        measured = transform_inputs(model)
        if measured != state.transform_inputs:  # a head hook or a config number changed since the last probe
            state.transform, state.transform_inputs = probe_unpatched(model), measured
        reference = None
        if state.reference is not None:  # first: its activations are gone before the model's are kept for backward
            inputs = {**{k: v for k, v in bound.items() if k != var_keyword}, **call_kwargs}
            reference = state.reference.head_for_call(model, state.transform, reference_inputs(inputs))
        call = fused_call.FusedCall(
            model, state, labels=labels, shift_labels=shift_labels, num_items_in_batch=argument("num_items_in_batch"),
            ignore_index=argument("ignore_index"), position_ids=argument("position_ids"), protocol=protocol,
            token_tensors=token_tensors, reference=reference, attention_mask=argument("attention_mask"))
        return fused_call.run(model, previous, args, kwargs, labels, call)


def _warn_unfused_training_call(state: PatchState) -> None:
    # A training-mode call without labels returns logits for a loss computed elsewhere, e.g.
    # transformers.Trainer with label_smoothing_factor or compute_loss_func pops the labels first:
    # that loss is not the patch's objective, and nothing else would say so.
    state.warned_unfused = True
    warnings.warn(
        "dft_ops.patch: a training-mode forward without labels returns full logits, so its loss is computed by the "
        "caller, not by dft-ops' fused objective. transformers.Trainer does this when label_smoothing_factor or "
        "compute_loss_func is set: use dft_ops.patch(model, objective=..., label_smoothing=...) instead. Shown once "
        "per patch.", stacklevel=4)


def _var_keyword(signature: inspect.Signature) -> str | None:
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return p.name
    return None


class _BypassGuard:
    """A pre-forward hook on the backbone: refuses a caller protocol's head that wraps the patched forward.

    A trainer that installs its own fused head *after* the patch (TRL's
    ``SFTTrainer`` built on a patched model) answers its calls without ever
    reaching the patched forward, so the model would silently train the
    trainer's objective. The backbone still runs; when it runs outside the
    patched forward while such a head is the model's outermost forward, this
    raises with the fix. An object, not a closure, so that deepcopy rebinds it.
    """

    def __init__(self, causal_lm: nn.Module):
        self.causal_lm = causal_lm

    def __call__(self, module, args):
        state = self.causal_lm.__dict__.get(STATE_ATTR)
        if state is None or state.active:
            return None
        for protocol in protocols.registered():
            if protocol.wraps_forward(self.causal_lm):
                raise PatchError(protocol.refusal())
        return None

    @classmethod
    def install(cls, causal_lm: nn.Module) -> None:
        cls.remove(causal_lm)
        causal_lm.base_model.register_forward_pre_hook(cls(causal_lm))

    @classmethod
    def remove(cls, causal_lm: nn.Module) -> None:
        hooks = causal_lm.base_model._forward_pre_hooks
        for hook_id in [k for k, hook in hooks.items() if isinstance(hook, cls)]:
            del hooks[hook_id]
