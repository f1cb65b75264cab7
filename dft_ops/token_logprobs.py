"""``dft_ops.token_logprobs``: per-token log-probabilities and entropies, both differentiable, without logits.

What RL trainers need from the output head and nothing else: PPO / GRPO / DAPO / GSPO losses, KL
penalties, entropy bonuses, DPO / KTO are elementwise on the per-token log-probability of the taken
token and (for entropy bonuses and high-entropy masks) the entropy of the predicted distribution.
:func:`token_logprobs` returns both, each the loss positions' shape, and its backward takes any
upstream gradient of both at once: with ``g_l`` and ``g_H`` the upstream gradients of ``logprob`` and
``entropy`` of a token,

    d/dz_j = g_l (1[j = y] - s_j) - g_H s_j (log s_j + H)

which is the contract's G (:mod:`dft_ops.backends.protocol`) with ``a = -(g_l + g_H H)``, ``b = -g_l``
and the entropy term ``k = -g_H`` (the factor of ``s log s``), where ``H`` is the forward's entropy
(consistent with its log-sum-exp). An upstream gradient per token means the two-pass backends
(forward statistics, then G recomputed tile by tile): never a tokens x vocabulary tensor.

Temperatures: one float for the call, or a tensor broadcastable to the loss positions (a temperature
per token, or per sequence as ``(B, 1)``), applied inside the kernels row by row (after the soft-cap,
so bias and soft-cap are exact too). docs/rl.md has the math, what each framework calls, and measurements.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import inputs as _inputs
from .autograd import _no_autocast
from .backends import Plan, select_backend
from .backends.protocol import GradTerms, Head, Needs, Tokens
from .backends.sharded import ShardedBackend
from .distributed import VocabParallel, check_group, localize
from .functional import _vocab_parallel_hint
from .layout import TokenLayout
from .options import LossOptions

_NO_INDEX = -(2**63)  # ignore_index=None: no label can be ignored; labels equal to it are refused
_PLAN = Plan("two-pass", "token_logprobs: an upstream gradient per token for logprob and entropy")
# what the ranks of a vocabulary-parallel group compare, the same keys in the same order on every rank
_COMPARED_SETTINGS = (*(n for n in LossOptions.names() if n != "vocab_parallel"), "needs", "entropy", "no_index")
_COMPARED_TENSORS = ("position_ids", "temperature")


class TokenLogprobs(NamedTuple):
    """The result of :func:`token_logprobs`; unpacks as ``logprob, entropy = token_logprobs(...)``.

    Attributes:
        logprob: float32, the loss positions' shape (labels, or ``labels[..., shift:]``): log p of the
            label under the (soft-capped, tempered) distribution, 0 at ignored positions; differentiable.
            Never above 0 (the fp32 difference ``z_y - lse`` can round above it on peaked rows: clamped).
        entropy: float32, the same shape: entropy (nats) of the distribution, 0 at ignored positions;
            differentiable. None with ``return_entropy=False``.
    """

    logprob: Tensor
    entropy: Tensor | None


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = True,
    bias: Tensor | None = None,
    softcap: float | None = None,
    shift: bool | int = False,
    ignore_index: int | None = -100,
    position_ids: Tensor | None = None,
    vocab_parallel: VocabParallel | None = None,
    backend: str = "auto",
    backward_mode: str = "auto",
    workspace_mb: float | None = None,
    precise: bool = False,
) -> TokenLogprobs:
    """Per-token ``log softmax(z)[label]`` and entropy of ``z = softcap(hidden @ weight.T + bias) / temperature``.

    Args:
        hidden: (..., D) float32 / bfloat16 / float16 final hidden states (any strides).
        weight: (V, D) output head (this rank's rows under ``vocab_parallel``).
        labels: (...) integer labels, hidden's leading shape.
        temperature: a positive float for every token, or a floating tensor broadcastable to the loss
            positions' shape (e.g. (B, 1): one per sequence; (B, S - shift): one per token), positive and
            finite where the label is not ignored, on the labels' device. Never differentiated.
        return_entropy: also compute the entropy (a little more work in the forward; without it the
            backward has no entropy term either).
        bias: (V,) head bias, or None.
        softcap: ``z <- softcap * tanh(z / softcap)`` before the temperature, or None.
        shift: position t predicts ``labels[..., t + shift]`` (True: 1, the causal shift).
        ignore_index: label value whose positions get 0 and no gradient; None: every label is a class
            (verl's convention; a label outside [0, V) is then an error).
        position_ids: (...) the labels' shape, for packed batches: with ``shift``, a position whose target
            lies in the next packed document (a 0 of ``position_ids`` in between) is ignored.
        vocab_parallel: a :class:`dft_ops.VocabParallel` (weight and bias are this rank's rows; labels are
            global ids); a ``Shard(0)`` DTensor weight says the same by itself.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        backward_mode: "auto" / "gemm" (G per vocabulary split, cuBLAS products) or "fused" (one Triton
            kernel, no workspace); "onepass" does not apply (the upstream gradient is per token).
        workspace_mb: bound of the "gemm" backward's workspace in MiB, or None (256).
        precise: 16-bit G as a high and a low part in the backward's products.

    Returns:
        :class:`TokenLogprobs` ``(logprob, entropy)``, float32, each the loss positions' shape
        ``(..., S - shift)``; their backward takes upstream gradients of both at once (an unused output
        costs nothing). Gradients reach hidden, weight and bias, each in its own dtype.

    Raises:
        TypeError / ValueError naming the argument (``temperature`` of the wrong shape, dtype or device,
        <= 0 or not finite; labels outside the vocabulary; ...). RuntimeError on double backward.
    """
    hint = _vocab_parallel_hint({"vocab_parallel": vocab_parallel}, None, weight)
    try:
        door = _Door(hidden, weight, labels, bias, temperature, return_entropy, softcap, shift, ignore_index,
                     position_ids, vocab_parallel, backend, backward_mode, workspace_mb, precise)
    except (TypeError, ValueError) as err:
        if hint is not None and dist.is_available() and dist.is_initialized():
            # every rank learns of it, then raises (the same fields as a valid call's check, all zero)
            check_group(hint, hidden=hidden, settings=dict.fromkeys(_COMPARED_SETTINGS, 0),
                        tensors=dict.fromkeys(_COMPARED_TENSORS), error=err)
        raise
    call = door.finish()
    out = TokenLogprobsFunction.apply(door.hidden, call.head.weight, call.head.bias, call)
    positions = call.layout.to_loss_positions
    return TokenLogprobs(positions(out[0]), positions(out[1]) if call.entropy else None)


class TokenCall(NamedTuple):
    """One validated :func:`token_logprobs` call, what its Function reads."""

    layout: TokenLayout
    head: Head
    tokens: Tokens
    backend: object
    entropy: bool


class _Door:
    """The call's checks (every argument once, errors naming it) and its one device synchronisation."""

    def __init__(self, hidden, weight, labels, bias, temperature, return_entropy, softcap, shift, ignore_index,
                 position_ids, vocab_parallel, backend, backward_mode, workspace_mb, precise):
        if not isinstance(return_entropy, bool):
            raise TypeError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
        if backward_mode == "onepass":
            raise ValueError("backward_mode: 'onepass' forms the gradients in the forward for one upstream number; "
                             "token_logprobs takes an upstream gradient per token: use 'auto', 'gemm' or 'fused'")
        self.no_index = ignore_index is None
        if isinstance(temperature, Tensor):
            token_temperature, temperature = temperature, None
        else:
            token_temperature = None
            if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
                raise TypeError(f"temperature: expected a positive float or a floating tensor, got "
                                f"{type(temperature).__name__}")
        # the settings of the ordinary loss, with its checks and messages (each names its field)
        opts = LossOptions(reduction="none", softcap=softcap, shift=shift, temperature=temperature,
                           ignore_index=_NO_INDEX if self.no_index else ignore_index, backend=backend,
                           vocab_parallel=vocab_parallel, backward_mode=backward_mode, workspace_mb=workspace_mb,
                           precise=precise)
        local = localize(hidden, weight, bias, labels, opts.vocab_parallel)
        hidden, weight, bias, labels = local.hidden, local.weight, local.bias, local.labels
        _inputs.check_head_inputs(hidden, weight, labels, bias, vocab_rows=local.vocab_parallel is not None)
        _inputs.check_labels(labels, opts.shift)
        _inputs.check_position_ids(position_ids, labels)
        loss_shape = (*labels.shape[:-1], max(labels.shape[-1] - opts.shift, 0))
        if token_temperature is not None:
            token_temperature = _check_temperature(token_temperature, loss_shape, labels.device)
        select_backend(opts, hidden.device)  # a backend this device cannot run is refused before any collective
        grad = torch.is_grad_enabled()
        self.needs = Needs(grad and hidden.requires_grad, grad and weight.requires_grad,
                           grad and bias is not None and bias.requires_grad)
        self.hidden_nd, self.weight, self.bias, self.labels = hidden, weight, bias, labels
        self.opts, self.split, self.from_dtensor = opts, local.vocab_parallel, local.from_dtensor
        self.position_ids, self.token_temperature, self.entropy = position_ids, token_temperature, return_entropy

    def finish(self) -> TokenCall:
        """The group check (vocabulary parallelism), the layout, the one device sync, the call."""
        opts, split, weight, bias = self.opts, self.split, self.weight, self.bias
        hidden, labels = self.hidden_nd, self.labels
        if split is not None:
            settings = {**opts.digests(), "needs": sum(int(n) << i for i, n in enumerate(self.needs)),
                        "entropy": int(self.entropy), "no_index": int(self.no_index)}
            split = check_group(split, hidden=hidden, weight=weight, labels=labels, settings=settings,
                                tensors={"position_ids": self.position_ids, "temperature": self.token_temperature},
                                sharded_dtensor=self.from_dtensor)
            opts = opts.replace(vocab_parallel=split)
        V, D = (weight.shape[0] if split is None else split.vocab_size), hidden.shape[-1]
        backend = select_backend(opts, hidden.device, _PLAN)
        if split is not None:
            backend = ShardedBackend(backend, split)
        labels = _within_documents(labels, self.position_ids, opts.shift, opts.ignore_index)
        layout = TokenLayout(labels, shift=opts.shift, ignore_index=opts.ignore_index)
        to_read = {}
        if self.no_index:  # the one value the stand-in ignore index would silently drop
            to_read["sentinel_labels"] = (self.labels[..., opts.shift:] == _NO_INDEX).sum()
        temperature = self.token_temperature
        if temperature is not None:
            # only where a label is computed: a padded position may hold anything (e.g. 0)
            bad = ~(torch.isfinite(temperature) & (temperature > 0)) & layout.mask
            to_read["invalid_temperature"] = bad.sum()
        try:
            read = dict(zip(to_read, layout.compact(V, *to_read.values())))
        except ValueError as err:
            if self.no_index:
                message = str(err).replace(f" that are not ignore_index={_NO_INDEX}", "")
                raise ValueError(f"{message}; ignore_index=None: every label is a class (pass ignore_index=-100 "
                                 "to have positions ignored)") from None
            raise
        if read.get("sentinel_labels"):
            raise ValueError(f"labels: {int(read['sentinel_labels'])} value(s) outside [0, {V}) (ignore_index=None: "
                             "every label is a class)")
        if read.get("invalid_temperature"):
            raise ValueError(f"temperature: {int(read['invalid_temperature'])} value(s) <= 0 or not finite (NaN, "
                             "inf) at positions whose label is not ignored; expected positive finite temperatures")
        inv_temperature = None
        if temperature is not None:
            inv_temperature = (1.0 / layout.align(temperature)).contiguous()
        compute = _inputs.compute_dtype("weight", hidden, weight)
        head = Head(weight, bias, opts.softcap, opts.temperature, compute)
        tokens = Tokens(layout.row_targets, layout.rows, inv_temperature)
        self.hidden = hidden.reshape(-1, D)
        return TokenCall(layout, head, tokens, backend, self.entropy)


def _check_temperature(t: Tensor, loss_shape: tuple, device) -> Tensor:
    """A temperature tensor expanded to the loss positions' shape (float32, detached); errors name it."""
    _inputs.check_dense("temperature", t)
    if not t.dtype.is_floating_point:
        raise TypeError(f"temperature: expected a floating-point tensor (or a float), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"temperature: on {t.device} but the labels are on {device}")
    try:
        shape = torch.broadcast_shapes(tuple(t.shape), tuple(loss_shape))
    except RuntimeError:
        shape = None
    if shape != tuple(loss_shape):
        raise ValueError(f"temperature: shape {tuple(t.shape)} does not broadcast to the loss positions' shape "
                         f"{tuple(loss_shape)} (labels, or labels[..., shift:]); pass a float, one per sequence "
                         f"({loss_shape[0] if loss_shape else 1}, 1), or one per position")
    return t.detach().to(torch.float32).expand(loss_shape)


def _within_documents(labels: Tensor, position_ids: Tensor | None, shift: int, ignore_index: int) -> Tensor:
    """Labels with the targets of another packed document ignored: position t predicts ``labels[..., t + shift]``,
    which belongs to the next document when ``position_ids`` restarts at 0 in (t, t + shift]."""
    S = labels.shape[-1]
    if position_ids is None or not shift or shift >= S:
        return labels
    starts = position_ids == 0
    starts[..., 0] = True
    document = torch.cumsum(starts.long(), dim=-1)
    crossing = document[..., shift:] != document[..., :-shift]
    out = labels.clone()
    out[..., shift:] = torch.where(crossing, torch.full_like(out[..., shift:], ignore_index), out[..., shift:])
    return out


class TokenLogprobsFunction(torch.autograd.Function):
    """``apply(hidden (N, D), weight, bias, call)`` -> ``(logprob (N,),)`` or ``(logprob, entropy)``, float32,
    0 at positions not computed. Saved for backward: the inputs and O(tokens) floats (lse, entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, call: TokenCall):
        ctx.set_materialize_grads(False)  # an output nobody used gets no term (None), not a zero pass
        head = call.head._replace(weight=weight, bias=bias)
        with _no_autocast(hidden.device):
            stats = call.backend.lse_forward(hidden, head, call.tokens, with_stats=call.entropy)
        # log p <= 0; z_y - lse in fp32 rounds above 0 on peaked rows (verl #2656's symptom)
        logprob = torch.clamp(stats.logprob, max=0.0)
        entropy = stats.entropy if call.entropy else None
        ctx.save_for_backward(hidden, weight, bias, stats.lse, entropy)
        ctx.call = call
        layout = call.layout
        out = (layout.scatter(logprob),) if entropy is None else (layout.scatter(logprob), layout.scatter(entropy))
        return out

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        if torch.is_grad_enabled():
            raise RuntimeError("dft_ops.token_logprobs: double backward is not supported (the fused backward's "
                               "gradients are not differentiable)")
        need = ctx.needs_input_grad[:3]
        hidden, weight, bias, lse, entropy = ctx.saved_tensors
        call: TokenCall = ctx.call
        if not any(need) or (grad_logprob is None and grad_entropy is None):
            return None, None, None, None
        layout = call.layout
        g_l = torch.zeros_like(lse) if grad_logprob is None else layout.pick(grad_logprob).to(torch.float32)
        a, b, k = -g_l, -g_l, None
        if grad_entropy is not None:
            g_h = layout.pick(grad_entropy).to(torch.float32)
            # dH/dz = -s (log s + H): with H the forward's entropy, consistent with its lse
            a, k = a - g_h * entropy, -g_h
        terms = GradTerms(lse, softmax=a.contiguous(), target=b.contiguous(),
                          entropy=None if k is None else k.contiguous())
        head = call.head._replace(weight=weight, bias=bias)
        with _no_autocast(hidden.device):
            grads = call.backend.grad_backward(hidden, head, call.tokens, terms,
                                               Needs(need[0], need[1], bias is not None and need[2]))
        return grads.hidden, grads.weight, grads.bias, None
