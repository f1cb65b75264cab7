"""``torch.compile`` support: the fused loss as registered custom operators (``torch.ops.dft_ops.*``).

Under ``torch.compile`` (and ``torch.export``) :func:`dft_ops.linear_cross_entropy` (so
:class:`dft_ops.LinearCrossEntropy` and a patched model's head) calls :func:`loss` instead of the
autograd Function: the compiler sees one operator with a fake (meta) implementation, whose output
shapes never depend on the labels' values, and a registered backward, so the whole loss is one node
of the graph and a training step compiles with ``fullgraph=True``::

    dft_ops::linear_cross_entropy(hidden (N, D), weight, bias?, labels (..., S), class_weight?,
                                  position_ids?, old_logprobs?, ref_logprobs?, second_hidden?,
                                  second_weight?, second_bias?, num_items?, num_items_value?, key)
        -> (value, logprob, entropy, is_top1, lse, predicted, z_loss, kl, divisor,
            8 G terms (N,), d_hidden, d_weight, d_bias)
    dft_ops::linear_cross_entropy_backward(grad_value, ..., terms, key, needs) -> (d_hidden, d_weight, d_bias)

and the same pair with a ``_sync_free`` suffix for ``LossOptions(sync_free=True)``; only that pair
may be captured in a CUDA graph (the other is tagged ``cudagraph_unsafe``: the compiler's CUDA
graphs leave it out instead of failing on its synchronisation).

What travels how:

- the settings are not tensors: at trace time :func:`_static` (run by the compiler, not traced:
  ``torch.compiler.assume_constant_result``) resolves the options exactly as the eager door does
  (same checks, same errors), decides the plan (one pass or two), and files them under a string
  ``key``, the one non-tensor argument of the operators: a constant of the graph.
- value checks (labels in range, class weights, ``num_items_in_batch``) run inside the
  operator's implementation, where the eager path runs them: with the one device read of the
  default path, or as device computations with ``sync_free`` (NaN instead of an error).
- per-position outputs are (N,) (0 at positions not computed); so are the G terms the two-pass
  backward needs, so no output's shape depends on how many labels are ignored. The backward
  operator builds the call again from the same inputs (the default path: a second device read).
- one pass (``backward_mode="auto"``'s usual choice): the forward also returns the fp32 gradients
  of a unit upstream gradient; the registered backward only scales them (plain ops the compiler
  fuses), as the Function does.

Inside the operators everything is the eager code (:func:`dft_ops.loss_call.build_call`,
:func:`dft_ops.autograd.forward_pass` / :func:`~dft_ops.autograd.backward_pass`), so both paths
compute the same numbers. Not through the operators (the Function runs, with the graph breaks its
Python costs): vocabulary parallelism and DTensor inputs, objectives that hold this batch's
tensors the deprecated way, and ``objectives.Distill``.

Outside compilation the Function runs (no dispatcher overhead); :func:`forced` runs the operators
eagerly (the tests compare the two).
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import NamedTuple

import torch
from torch import Tensor

from . import inputs as _inputs
from .autograd import FunctionOutputs, backward_pass, forward_pass, scaled_grads
from .backends import Plan, backward_mode, one_pass, select_backend, workspace_bytes
from .backends.protocol import MB, GradTerms, Needs, SecondHead
from .distributed import is_dtensor
from .layout import TokenLayout
from .loss_call import build_call
from .objectives import ASFT, Distill, Objective
from .options import LossOptions, _Unset, resolve_options

NAMESPACE = "dft_ops"
UNSUPPORTED = object()
"""What :func:`loss` returns for a call the operators do not serve (the caller runs the Function)."""

_FORCED = False


def wanted() -> bool:
    """The functional API goes through the operators: while compiling (or exporting), or when :func:`forced`."""
    return _FORCED or torch.compiler.is_compiling()


@contextlib.contextmanager
def forced(enabled: bool = True):
    """Run :func:`dft_ops.linear_cross_entropy` through the custom operators outside compilation too."""
    global _FORCED
    previous, _FORCED = _FORCED, enabled
    try:
        yield
    finally:
        _FORCED = previous


# ---------------------------------------------------------------------------------------------- static settings


class _Static(NamedTuple):
    """What the operators know of a call besides its tensors, filed under ``key`` (a graph constant).

    ``options``: the call's LossOptions without its class_weight tensor (an operator input);
    ``has_class_weight``: whether the call has one; ``plan`` / ``needs`` / ``compute``: as the eager
    door decides them; ``second_compute`` / ``second_softcap``: the second head's, or None.
    """

    key: str
    options: LossOptions
    has_class_weight: bool
    plan: Plan
    needs: Needs
    compute: torch.dtype
    second_compute: torch.dtype | None
    second_softcap: float | None


_STATICS: dict[str, _Static] = {}


class _Facts(NamedTuple):
    """The constants :func:`loss` reads while it is traced (plain values: nothing for the tracer to inline)."""

    key: str
    sync_free: bool
    shift: int
    ignore_index: int
    reduction: str
    return_stats: bool
    token_inputs: tuple[str, ...]
    outputs: tuple[bool, ...]  # which FunctionOutputs fields the forward gives


def _file(static: _Static) -> str:
    """``static``'s key: its description, made unique should two different settings print alike (two
    objective classes of one name)."""
    base, n = static.key, 1
    key = base
    while key in _STATICS and _STATICS[key][1:] != static[1:]:
        n += 1
        key = f"{base}#{n}"
    _STATICS[key] = static._replace(key=key)
    return key


_FUNCTION = ("run the autograd Function",)
"""What :func:`_static` files for a call the operators do not serve (a constant the compiler can hold)."""


def _static(options, *, device_type: str, fits: bool, compute: torch.dtype,
            second_compute, second_softcap, needs: tuple, has_class_weight: bool, has_second: bool,
            token_inputs: tuple, keywords: tuple):
    """The call's settings resolved and filed (see the module docstring): its :class:`_Facts`, or the eager
    door's TypeError / ValueError for a bad option (returned: raised here, the compiler would wrap it in its
    own error; :func:`loss` raises it).

    ``options`` / ``keywords``: as :func:`_spec` makes them.
    """
    try:
        return _facts(options, device_type=device_type, fits=fits, compute=compute, second_compute=second_compute,
                      second_softcap=second_softcap, needs=needs, has_class_weight=has_class_weight,
                      has_second=has_second, token_inputs=token_inputs, keywords=keywords)
    except (TypeError, ValueError) as err:
        return ("TypeError" if isinstance(err, TypeError) else "ValueError", str(err))


# torch.compiler.assume_constant_result(_static), without importing torch._dynamo (and with it Triton, which
# must not be imported before TRITON_INTERPRET is set) with dft_ops: the attribute is all that decorator sets
# (tests/test_torch_compile.py checks that it still is)
_static._dynamo_marked_constant = True


def _facts(options, *, device_type, fits, compute, second_compute, second_softcap, needs, has_class_weight,
           has_second, token_inputs, keywords) -> _Facts:
    opts = resolve_options(_rebuilt(options), **{name: _rebuilt(value) for name, value in keywords})
    if isinstance(opts.objective, Distill):
        return _FUNCTION  # its mixture terms and statistics are not among the operators' outputs yet
    _inputs.check_token_input_presence(opts.objective, set(token_inputs))
    _inputs.check_second_head_presence(opts.objective, has_second)
    device = torch.device(device_type)
    select_backend(opts, device)
    needs = Needs(*needs)
    plan = backward_mode(opts, device=device, vocab_size=None, hidden_size=None, compute_dtype=compute, needs=needs,
                         second_head=has_second, fits=fits)
    bare = opts.replace(class_weight=None)
    description = (f"{bare!r}|class_weight={has_class_weight}|{plan.mode}|needs={tuple(needs)}|"
                   f"{compute}|second={second_compute}/{second_softcap}")
    key = _file(_Static(description, bare, has_class_weight, plan, needs, compute, second_compute, second_softcap))
    return _Facts(key, opts.sync_free, opts.shift, opts.ignore_index, opts.reduction, opts.return_stats,
                  tuple(opts.objective.token_inputs), (True, *_shapes(_STATICS[key], has_bias=False).stats))


# the tags of :func:`_spec`'s tuples (plain tuples of constants: what the compiler converts faithfully)
_OBJECTIVE, _OPTIONS, _FLOAT = "dft_ops.custom_op:objective", "dft_ops.custom_op:options", "dft_ops.custom_op:float"


def _spec(value):
    """An option value as constants the compiler can pass to :func:`_static` whatever traced code built it (an
    object built while tracing has no faithful Python counterpart): an objective as ``(tag, class, settings)``,
    LossOptions as ``(tag, fields)`` (class_weight and vocab_parallel apart); :data:`UNSUPPORTED` for what the
    operators do not serve (vocabulary parallelism, this batch's tensors held by an objective)."""
    if isinstance(value, Objective):
        if value._batch_inputs or value._batch_second_head is not None:  # the deprecated way
            return UNSUPPORTED
        settings = tuple((name, _spec(getattr(value, name))) for name in value._parameters())
        if any(v is UNSUPPORTED for _, v in settings):
            return UNSUPPORTED
        return (_OBJECTIVE, type(value), settings)
    if isinstance(value, LossOptions):
        if value.vocab_parallel is not None:
            return UNSUPPORTED
        fields = tuple((name, _spec(getattr(value, name))) for name in LossOptions.names()
                       if name not in ("class_weight", "vocab_parallel"))
        if any(v is UNSUPPORTED for _, v in fields):
            return UNSUPPORTED
        return (_OPTIONS, fields)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    # a number the compiler may hold as a symbol (a value that changed between calls turns dynamic): these two
    # spellings make it a constant of the graph, guarded
    if isinstance(value, float):
        finite = value == value and abs(value) != math.inf  # not math.isfinite: the compiler cannot call it here
        return (_FLOAT, *value.as_integer_ratio()) if finite else value
    if isinstance(value, int):
        return operator.index(value)
    if isinstance(value, tuple):
        return tuple(_spec(v) for v in value)
    return value


def _workspace_budget(options_spec, settings: tuple) -> int | None:
    """The workspace_mb a call asks for, in bytes (traced: from the constants :func:`_spec` made), or None."""
    mb = dict(settings).get("workspace_mb", _MISSING)
    if mb is _MISSING and isinstance(options_spec, tuple) and options_spec and options_spec[0] == _OPTIONS:
        mb = dict(options_spec[1]).get("workspace_mb")
    if not isinstance(mb, (int, float)) or isinstance(mb, bool) or not mb > 0:
        return None  # None, or a value the options refuse (in _static, with the eager error)
    return int(mb * MB)


_MISSING = object()


def _rebuilt(value):
    """The value :func:`_spec` described, built again (natively)."""
    if isinstance(value, tuple) and value and value[0] == _OBJECTIVE:
        return value[1](**{name: _rebuilt(v) for name, v in value[2]})
    if isinstance(value, tuple) and value and value[0] == _OPTIONS:
        return LossOptions(**{name: _rebuilt(v) for name, v in value[1]})
    if isinstance(value, tuple) and value and value[0] == _FLOAT:
        return value[1] / value[2]  # exact: int / int rounds correctly, and the ratio is the float's own
    if isinstance(value, tuple):
        return tuple(_rebuilt(v) for v in value)
    return value


def _static_of(key: str) -> _Static:
    try:
        return _STATICS[key]
    except KeyError:
        raise RuntimeError(f"dft_ops: custom operator key {key!r} was not filed in this process: the graph was traced "
                           "elsewhere; trace it again here (torch.compile does on every new process)") from None


# ---------------------------------------------------------------------------------------------- the public path


class Done(NamedTuple):
    """What :func:`loss` computed, for :func:`dft_ops.functional.results` to return: the Function's outputs
    (each (N,) or the 0-d loss), the call's layout (loss positions, mask), whether stats were asked for, and
    the 0-d divisor of the loss (None for reduction "none")."""

    outputs: FunctionOutputs
    layout: TokenLayout
    return_stats: bool
    divisor: Tensor | None


def loss(hidden, weight, labels, bias, position_ids, num_items_in_batch, batch: dict, keywords: dict,
         options) -> Done:
    """:func:`dft_ops.linear_cross_entropy`'s call through the operators (its arguments, checked as its door
    checks them), or :data:`UNSUPPORTED`. Traced by the compiler: only metadata and constants steer it."""
    if any(is_dtensor(t) for t in (hidden, weight, bias, labels)):
        return UNSUPPORTED
    given = {k: v for k, v in keywords.items() if not isinstance(v, _Unset)}
    if "class_weight" in given:
        class_weight = given.pop("class_weight")
    else:
        class_weight = options.class_weight if isinstance(options, LossOptions) else None
    if given.get("vocab_parallel") is not None or batch.get("distill_mask") is not None:
        return UNSUPPORTED
    settings = tuple((name, _spec(value)) for name, value in given.items())
    options_spec = _spec(options)
    if options_spec is UNSUPPORTED or any(v is UNSUPPORTED for _, v in settings):
        return UNSUPPORTED
    if class_weight is not None:
        class_weight = LossOptions.check("class_weight", class_weight)
    second = batch["second_head"]
    _inputs.check_head_inputs(hidden, weight, labels, bias)
    V, D = weight.shape[0], hidden.shape[-1]
    compute = _inputs.compute_dtype("weight", hidden, weight)
    if second is not None:
        second = _inputs.check_second_head(second, tuple(labels.shape), V, hidden)
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    # whether one pass fits a workspace budget depends on V and D, which may be symbolic (dynamic shapes): a
    # branch on them here is a guard of the graph; the chunk itself is worked out by the operators, from real sizes
    budget = _workspace_budget(options_spec, settings)
    fits = True
    if budget is not None:
        fits = True if one_pass.chunk_tokens(V, D, device_type=hidden.device.type, workspace_bytes=budget,
                                             second_head=second is not None)[1] else False
    facts = _static(options_spec, device_type=hidden.device.type, fits=fits, compute=compute,
                    second_compute=None if second is None else second.compute_dtype,
                    second_softcap=None if second is None else second.softcap, needs=needs,
                    has_class_weight=class_weight is not None, has_second=second is not None,
                    token_inputs=tuple(name for name in _inputs.TOKEN_INPUTS if batch.get(name) is not None),
                    keywords=settings)
    if facts == _FUNCTION:
        return UNSUPPORTED
    if len(facts) == 2:  # an error (_Facts has more fields)
        kind, message = facts
        raise (TypeError if kind == "TypeError" else ValueError)(message)
    _inputs.check_labels(labels, facts.shift)
    _inputs.check_position_ids(position_ids, labels)
    num_items = _inputs.check_num_items(num_items_in_batch)
    loss_shape = (*labels.shape[:-1], max(labels.shape[-1] - facts.shift, 0))
    for name in facts.token_inputs:
        _inputs.check_token_input(name, batch[name], loss_shape, facts.shift, labels.device)
    if class_weight is not None:
        _inputs.check_class_weight(class_weight, V, hidden.device)
    op = _FORWARD[facts.sync_free]
    outs = op(hidden.reshape(-1, D), weight, bias, labels, class_weight, position_ids,
              batch["old_logprobs"], batch["ref_logprobs"],
              *((None,) * 3 if second is None else (second.hidden, second.weight, second.bias)),
              num_items if isinstance(num_items, Tensor) else None,
              None if isinstance(num_items, Tensor) or num_items is None else float(num_items), facts.key)
    out = FunctionOutputs(*(t if there else None for t, there in zip(outs, facts.outputs)))
    layout = TokenLayout(labels, shift=facts.shift, ignore_index=facts.ignore_index)
    divisor = None if facts.reduction == "none" else outs[8]
    return Done(out, layout, facts.return_stats, divisor)


# ---------------------------------------------------------------------------------------------- the operators

_N_OUT = 8  # FunctionOutputs' fields
_N_TERMS = len(GradTerms._fields)
_OUT_DTYPES = (torch.float32, torch.float32, torch.float32, torch.bool, torch.float32, torch.int64, torch.float32,
               torch.float32)
_FORWARD_SCHEMA = ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? class_weight, "
                   "Tensor? position_ids, Tensor? old_logprobs, Tensor? ref_logprobs, Tensor? second_hidden, "
                   "Tensor? second_weight, Tensor? second_bias, Tensor? num_items, float? num_items_value, str key) "
                   "-> (" + ", ".join(["Tensor"] * (_N_OUT + 1 + _N_TERMS + 3)) + ")")
_BACKWARD_SCHEMA = ("(Tensor grad_value, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
                    "Tensor? class_weight, Tensor? second_hidden, Tensor? second_weight, Tensor? second_bias, "
                    "Tensor? num_items, float? num_items_value, Tensor[] terms, str key, bool need_hidden, "
                    "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)")


class _Shapes(NamedTuple):
    """Which outputs a call's forward gives (others are (0,) placeholders): one rule for the real and the fake."""

    per_position: bool        # the loss is (N,) (reduction "none"), else 0-d
    stats: tuple[bool, ...]   # the FunctionOutputs fields after value
    terms: tuple[bool, ...]   # GradTerms fields saved for a two-pass backward
    grads: tuple[bool, ...]   # one pass: d_hidden, d_weight, d_bias


def _shapes(static: _Static, has_bias: bool) -> _Shapes:
    opts, needs = static.options, static.needs
    asft = opts.objective if isinstance(opts.objective, ASFT) else None
    with_stats = opts.return_stats
    # logprob always; entropy, is_top1, lse, predicted, z_loss, kl with the stats
    stats = (True, *(with_stats,) * 4, with_stats and opts.z_loss > 0, with_stats and asft is not None)
    one_pass = static.plan.mode == "onepass"
    two_pass_backward = not one_pass and any(needs)
    # the GradTerms fields loss_terms.token_loss sets for this call (by name: a field added to the contract for
    # another API, such as token_logprobs' entropy, is absent here; _forward_impl checks the real terms against it)
    present = dict(lse=True, softmax=True, target=True, uniform=opts.label_smoothing > 0,
                   second=asft is not None and asft.direction == "forward",
                   gap=asft is not None and asft.direction == "reverse", second_lse=asft is not None, logprob=True)
    terms = tuple(two_pass_backward and present.get(name, False) for name in GradTerms._fields)
    grads = tuple(one_pass and n for n in (needs.hidden, needs.weight, needs.bias and has_bias))
    return _Shapes(opts.reduction == "none", stats, terms, grads)


def _call(static: _Static, hidden, weight, bias, labels, class_weight, position_ids, token_tensors: dict,
          second_hidden, second_weight, second_bias, num_items, num_items_value):
    """The LossCall the eager door would build, from the operator's inputs and its filed settings."""
    opts = static.options if class_weight is None else static.options.replace(class_weight=class_weight)
    assert (class_weight is not None) == static.has_class_weight, static.key
    plan = static.plan
    if plan.mode == "onepass":  # the chunk from the real sizes (the plan was made without them)
        plan = plan._replace(chunk=one_pass.chunk_tokens(weight.shape[0], weight.shape[1],
                                                         device_type=hidden.device.type,
                                                         workspace_bytes=workspace_bytes(opts),
                                                         second_head=second_hidden is not None)[0])
    second = None
    if second_hidden is not None:
        second = SecondHead(second_hidden, second_weight, second_bias, static.second_softcap, static.second_compute)
    num = num_items if num_items is not None else num_items_value
    token_inputs = {name: t for name, t in token_tensors.items() if name in opts.objective.token_inputs}
    return build_call(opts, plan, static.needs, weight, bias, labels, position_ids, num,
                                 token_inputs, second, static.compute, weight.shape[0], device=hidden.device)


def _placeholder(like: Tensor, dtype=torch.float32) -> Tensor:
    return like.new_empty(0, dtype=dtype)


def _fresh(outputs: list[Tensor]) -> tuple[Tensor, ...]:
    """Outputs that share no memory (an operator's outputs may not alias each other): repeats are copied."""
    seen, out = set(), []
    for t in outputs:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return tuple(out)


def _forward_impl(hidden, weight, bias, labels, class_weight, position_ids, old_logprobs, ref_logprobs,
                  second_hidden, second_weight, second_bias, num_items, num_items_value, key):
    static = _static_of(key)
    shapes = _shapes(static, bias is not None)
    call = _call(static, hidden, weight, bias, labels, class_weight, position_ids,
                 {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}, second_hidden, second_weight,
                 second_bias, num_items, num_items_value)
    out, token_loss, grads = forward_pass(hidden, weight, bias, call)
    assert tuple(t is not None for t in out[1:]) == shapes.stats, (static.key, out)
    outputs = [t if t is not None else _placeholder(hidden, dtype) for t, dtype in zip(out, _OUT_DTYPES)]
    divisor = call.divisor
    if isinstance(divisor, Tensor):
        outputs.append(divisor)
    else:  # the eager path's Python float, as the float32 its division rounds it to
        outputs.append(torch.full((), 1.0 if divisor is None else divisor, dtype=torch.float32, device=hidden.device))
    layout = call.layout
    if any(shapes.terms):  # a two-pass backward: exactly the terms the fake implementation promised
        assert tuple(t is not None for t in token_loss.terms) == shapes.terms, (static.key, token_loss.terms._fields)
    for wanted_term, t in zip(shapes.terms, token_loss.terms):
        if not wanted_term:
            outputs.append(_placeholder(hidden))
        elif layout.rows is None:
            outputs.append(t.to(torch.float32))
        else:  # (M,) -> (N,): the backward picks the same rows again
            outputs.append(t.new_zeros(layout.n_positions, dtype=torch.float32).index_copy_(0, layout.rows, t.float()))
    for wanted_grad, g in zip(shapes.grads, grads if grads is not None else (None,) * 3):
        outputs.append(g if wanted_grad else _placeholder(hidden))
    return _fresh(outputs)


def _forward_fake(hidden, weight, bias, labels, class_weight, position_ids, old_logprobs, ref_logprobs,
                  second_hidden, second_weight, second_bias, num_items, num_items_value, key):
    static = _static_of(key)
    shapes = _shapes(static, bias is not None)
    N, V, D = hidden.shape[0], weight.shape[0], weight.shape[1]
    outputs = [hidden.new_empty((N,) if shapes.per_position else (), dtype=torch.float32)]
    outputs += [hidden.new_empty((N,) if there else (0,), dtype=dtype)
                for there, dtype in zip(shapes.stats, _OUT_DTYPES[1:])]
    outputs.append(hidden.new_empty((), dtype=torch.float32))
    outputs += [hidden.new_empty((N,) if there else (0,), dtype=torch.float32) for there in shapes.terms]
    outputs += [hidden.new_empty(shape if there else (0,), dtype=torch.float32)
                for there, shape in zip(shapes.grads, ((N, D), (V, D), (V,)))]
    return tuple(outputs)


def _backward_impl(grad_value, hidden, weight, bias, labels, class_weight, second_hidden, second_weight,
                   second_bias, num_items, num_items_value, terms, key, need_hidden, need_weight, need_bias):
    static = _static_of(key)
    shapes = _shapes(static, bias is not None)
    call = _call(static, hidden, weight, bias, labels, class_weight, None, {}, second_hidden, second_weight,
                 second_bias, num_items, num_items_value)
    picked = GradTerms(*(call.layout.pick(t) if there else None for there, t in zip(shapes.terms, terms)))
    grads = backward_pass(grad_value, hidden, weight, bias, call, picked, (second_hidden, second_weight, second_bias),
                          (need_hidden, need_weight, need_bias))
    return tuple(g if g is not None else _placeholder(hidden, like.dtype if like is not None else torch.float32)
                 for g, like in zip(grads, (hidden, weight, bias)))


def _backward_fake(grad_value, hidden, weight, bias, labels, class_weight, second_hidden, second_weight,
                   second_bias, num_items, num_items_value, terms, key, need_hidden, need_weight, need_bias):
    def grad(needed, like):
        if like is None or not needed:
            return hidden.new_empty(0, dtype=like.dtype if like is not None else torch.float32)
        return torch.empty_like(like, memory_format=torch.contiguous_format)

    return grad(need_hidden, hidden), grad(need_weight, weight), grad(need_bias, bias)


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, class_weight, _position_ids, _old, _ref, second_hidden, second_weight,
     second_bias, num_items, num_items_value, key) = inputs
    static = _static_of(key)
    ctx.key, ctx.num_items_value, ctx.sync_free = key, num_items_value, static.options.sync_free
    ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.has_bias = bias is not None
    saved = output[_N_OUT + 1 + _N_TERMS:] if static.plan.mode == "onepass" else output[_N_OUT + 1: _N_OUT + 1 + _N_TERMS]
    ctx.save_for_backward(output[_N_OUT], hidden, weight, bias, labels, class_weight, second_hidden, second_weight,
                          second_bias, num_items, *saved)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_value, *_):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("dft_ops.linear_cross_entropy: double backward is not supported (see the Function's "
                           "backward, dft_ops.autograd)")
    static = _static_of(ctx.key)
    divisor, hidden, weight, bias, labels, class_weight, h2, w2, b2, num_items, *saved = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad[:3])
    if static.plan.mode == "onepass":
        shapes = _shapes(static, ctx.has_bias)
        kept = [g if there else None for there, g in zip(shapes.grads, saved)]
        grads = scaled_grads(kept, ctx.input_dtypes, grad_value / divisor, need)
    else:
        op = _BACKWARD[ctx.sync_free]
        grads = op(grad_value, hidden, weight, bias, labels, class_weight, h2, w2, b2, num_items, ctx.num_items_value,
                   list(saved), ctx.key, need[0], need[1], need[2] and bias is not None)
        grads = [g if wanted_grad else None for g, wanted_grad in zip(grads, (need[0], need[1], need[2]))]
    return (*grads, *(None,) * 11)


def _define(name: str, schema: str, impl, fake, tags=()):
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema, tags=tags)
    op.register_fake(fake)
    return op


def _register():
    """The two operator pairs: sync-free (capturable) and the default (tagged cudagraph_unsafe where torch has it)."""
    unsafe = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
    forward, backward = {}, {}
    for sync_free, suffix, tags in ((False, "", unsafe), (True, "_sync_free", ())):
        backward[sync_free] = _define(f"linear_cross_entropy_backward{suffix}", _BACKWARD_SCHEMA, _backward_impl,
                                      _backward_fake, tags)
        forward[sync_free] = _define(f"linear_cross_entropy{suffix}", _FORWARD_SCHEMA, _forward_impl, _forward_fake,
                                     tags)
        forward[sync_free].register_autograd(_backward, setup_context=_setup_context)
    # the OpOverloads: what a traced call records (the CustomOpDef objects only register)
    return ({k: getattr(torch.ops.dft_ops, f"linear_cross_entropy{'_sync_free' if k else ''}").default for k in forward},
            {k: getattr(torch.ops.dft_ops, f"linear_cross_entropy_backward{'_sync_free' if k else ''}").default
             for k in backward})


_FORWARD, _BACKWARD = _register()
