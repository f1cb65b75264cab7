"""The state of a patch and where it lives: the causal LM a patch targets, its :class:`PatchState`.

Shared by the installer (:mod:`.install`) and the reference model (:mod:`.reference`), which both
need to find a model's causal LM and to probe a model as its own unpatched forward computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..options import LossOptions
from . import protocols
from .probe import HeadTransform, probe_head_transform

STATE_ATTR = "_dft_ops_patch"


@dataclass
class PatchState:
    """The live patch of one causal LM (``patch_state(model)``).

    Attributes:
        options: the :class:`dft_ops.LossOptions` of the patch (``softcap`` and ``shift`` are set per call).
        transform: the head transform the probe measured.
        transform_inputs: what the transform depends on (head hooks, config numbers) when it was measured.
        previous_forward: the instance attribute ``forward`` the patch replaced, or None (the class's forward).
        protocol: the caller protocol (e.g. TRL's fused head) this patch answers, or None.
        reference: where ASFT's reference comes from (:mod:`.reference`), or None.
        forward: the function installed as ``model.forward``.
        calls: fused loss computations so far.
        active: patched forward calls in progress (the backbone running with none is a bypass).
        warned_unfused: a training call without labels (a loss computed from logits elsewhere) was warned about.
    """

    options: LossOptions
    transform: HeadTransform
    transform_inputs: tuple
    previous_forward: Any
    protocol: protocols.CallerProtocol | None = None
    reference: Any = None
    forward: Any = None
    calls: int = field(default=0)
    active: int = field(default=0)
    warned_unfused: bool = field(default=False)


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model`` (or the causal LM a wrapper holds)."""
    return STATE_ATTR in causal_lm_of(model).__dict__


def patch_state(model: nn.Module) -> PatchState | None:
    """The live patch state (options, measured head transform, call count), or None."""
    return causal_lm_of(model).__dict__.get(STATE_ATTR)


def _is_engine_wrapper(model: nn.Module) -> bool:
    """DDP / DataParallel, FSDP1 and DeepSpeed engines: ``.module`` is the model whose forward they call."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return True
    cls = type(model)
    return isinstance(getattr(model, "module", None), nn.Module) and (
        cls.__module__.startswith("deepspeed") or cls.__name__ == "FullyShardedDataParallel")


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module whose forward is patched (unwrapping engine wrappers and a PEFT model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    while _is_engine_wrapper(model):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and type(model).__module__.startswith("peft"):
        model = get_base_model()
    for attr in ("get_output_embeddings", "base_model", "config"):
        if not hasattr(model, attr):
            raise TypeError(
                f"model: {type(model).__name__} has no `{attr}`; expected a Hugging Face *ForCausalLM "
                "(transformers PreTrainedModel), a PEFT model wrapping one, or a DDP / DeepSpeed wrapper of either"
            )
    return model


def probe_unpatched(causal_lm: nn.Module) -> HeadTransform:
    """The head transform measured now; a patch of ``causal_lm`` is inert meanwhile (the probe runs its forward)."""
    state = causal_lm.__dict__.pop(STATE_ATTR, None)
    try:
        return probe_head_transform(causal_lm)
    finally:
        if state is not None:
            causal_lm.__dict__[STATE_ATTR] = state
