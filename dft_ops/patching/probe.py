"""The head probe: measure what a causal LM's forward does between its output head and its loss.

At patch time the model's forward runs once with the backbone and the head
replaced by stand-in modules (the backbone returns known hidden states, the
head returns known float64 "logits" ``u``), and the returned logits ``L`` are
fitted to ``L = c * tanh(s * u / c)``: a logit scale ``s`` (Cohere
``logit_scale``, Granite ``logits_scaling``, ...) and a soft-cap ``c`` read from
the config's ``*softcap*`` attributes (Gemma 2/3), or none. Anything else is
refused with the reason.

The stand-ins take the place of the real modules in their parents, so no hook
an engine registered on them runs (FSDP2 would otherwise lazily initialise on
the head, DeepSpeed ZeRO-3 would gather it) and no parameter is read.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .head import PatchError, head_shape, output_head, replaced_attribute, replaced_submodules


@dataclass(frozen=True)
class HeadTransform:
    """What the model's forward does to the head's output: ``logits = c * tanh(scale * z / c)``.

    Attributes:
        scale: multiplier of the head output (Cohere ``logit_scale``, 1 / Granite ``logits_scaling``, ...).
        softcap: final-logit soft-cap ``c`` (Gemma 2/3), or None.
    """

    scale: float = 1.0
    softcap: float | None = None

    def fold(self, hidden: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The head input and bias with the logit scale folded in: ``scale * (W h + b) = W (scale h) + scale b``."""
        if self.scale == 1.0:
            return hidden, bias
        return hidden * self.scale, None if bias is None else bias * self.scale


class _StubBackboneOutput:
    """What the probe's backbone returns: known hidden states; every other output field is None."""

    def __init__(self, hidden: Tensor):
        self.last_hidden_state = hidden

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key):
        if key in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise KeyError(key)


class _StandIn(nn.Module):
    """A hook-free module whose forward is the given function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


# hooks registered from these packages gather, shard, offload or move parameters: they are how an engine runs the
# head, not part of what the model computes, and must not run on a stand-in
_ENGINE_HOOK_MODULES = ("torch.distributed", "deepspeed", "accelerate")


def _is_engine_hook(hook) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # bound method
    return (getattr(fn, "__module__", None) or "").startswith(_ENGINE_HOOK_MODULES)


def _call_with_model_hooks(module: nn.Module, forward, args: tuple, kwargs: dict):
    """``forward(*args, **kwargs)`` wrapped in ``module``'s own forward hooks, leaving out the engines'.

    A hook that changes the head's input or output (the model's, or the
    user's) is part of the computation the probe must see.
    """
    for hook_id, hook in module._forward_pre_hooks.items():
        if _is_engine_hook(hook):
            continue
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    out = forward(*args, **kwargs)
    for hook_id, hook in module._forward_hooks.items():
        if _is_engine_hook(hook):
            continue
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, out)
        else:
            result = hook(module, args, out)
        if result is not None:
            out = result
    return out


def transform_inputs(causal_lm: nn.Module) -> tuple:
    """What a measured :class:`HeadTransform` depends on that can change after patching.

    The head's own forward hooks (the model's and the user's, not the
    engines') and the numbers in the config (soft-caps, logit scales): the
    patched forward compares this with its value at the last probe and probes
    again when it differs, so a hook added or removed later is never silently
    ignored. Cheap: dict keys and a config's scalar attributes.
    """
    head = output_head(causal_lm)
    hooks = tuple((kind, key) for kind in ("_forward_pre_hooks", "_forward_hooks")
                  for key, hook in getattr(head, kind).items() if not _is_engine_hook(hook))
    return hooks + tuple((name, value) for cfg in _configs(causal_lm.config) for name, value in sorted(vars(cfg).items())
                         if isinstance(value, numbers.Real))


def _configs(config) -> list:
    """The config, and its text config first when it has a separate one (multimodal models)."""
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config) and get_text_config() is not config:
        configs.insert(0, get_text_config())
    return configs


def _softcap_candidates(config) -> list[float]:
    """Positive numbers in config attributes named like a soft-cap, most likely first."""
    found = []
    for cfg in _configs(config):
        for name, value in sorted(vars(cfg).items(), key=lambda kv: ("final" not in kv[0], kv[0])):
            if ("softcap" in name or "soft_cap" in name) and isinstance(value, numbers.Real) \
                    and not isinstance(value, bool) and value > 0 and math.isfinite(value):
                found.append(float(value))
    return list(dict.fromkeys(found))


def _fit_transform(u: Tensor, logits: Tensor, softcaps: list[float]) -> HeadTransform | None:
    """The HeadTransform with logits == c * tanh(s * u / c) (float64 fit), or None."""
    for cap in [*softcaps, None]:
        if cap is None:
            y = logits
        else:
            ratio = logits / cap
            if ratio.abs().max() >= 1:
                continue
            y = cap * torch.atanh(ratio)
        scale = ((y * u).sum() / (u * u).sum()).item()
        if not math.isfinite(scale) or scale == 0:
            continue
        if (y - scale * u).norm() <= 1e-7 * y.norm():
            return HeadTransform(scale=1.0 if abs(scale - 1) < 1e-12 else scale, softcap=cap)
    return None


def probe_head_transform(causal_lm: nn.Module, n_probe_tokens: int = 7) -> HeadTransform:
    """Measure what ``causal_lm``'s forward does between its output head and its loss.

    Runs ``causal_lm.forward`` (not its ``__call__``: no hooks) once with
    stand-ins for the backbone and the head: the backbone returns random
    (1, n_probe_tokens, D) hidden states, the head returns random float64
    (1, n_probe_tokens, V) ``u``. Checks the head is called once on exactly
    those hidden states and the loss is computed once through
    ``self.loss_function`` on the returned logits, and fits the returned
    logits to a logit scale and a soft-cap.

    Raises:
        PatchError naming what does not fit.
    """
    name = type(causal_lm).__name__
    head, backbone = output_head(causal_lm), causal_lm.base_model
    if backbone is causal_lm:
        raise PatchError(f"model: {name}.base_model is the model itself; expected a backbone module under the head")
    V, D = head_shape(head)
    device = head.weight.device if head.weight.device.type != "meta" else torch.device("cpu")
    wide = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(1234)
    hidden = torch.randn(1, n_probe_tokens, D, generator=gen).to(device)
    u = (2 * torch.randn(1, n_probe_tokens, V, generator=gen, dtype=torch.float64)).to(device, wide)
    labels = torch.zeros(1, n_probe_tokens, dtype=torch.long, device=device)
    seen = {"head_inputs": [], "loss_logits": []}

    def stub_head(x):
        seen["head_inputs"].append(x)
        return u

    def stub_loss(logits=None, labels=None, *_, **__):
        seen["loss_logits"].append(logits)
        return torch.zeros((), dtype=wide, device=device)

    stand_ins = {backbone: _StandIn(lambda *_, **__: _StubBackboneOutput(hidden)),
                 head: _StandIn(lambda *args, **kwargs: _call_with_model_hooks(head, stub_head, args, kwargs))}
    params = inspect.signature(causal_lm.forward).parameters
    extra = {"output_router_logits": False} if "output_router_logits" in params else {}
    was_training = causal_lm.training
    causal_lm.training = True  # the fused path runs in training mode (not recursive: only this module's own code)
    try:
        with torch.no_grad(), replaced_submodules(causal_lm, stand_ins), \
                replaced_attribute(causal_lm, "_loss_function", stub_loss):
            out = causal_lm.forward(input_ids=labels.clone(), labels=labels, return_dict=True, **extra)
    except PatchError:
        raise
    except Exception as exc:
        raise PatchError(f"model: could not run {name}.forward with a stub backbone to read its head transform "
                         f"({type(exc).__name__}: {exc}); the model's forward is not the usual causal-LM "
                         "forward") from exc
    finally:
        causal_lm.training = was_training

    if len(seen["head_inputs"]) != 1:
        raise PatchError(f"model: {name}.forward called the output head {len(seen['head_inputs'])} times; "
                         "expected once")
    if len(seen["loss_logits"]) != 1:
        raise PatchError(f"model: {name}.forward does not compute its loss through self.loss_function (called "
                         f"{len(seen['loss_logits'])} times), so dft-ops cannot replace it")
    head_input = seen["head_inputs"][0]
    if tuple(head_input.shape) != tuple(hidden.shape) or not torch.equal(head_input.to(hidden.dtype), hidden):
        raise PatchError(f"model: unknown head transform: {name}.forward does not feed the backbone's final hidden "
                         "states to the output head unchanged")
    logits = out.get("logits") if hasattr(out, "get") else None
    loss_logits = seen["loss_logits"][0]
    if not isinstance(logits, Tensor) or not isinstance(loss_logits, Tensor) or not (
            loss_logits is logits or (loss_logits.shape == logits.shape and torch.equal(loss_logits, logits))):
        raise PatchError(f"model: {name}.forward computes its loss on something other than the logits it returns")
    if tuple(logits.shape) != tuple(u.shape):
        raise PatchError(f"model: {name}.forward slices or masks the vocabulary after the head (head output "
                         f"{tuple(u.shape)}, logits {tuple(logits.shape)}); dft-ops computes over the whole head")
    transform = _fit_transform(u.to(torch.float64), logits.to(torch.float64), _softcap_candidates(causal_lm.config))
    if transform is None:
        raise PatchError(
            f"model: unknown head transform: {name}.forward changes the head's output in a way that is not a logit "
            "scale and/or a final soft-cap read from the config (e.g. a vocabulary mask or an additive offset)"
        )
    return transform
