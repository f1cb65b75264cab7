"""``dft_ops.patch``: compute the training loss of any Hugging Face causal LM with dft-ops.

One generic patch, no per-family code. The patched forward runs the model's
*own* forward, with two things swapped for the duration of the call:

- the output head (``model.get_output_embeddings()``) records its input, the
  final hidden states already sliced by ``logits_to_keep``, and returns an
  empty ``(..., 0)`` tensor instead of logits, so whatever the forward does to
  the logits afterwards (soft-capping, scaling) costs nothing;
- ``model.loss_function`` computes :func:`dft_ops.linear_cross_entropy` from
  the recorded hidden states and the head's weight and bias, with the labels
  (causal shift) or ``shift_labels`` (as given), ``num_items_in_batch`` and
  ``ignore_index`` the forward passes it.

So the backbone call, its arguments, MoE auxiliary losses (added by the forward
to whatever the loss function returns) and every other output field are the
model's own. Without labels, or in eval mode, the original forward runs
untouched and returns logits; ``generate()`` sees the original signature.

What the forward does to the head's output is *measured*, not looked up by
family: at patch time a probe runs the forward with the backbone and the head
replaced by stubs (the backbone returns known hidden states, the head returns
known float64 "logits" ``u``) and fits the returned logits ``L`` to
``L = c * tanh(s * u / c)`` (soft-cap ``c`` taken from the config's
``*softcap*`` attributes, or none) with a scalar ``s``. A logit scale ``s`` is
applied to the hidden states and bias (``W (s h) + s b = s (W h + b)``), so
autograd carries it into the gradients. Anything else (a vocabulary slice or
mask, an additive offset, a head fed something other than the backbone's
output, a loss not computed through ``self.loss_function``) is refused with the
reason, as are heads that are not a plain ``nn.Linear`` (LoRA / PEFT wrappers,
quantized layers), because reading their ``.weight`` would silently drop part
of the computation.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import objectives as _objectives
from .callbacks import recorder_of
from .functional import _check_options, linear_cross_entropy

__all__ = ["patch", "unpatch", "is_patched", "PatchError"]

_STATE_ATTR = "_dft_ops_patch"
_MISSING = object()
# loss options of linear_cross_entropy a user may set; the others come from the model or the call
_USER_OPTIONS = ("ignore_index", "reduction", "return_stats", "backend", "filter_eps")
_MODEL_OPTIONS = ("softcap", "bias", "shift", "num_items_in_batch", "position_ids", "weight", "hidden", "labels")


class PatchError(ValueError):
    """The model cannot be patched correctly; the message says why."""


@dataclass(frozen=True)
class HeadTransform:
    """What the model's forward does to the head's output: ``logits = c * tanh(scale * z / c)``.

    Attributes:
        scale: multiplier of the head output (Cohere ``logit_scale``, 1 / Granite ``logits_scaling``, ...).
        softcap: final-logit soft-cap ``c`` (Gemma 2/3), or None.
    """

    scale: float = 1.0
    softcap: float | None = None


@dataclass
class _PatchState:
    options: dict
    transform: HeadTransform
    previous_forward: Any  # the instance attribute `forward` we replaced, or None (the class's forward)
    serve_trl_fused_head: bool = False
    forward: Any = None  # the function installed as model.forward
    calls: int = field(default=0)  # fused loss computations, for tests and sanity checks


# ----------------------------------------------------------------------------------------------- public API


def patch(model: nn.Module, objective="dft", **loss_options) -> nn.Module:
    """Make ``model``'s training loss dft-ops' fused linear + objective loss, in place.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (transformers 5.x), or a PEFT
            model wrapping one (adapters anywhere but on the output head).
        objective: "dft", "ce" or an instance from :mod:`dft_ops.objectives`.
        **loss_options: ``ignore_index``, ``reduction`` ("mean" | "sum"),
            ``return_stats`` (attach :class:`dft_ops.TokenStats` to the output
            as ``output.token_stats``), ``backend``, ``filter_eps`` - as in
            :func:`dft_ops.linear_cross_entropy`. The soft-cap, logit scale,
            bias, shift, ``num_items_in_batch`` and ``position_ids`` come from
            the model and the call.

    Returns:
        ``model`` itself. Patching again replaces the options (it never stacks).

    Raises:
        PatchError (a ValueError) naming the reason when the loss cannot be
        computed exactly: adapters or a non-``nn.Linear`` output head, a
        vocabulary slice / mask or unknown transform of the logits, a forward
        that does not compute its loss through ``self.loss_function``.
        TypeError / ValueError naming a bad option.
    """
    options = _validate_options(objective, loss_options)
    causal_lm = _causal_lm(model)
    existing = causal_lm.__dict__.get(_STATE_ATTR)
    if existing is not None and causal_lm.__dict__.get("forward") is existing.forward:
        existing.options = options
        return model
    _check_head(_output_head(causal_lm))
    # an older patch that something else wrapped (e.g. TRL) must be inert while probing and after
    causal_lm.__dict__.pop(_STATE_ATTR, None)
    try:
        transform = probe_head_transform(causal_lm)
    except BaseException:
        if existing is not None:
            causal_lm.__dict__[_STATE_ATTR] = existing
        raise
    _install(causal_lm, _PatchState(options=options, transform=transform,
                                    previous_forward=causal_lm.__dict__.get("forward")))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the forward that :func:`patch` replaced. A model that is not patched is returned as is."""
    causal_lm = _causal_lm(model)
    state = causal_lm.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    if causal_lm.__dict__.get("forward") is state.forward:
        if state.previous_forward is None:
            del causal_lm.forward
        else:
            causal_lm.forward = state.previous_forward
    # else someone wrapped our forward after patching (e.g. TRL): it stays in their chain but is inert now
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model`` (or the causal LM a PEFT model wraps)."""
    return _STATE_ATTR in _causal_lm(model).__dict__


def patch_state(model: nn.Module) -> _PatchState | None:
    """The live patch state (options, measured head transform, call count), or None."""
    return _causal_lm(model).__dict__.get(_STATE_ATTR)


# ------------------------------------------------------------------------------------------ locating things


def _causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module whose forward we patch (unwrapping a PEFT model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and type(model).__module__.startswith("peft"):
        model = get_base_model()
    for attr in ("get_output_embeddings", "base_model", "config"):
        if not hasattr(model, attr):
            raise TypeError(
                f"model: {type(model).__name__} has no `{attr}`; expected a Hugging Face *ForCausalLM "
                "(transformers PreTrainedModel) or a PEFT model wrapping one"
            )
    return model


def _output_head(causal_lm: nn.Module) -> nn.Module:
    head = causal_lm.get_output_embeddings()
    if head is None:
        raise PatchError(f"model: {type(causal_lm).__name__}.get_output_embeddings() is None; there is no output head "
                         "to fuse into the loss")
    return head


def _check_head(head: nn.Module) -> None:
    """Refuse heads whose ``.weight`` / ``.bias`` are not the whole computation."""
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
    if hasattr(head.weight, "ds_id") or hasattr(head.weight, "ds_status"):
        raise PatchError(
            "model: the output head is partitioned by DeepSpeed ZeRO-3, which gathers it only inside the head's own "
            "forward and backward hooks; dft-ops does not support ZeRO-3 heads (use ZeRO-1/2 or FSDP2)"
        )


def _head_parameters(head: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The head's (V, D) weight and (V,) bias as regular tensors, gathered if sharded (differentiably)."""
    weight, bias = head.weight, head.bias
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch
        DTensor = ()
    if isinstance(weight, DTensor):
        # FSDP2 shards: gather (its backward reduce-scatters the gradient into the shard)
        weight = weight.full_tensor()
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias


# ----------------------------------------------------------------------------------------------- options


def _validate_options(objective, loss_options: dict) -> dict:
    for name in loss_options:
        if name in _MODEL_OPTIONS:
            raise ValueError(
                f"{name}: is not a patch option; dft-ops reads it from the model or the forward call "
                "(soft-cap and logit scale from the model, labels / shift_labels / num_items_in_batch / position_ids "
                "from the call)"
            )
        if name not in _USER_OPTIONS:
            raise TypeError(f"{name}: unknown loss option for dft_ops.patch; expected one of {_USER_OPTIONS}")
    options = {"ignore_index": -100, "reduction": "mean", "return_stats": False, "backend": "auto",
               "filter_eps": None, **loss_options}
    _check_options(softcap=None, num_items_in_batch=None, **options)
    if options["reduction"] not in ("mean", "sum"):
        raise ValueError(f"reduction: a patched model returns a scalar loss; use 'mean' or 'sum', got "
                         f"{options['reduction']!r}")
    options["objective"] = _objectives.resolve(objective)
    return options


# ----------------------------------------------------------------------------------------- the forward


def _install(causal_lm: nn.Module, state: _PatchState) -> None:
    state.forward = _PatchedForward(causal_lm, state)
    causal_lm.__dict__[_STATE_ATTR] = state
    causal_lm.forward = state.forward


class _PatchedForward:
    """The patched ``forward``: an object (not a closure) so that ``copy.deepcopy(model)`` rebinds it to the copy.

    It wraps the forward found at patch time (the class's bound forward, or an
    instance attribute set by accelerate hooks, TRL or an older patch) and
    keeps its name, docstring and signature: ``generate()`` and ``Trainer``
    inspect them.
    """

    def __init__(self, causal_lm: nn.Module, state: _PatchState):
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
        if model.__dict__.get(_STATE_ATTR) is not state:  # unpatched, or a newer patch wraps us: stay inert
            return previous(*args, **kwargs)
        if kwargs.get("fused_lm_head") and not state.serve_trl_fused_head:
            warnings.warn("dft_ops.patch: a TRL fused_lm_head=True call runs TRL's own loss head, not dft-ops'; for "
                          "SFTTrainer use dft_ops.patch_sft_trainer(trainer)", stacklevel=2)
            return previous(*args, **kwargs)
        trl_fused = bool(kwargs.pop("fused_lm_head", False))
        # per-token inputs of the objective (e.g. PSFT's old_logprobs) come as forward keywords,
        # a dataset column the Trainer passes along; the model's own forward never sees them
        token_tensors = {n: kwargs.pop(n) for n in state.options["objective"].token_inputs if n in kwargs}
        signature = self.__signature__
        bound = signature.bind_partial(*args, **kwargs).arguments
        call_kwargs = bound.get(_var_keyword(signature)) or {}
        labels = bound.get("labels")
        shift_labels = call_kwargs.get("shift_labels", bound.get("shift_labels"))
        if not trl_fused and not (model.training and (labels is not None or shift_labels is not None)):
            return previous(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("labels: a fused head call needs labels or shift_labels")
        position_ids = bound.get("position_ids", call_kwargs.get("position_ids"))
        return _fused_forward(model, state, previous, args, kwargs, labels, shift_labels, position_ids, trl_fused,
                              token_tensors)


def _var_keyword(signature: inspect.Signature) -> str | None:
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return p.name
    return None


class _FusedCall:
    """One fused forward: the head records its input, the loss function computes dft-ops' loss from it."""

    def __init__(self, causal_lm, state: _PatchState, position_ids, per_token: bool, token_tensors: dict):
        self.causal_lm, self.state, self.position_ids, self.per_token = causal_lm, state, position_ids, per_token
        objective = state.options["objective"]
        self.objective = objective.with_token_tensors(**token_tensors) if token_tensors else objective
        self.hidden = None
        self.head_calls = self.loss_calls = 0
        self.stats = self.token_loss = self.targets = None

    def head_forward(self, hidden: Tensor) -> Tensor:
        self.head_calls += 1
        self.hidden = hidden
        return hidden.new_empty(*hidden.shape[:-1], 0)

    def loss_function(self, logits=None, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=None,
                      shift_labels=None, **_):
        self.loss_calls += 1
        if self.hidden is None:
            raise RuntimeError("dft_ops.patch: the loss function ran before the output head")
        opts = self.state.options
        head = self.causal_lm.get_output_embeddings()
        _check_head(head)
        weight, bias = _head_parameters(head)
        hidden = self.hidden.to(weight.device)
        scale = self.state.transform.scale
        if scale != 1.0:  # logits = scale * (W h + b) = W (scale h) + scale b
            hidden = hidden * scale
            bias = None if bias is None else bias * scale
        hidden, weight, bias = _common_dtype(hidden, weight, bias)
        shift = shift_labels is None
        targets = (labels if shift else shift_labels).to(hidden.device)
        self.targets = targets[..., 1:] if shift else targets
        position_ids = self.position_ids
        if position_ids is not None and tuple(position_ids.shape) != tuple(targets.shape):
            position_ids = None  # e.g. (1, T) broadcast or 3-D rope positions: rows are the sequences
        ignore = opts["ignore_index"] if ignore_index is None else ignore_index
        self.ignore_index = ignore
        if position_ids is not None:
            position_ids = position_ids.to(hidden.device)
        # a TokenStatsCallback attached to the model asks for the per-token stats of training steps
        recorder = recorder_of(self.causal_lm)
        if recorder is not None and not recorder.enabled:
            recorder = None
        with torch.autocast(hidden.device.type, enabled=False):
            out = linear_cross_entropy(
                hidden, weight, targets, bias=bias, objective=self.objective, ignore_index=ignore,
                reduction="none" if self.per_token else opts["reduction"],
                num_items_in_batch=None if self.per_token else num_items_in_batch,
                softcap=self.state.transform.softcap, shift=shift,
                return_stats=self.per_token or opts["return_stats"] or recorder is not None,
                backend=opts["backend"], filter_eps=opts["filter_eps"], position_ids=position_ids,
            )
        loss, self.stats = out if isinstance(out, tuple) else (out, None)
        if recorder is not None:
            recorder.record(self.stats, self.targets != ignore)
        self.state.calls += 1
        if not self.per_token:
            return loss
        # TRL's fused-head protocol: per-token values plus the usual mean (over num_items_in_batch) as `loss`
        self.token_loss = loss
        denominator = num_items_in_batch
        if denominator is None:
            denominator = (self.targets != ignore).sum().clamp(min=1)
        return loss.sum() / torch.as_tensor(denominator, device=loss.device).to(torch.float32)


def _common_dtype(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    """Cast like nn.Linear would: the autocast dtype when autocast is on, else the weight's dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    return cast(hidden), cast(weight), cast(bias)


@contextmanager
def _replaced_attribute(obj, name: str, value):
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
def _fused_head(causal_lm: nn.Module, call: _FusedCall):
    head = _output_head(causal_lm)
    _check_head(head)
    # `loss_function` is a property reading `_loss_function` when set
    with _replaced_attribute(head, "forward", call.head_forward), \
            _replaced_attribute(causal_lm, "_loss_function", call.loss_function):
        yield


def _fused_forward(causal_lm, state, previous, args, kwargs, labels, shift_labels, position_ids, trl_fused,
                   token_tensors):
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(causal_lm.config, "return_dict", True)
    if labels is None:
        # the forward computes a loss only when `labels` is given; the loss function reads shift_labels first
        kwargs["labels"] = shift_labels
    call = _FusedCall(causal_lm, state, position_ids, per_token=trl_fused, token_tensors=token_tensors)
    with _fused_head(causal_lm, call):
        out = previous(*args, return_dict=True, **kwargs)
    if call.head_calls != 1 or call.loss_calls != 1:
        raise RuntimeError(f"dft_ops.patch: the forward called the output head {call.head_calls} time(s) and the loss "
                           f"function {call.loss_calls} time(s); expected once each")
    if trl_fused:
        return _trl_output(out, call)
    fields = {k: v for k, v in out.items() if k != "logits"}
    result = type(out)(**fields)  # logits=None
    if state.options["return_stats"]:
        result.token_stats = call.stats
    return result if return_dict else result.to_tuple()


def _trl_output(out, call: _FusedCall):
    """TRL's ``FusedCausalLMOutput`` from a fused call, for ``SFTTrainer.compute_loss``.

    ``log_probs`` holds ``-(per-token loss of the objective)``, with its
    gradient: SFTTrainer's "nll" reduction ``-sum(log_probs) / num_tokens`` is
    then exactly dft-ops' loss. For objective "ce" these are the log-probs.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    label_mask = call.targets != call.ignore_index
    return FusedCausalLMOutput(
        loss=out.get("loss"), log_probs=-call.token_loss, entropy=call.stats.entropy, is_top1=call.stats.is_top1,
        label_mask=label_mask, aux_loss=out.get("aux_loss"),
    )


# ------------------------------------------------------------------------------------- the head-transform probe


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


def _softcap_candidates(config) -> list[float]:
    """Positive numbers in config attributes named like a soft-cap, most likely first."""
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config) and get_text_config() is not config:
        configs.insert(0, get_text_config())
    found = []
    for cfg in configs:
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

    Runs the forward once with stubs (no backbone or head compute, nothing of
    the model's parameters is read): the backbone returns random hidden
    states, the head returns random float64 ``u``. Checks the head is called
    once on exactly those hidden states, the loss is computed once through
    ``self.loss_function`` on the returned logits, and fits the returned logits
    to a logit scale and a soft-cap.

    Raises:
        PatchError naming what does not fit.
    """
    name = type(causal_lm).__name__
    head, backbone = _output_head(causal_lm), causal_lm.base_model
    if backbone is causal_lm:
        raise PatchError(f"model: {name}.base_model is the model itself; expected a backbone module under the head")
    V, D = head.weight.shape
    device = head.weight.device if head.weight.device.type != "meta" else torch.device("cpu")
    wide = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(1234)
    hidden = torch.randn(1, n_probe_tokens, D, generator=gen).to(device)
    u = (2 * torch.randn(1, n_probe_tokens, V, generator=gen, dtype=torch.float64)).to(device, wide)
    labels = torch.zeros(1, n_probe_tokens, dtype=torch.long, device=device)
    seen = {"head_inputs": [], "loss_logits": []}

    def stub_backbone(*_, **__):
        return _StubBackboneOutput(hidden)

    def stub_head(x):
        seen["head_inputs"].append(x)
        return u

    def stub_loss(logits=None, labels=None, *_, **__):
        seen["loss_logits"].append(logits)
        return torch.zeros((), dtype=wide, device=device)

    params = inspect.signature(causal_lm.forward).parameters
    extra = {"output_router_logits": False} if "output_router_logits" in params else {}
    was_training = causal_lm.training
    causal_lm.training = True  # the fused path runs in training mode (not recursive: only this module's own code)
    try:
        with torch.no_grad(), _replaced_attribute(backbone, "forward", stub_backbone), \
                _replaced_attribute(head, "forward", stub_head), \
                _replaced_attribute(causal_lm, "_loss_function", stub_loss):
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
