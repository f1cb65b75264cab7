"""The reference model of a patched model trained with ASFT (or the teacher of Distill): its final hidden states
and head, per call.

:func:`dft_ops.patch` takes ``reference=`` with objective ``ASFT`` or ``Distill``. Two kinds:

- :class:`FrozenReference`: another causal LM with the same vocabulary (any
  family, any hidden size). Its soft-cap and logit scale are measured by the
  same probe as the model's. It is not a submodule of the model (its
  parameters never reach the optimizer, the state dict or ``model.to``).
- :class:`AdaptersDisabled` (``reference="adapters_disabled"``): for a PEFT
  model, the same model with its adapters (LoRA, ...) switched off for the
  reference pass: no second copy of the weights. The output head carries no
  adapter (the patch refuses one there), so the reference head is the
  model's own head, read inside the head's forward like the model's.

Per fused training call, before the model's own forward, the reference's
forward runs on the same inputs under ``torch.no_grad()``, with every module
in eval mode (no dropout: the reference is a fixed distribution) and its
output head replaced by a function that keeps the head's input and returns an
empty ``(..., 0)`` tensor: the reference's final hidden states are captured
exactly as its own forward feeds them to its head (after ``logits_to_keep``),
and no reference logits are ever built. The loss then streams the reference
head next to the model's, as its second head (``linear_cross_entropy(...,
second_head=...)``).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distributed import is_dtensor
from .head import PatchError, check_head, forward_slot, head_shape, output_head, replaced_attribute
from .probe import HeadTransform, transform_inputs
from .state import causal_lm_of, probe_unpatched

ADAPTERS_DISABLED = "adapters_disabled"

# keywords of a training forward that concern the loss, the cache or extra outputs, never the reference's hidden states
_LOSS_KEYWORDS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index", "return_dict", "use_cache",
                  "past_key_values", "output_attentions", "output_hidden_states", "output_router_logits")


@dataclass
class ReferencePass:
    """What the reference model's pass of one fused call gives the loss (its second head).

    Attributes:
        hidden: (..., D_ref) final hidden states of the reference, the leading
            shape of the model's head input, the logit scale folded in, no grad.
        weight: (V, D_ref) reference head weight (detached), or None: the
            model's own head (adapters disabled), read inside its forward.
        bias: (V,) reference head bias with the logit scale folded in, or None.
        softcap: the reference's final-logit soft-cap, or None.
    """

    hidden: Tensor
    weight: Tensor | None
    bias: Tensor | None
    softcap: float | None


class Reference:
    """How the patched forward obtains the reference's hidden states (and head) for one call."""

    def head_for_call(self, causal_lm: nn.Module, transform: HeadTransform, inputs: dict) -> ReferencePass:
        """The reference for one fused call of ``causal_lm`` on ``inputs`` (the call's keywords, by name).

        ``transform``: the model's head transform (the reference's, for a
        reference sharing the model's head).
        """
        raise NotImplementedError


class FrozenReference(Reference):
    """A separate, frozen causal LM with the model's vocabulary.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (or a PEFT / engine wrapper of
            one). Not modified; it stays where it is (device, dtype, training
            flag), and inputs are moved to its device for the reference pass.
        vocab_size: the patched model's vocabulary (the head's V), checked.

    Raises:
        PatchError: a head that is not a plain ``nn.Linear``, another
            vocabulary, a transform the probe cannot reproduce.
    """

    def __init__(self, model: nn.Module, vocab_size: int):
        self.model = causal_lm_of(model)
        head = output_head(self.model)
        check_head(head)
        _check_unsharded(head.weight)
        V, _ = head_shape(head)
        if V != vocab_size:
            raise PatchError(f"reference: its output head has {V} rows, the model's {vocab_size}; ASFT and Distill "
                             "compare the two distributions token by token, so both must share the vocabulary")
        self.transform, self.transform_inputs = _probe(self.model), transform_inputs(self.model)
        params = inspect.signature(self.model.forward).parameters
        self._var_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._names = frozenset(params)

    def __deepcopy__(self, memo):  # a deep-copied patched model shares the frozen reference, as it shares no weights
        return self

    def head_for_call(self, causal_lm, transform, inputs):
        ref = self.model
        measured = transform_inputs(ref)
        if measured != self.transform_inputs:  # a head hook or a config number of the reference changed
            self.transform, self.transform_inputs = _probe(ref), measured
        _check_same_attention(causal_lm, ref, inputs)
        if inputs.get("input_ids") is None:
            raise ValueError("input_ids: a separate reference model needs the token ids (inputs_embeds come from the "
                             "trained model's embeddings, which the reference does not share)")
        kwargs = {k: v for k, v in inputs.items() if k in self._names or self._var_keyword}
        kwargs.pop("inputs_embeds", None)
        device = ref.get_input_embeddings().weight.device
        kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        head = output_head(ref)
        captured = capture_head_input(ref, head, kwargs)
        weight, bias = head.weight, head.bias
        _check_unsharded(weight)  # an engine may have wrapped the reference after patching
        hidden, bias = self.transform.fold(captured, None if bias is None else bias.detach())
        return ReferencePass(hidden=hidden, weight=weight.detach(), bias=bias, softcap=self.transform.softcap)


def _attention(causal_lm: nn.Module) -> str | None:
    return getattr(getattr(causal_lm, "config", None), "_attn_implementation", None)


def _check_same_attention(causal_lm: nn.Module, reference: nn.Module, inputs: dict) -> None:
    """Packed rows (position_ids without an attention mask) must mean the same to both models.

    Attention implementations differ there: flash_attention_2 starts a new
    document where position_ids restart, sdpa and eager attend across the whole
    row. A reference that reads a packed row otherwise than the model would
    anchor the KL to hidden states of other documents, silently.
    """
    if inputs.get("position_ids") is None or inputs.get("attention_mask") is not None:
        return
    ours, theirs = _attention(causal_lm), _attention(reference)
    if ours != theirs:
        raise ValueError(f"reference: packed rows (position_ids without an attention mask) are read by the model with "
                         f"attn_implementation={ours!r} and by the reference with {theirs!r}, which treat document "
                         "boundaries differently; load the reference with the model's attn_implementation")


def _probe(reference: nn.Module) -> HeadTransform:
    return probe_unpatched(reference)  # a reference that is itself patched is probed as the model it wraps


def _check_unsharded(weight: Tensor) -> None:
    if is_dtensor(weight) or getattr(weight, "ds_shape", None) is not None:
        raise PatchError("reference: its output head is sharded by an engine (FSDP / DeepSpeed ZeRO-3); the reference "
                         "is frozen (no gradients, no optimizer state): keep it unsharded, replicated on each rank")


class AdaptersDisabled(Reference):
    """The model itself with its PEFT adapters switched off: the base model, no second copy."""

    def __init__(self, causal_lm: nn.Module):
        if not adapter_layers(causal_lm):
            raise PatchError(f"reference: 'adapters_disabled' needs PEFT adapter layers (LoRA, ...) in the model; "
                             f"{type(causal_lm).__name__} has none (prompt-learning methods are not supported: pass "
                             "a frozen reference model instead)")
        # walked once: per training call only the flags are read (re-patching builds a new reference)
        self._layers = adapter_layers(causal_lm)
        self._base_parameters = base_parameters(causal_lm, self._layers)
        _check_base_frozen(self._base_parameters)

    def head_for_call(self, causal_lm, transform, inputs):
        _check_base_frozen(self._base_parameters)  # parameters may have been unfrozen since patch time
        head = output_head(causal_lm)
        with adapters_disabled(self._layers):
            # through __call__: the patched forward sees eval mode and runs the model's own forward
            captured = capture_head_input(causal_lm, head, inputs)
        hidden, _ = transform.fold(captured, None)
        return ReferencePass(hidden=hidden, weight=None, bias=None, softcap=transform.softcap)


def make_reference(reference, causal_lm: nn.Module) -> Reference | None:
    """The :class:`Reference` for ``patch(..., reference=...)``; None stays None."""
    if reference is None or isinstance(reference, Reference):
        return reference
    if isinstance(reference, str):
        if reference != ADAPTERS_DISABLED:
            raise ValueError(f"reference: expected a causal LM or {ADAPTERS_DISABLED!r}, got {reference!r}")
        return AdaptersDisabled(causal_lm)
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference: expected a causal LM (torch.nn.Module) or {ADAPTERS_DISABLED!r}, got "
                        f"{type(reference).__name__}")
    if causal_lm_of(reference) is causal_lm:
        raise ValueError("reference: is the trained model itself, which would make the KL term 0; pass a frozen copy "
                         f"or, for a PEFT model, reference={ADAPTERS_DISABLED!r}")
    return FrozenReference(reference, head_shape(output_head(causal_lm))[0])


def reference_inputs(inputs: dict) -> dict:
    """The call's keywords the reference's forward takes: the loss, cache and output switches left out."""
    kwargs = {k: v for k, v in inputs.items() if k not in _LOSS_KEYWORDS}
    kwargs["use_cache"] = False
    return kwargs


def capture_head_input(causal_lm: nn.Module, head: nn.Module, kwargs: dict) -> Tensor:
    """Run ``causal_lm(**kwargs)`` without gradients in eval mode; return what its forward fed its output head.

    The head's own computation is replaced by an empty ``(..., 0)`` result
    (its ``__call__`` and hooks stay): no logits are built.
    """
    seen = []

    def keep_input(x: Tensor) -> Tensor:
        seen.append(x)
        return x.new_zeros(*x.shape[:-1], 0)

    with torch.no_grad(), eval_mode(causal_lm), replaced_attribute(head, forward_slot(head), keep_input):
        causal_lm(**kwargs, return_dict=True)
    if len(seen) != 1:
        raise RuntimeError(f"reference: {type(causal_lm).__name__}.forward called its output head {len(seen)} times; "
                           "expected once")
    return seen[0]


@contextmanager
def attributes_set(objects, name: str, value):
    """``obj.<name> = value`` on each object for the block, each one's own value restored after."""
    saved = [(obj, getattr(obj, name)) for obj in objects]
    try:
        for obj, _ in saved:
            setattr(obj, name, value)
        yield
    finally:
        for obj, previous in saved:
            setattr(obj, name, previous)


def eval_mode(module: nn.Module):
    """Every submodule in eval mode for the block, each training flag restored after."""
    return attributes_set(list(module.modules()), "training", False)


def adapter_layers(module: nn.Module) -> list[nn.Module]:
    """PEFT's adapter-holding modules (tuner layers, modules_to_save wrappers): they read ``_disable_adapters``."""
    return [m for m in module.modules()
            if type(m).__module__.startswith("peft") and isinstance(getattr(m, "_disable_adapters", None), bool)]


def base_parameters(causal_lm: nn.Module, layers: list[nn.Module]) -> list[tuple[str, Tensor]]:
    """(name, parameter) of ``causal_lm`` outside the adapters of ``layers``: what "adapters disabled" runs on.

    An adapter layer's own parameters are adapters, except those of the module
    it wraps (``base_layer``, or ``original_module`` for modules_to_save).
    """
    adapter = set()
    for layer in layers:
        base = getattr(layer, "base_layer", None)
        base = getattr(layer, "original_module", None) if base is None else base
        frozen_part = set() if base is None else {id(p) for p in base.parameters()}
        adapter |= {id(p) for p in layer.parameters()} - frozen_part
    return [(name, p) for name, p in causal_lm.named_parameters() if id(p) not in adapter]


def _check_base_frozen(parameters: list[tuple[str, Tensor]]) -> None:
    """With the adapters off the model must be the base model: no parameter outside the adapters may train.

    A trainable head, or LoRA's ``bias="all"``, would move the "reference" with
    every optimizer step.
    """
    trained = [name for name, p in parameters if p.requires_grad]
    if trained:
        raise PatchError(f"reference: 'adapters_disabled' takes the model without its adapters as the reference, but "
                         f"{len(trained)} parameter(s) outside the adapters train with it (e.g. {trained[0]!r}), so the "
                         "reference would drift; freeze them, or pass a frozen copy of the base model as the reference")


def adapters_disabled(layers: list[nn.Module]):
    """Every PEFT adapter layer of ``layers`` (:func:`adapter_layers`) off for the block, each one's flag restored after.

    The flag PEFT's ``disable_adapter()`` sets, set directly: PEFT's toggles
    also change the adapters' ``requires_grad`` and re-enable every layer
    afterwards, which must not happen in the middle of a training step.
    """
    return attributes_set(layers, "_disable_adapters", True)
