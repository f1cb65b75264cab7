"""The output head of a patched model: finding it, checking it, and standing things in for it.

Shared by the patch installer, the per-call fused forward and the probe.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

_MISSING = object()


class PatchError(ValueError):
    """The model cannot be patched correctly; the message says why."""


def output_head(causal_lm: nn.Module) -> nn.Module:
    head = causal_lm.get_output_embeddings()
    if head is None:
        raise PatchError(f"model: {type(causal_lm).__name__}.get_output_embeddings() is None; there is no output head "
                         "to fuse into the loss")
    return head


def check_head(head: nn.Module) -> None:
    """Refuse heads whose ``.weight`` / ``.bias`` are not the whole computation.

    Engines that wrap the head without changing its computation pass: FSDP2's
    ``fully_shard`` subclasses it keeping ``nn.Linear.forward``, DeepSpeed
    ZeRO-3 and accelerate only add hooks.
    """
    cls = type(head)
    if cls.__module__.startswith("peft") or hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        raise PatchError(
            f"model: the output head is wrapped by PEFT ({cls.__name__}): dft-ops reads the head's weight directly, "
            "so an adapter (LoRA, ...) on it would be silently dropped from the loss and never trained. Remove "
            "'lm_head' from target_modules / modules_to_save; adapters on other layers are fine."
        )
    if not isinstance(head, nn.Linear) or cls.forward is not nn.Linear.forward:
        raise PatchError(
            f"model: unknown head transform: the output head is {cls.__module__}.{cls.__name__}, not a plain "
            "torch.nn.Linear, so its output is not weight @ hidden + bias (quantized or custom heads are not supported)"
        )


def head_shape(head: nn.Linear) -> tuple[int, int]:
    """(V, D) of the head, also while an engine holds only a shard of it.

    FSDP2's DTensor reports the global shape; a ZeRO-3 parameter outside the
    head's forward is an empty placeholder that keeps the real one in ``ds_shape``.
    """
    shape = getattr(head.weight, "ds_shape", None) or head.weight.shape
    return int(shape[0]), int(shape[1])


def sharded_by_engine(head: nn.Module, causal_lm: nn.Module) -> bool:
    """Whether an engine shards the head's parameters between its forwards: FSDP2 (``fully_shard`` on the head
    or on the model) or DeepSpeed ZeRO-3 (its parameters carry ``ds_id``).

    The one-pass head keeps an unsharded fp32 d(weight) (4 V D bytes) from forward to backward on every
    rank, more than such an engine holds of the head; "auto" runs two passes there.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()
    return isinstance(head, FSDPModule) or isinstance(causal_lm, FSDPModule) or hasattr(head.weight, "ds_id")


def forward_slot(module: nn.Module) -> str:
    """The attribute that ``module.__call__`` ends up calling for the module's own computation.

    Usually ``forward``; accelerate's ``add_hook_to_module`` (``device_map``,
    CPU offload) moves the real forward to ``_old_forward`` and wraps it, and
    its hook must keep running (it brings offloaded weights onto the device).
    """
    if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


@contextmanager
def replaced_attribute(obj, name: str, value):
    """Set an instance attribute for the duration of the block, restoring what was there (or nothing)."""
    previous = obj.__dict__.get(name, _MISSING)
    obj.__dict__[name] = value
    try:
        yield
    finally:
        if previous is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = previous


@contextmanager
def replaced_submodules(root: nn.Module, replacements: dict):
    """Swap submodules of ``root`` (``{original: stand-in}``) in their parents for the duration of the block.

    The stand-ins are reached through the same attribute names, but none of
    the hooks that engines (FSDP2, DeepSpeed, accelerate) registered on the
    originals run: a probe must not trigger an engine's lazy initialisation
    or gather a parameter.
    """
    slots = []
    for original, stand_in in replacements.items():
        found = [(parent, name) for parent in root.modules() for name, child in parent._modules.items()
                 if child is original]
        if not found:
            raise PatchError(f"model: {type(original).__name__} is not a submodule of {type(root).__name__}")
        slots += [(parent, name, original, stand_in) for parent, name in found]
    try:
        for parent, name, _, stand_in in slots:
            parent._modules[name] = stand_in
        yield
    finally:
        for parent, name, original, _ in slots:
            parent._modules[name] = original
