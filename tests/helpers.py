"""Shared test helpers: random heads, comparison against the float64 reference."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dft_ops
from dft_ops.backends.protocol import GradTerms, Head, Needs, Tokens, product_dtype

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def make_inputs(shape, D, V, dtype, device, *, bias=False, ignore_frac=0.2, scale=1.0, ignore_index=-100):
    """Random hidden (*shape, D), weight (V, D), labels (*shape) and optional bias; logits of order `scale`."""
    hidden = torch.randn(*shape, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) * scale / D**0.5).to(dtype)
    labels = torch.randint(0, V, shape, device=device)
    if ignore_frac:
        labels[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    b = (torch.randn(V, device=device) * 0.5).to(dtype) if bias else None
    return hidden, weight, labels, b


def class_weights(V, device):
    """Random positive class weights with a few zeros (classes that count only through label smoothing)."""
    u = torch.rand(V, device=device) * 1.5 + 0.1
    u[::7] = 0.0
    return u


def small_chunks(monkeypatch, tokens: int, vocab: int) -> None:
    """Chunk sizes for test shapes: the torch backend's two passes (``tokens`` x ``vocab`` blocks) and the
    one-pass head (``tokens`` per chunk), so that a test's few hundred tokens span several chunks."""
    from dft_ops.backends import one_pass, torch_backend

    monkeypatch.setattr(torch_backend, "TOKEN_CHUNK", tokens)
    monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", vocab)
    for name in ("MIN_CHUNK", "CUDA_MIN_CHUNK", "GRANULE"):
        monkeypatch.setattr(one_pass, name, tokens)


class OutputsSeen(TorchDispatchMode):
    """Records every tensor a torch op produces while active, as (numel, dtype) in ``seen``."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((t.numel(), t.dtype))
        return out


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def loss_and_grads(fn, hidden, weight, bias, upstream=None, **kwargs):
    """Call fn(hidden, weight, ..., bias=...) on fresh leaves; returns (loss, [grads of hidden, weight, bias])."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(*leaves, bias=b, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    if loss.ndim == 0:
        loss.backward()
    else:
        loss.backward(upstream)
    grads = [leaves[0].grad, leaves[1].grad] + ([b.grad] if b is not None else [])
    return out, grads


def check_against_reference(hidden, weight, labels, bias, *, backend, upstream=None, tol=None, backend_options=None,
                            **opts):
    """Our loss/grads vs the float64 reference on the same inputs; returns (ours, ref) outputs.

    ``tol``: relative tolerance of the gradients (default by dtype, TOL). ``backend_options``:
    options of how dft-ops runs (backward_mode, workspace_mb), not given to the reference.
    """
    dtype = hidden.dtype
    ours, g = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, upstream,
                             labels=labels, backend=backend, **(backend_options or {}), **opts)
    # options of how the fused backward computes, not of what: the reference has no such thing
    math_opts = {k: v for k, v in opts.items() if k not in ("precise", "filter_eps")}
    ref, gr = loss_and_grads(dft_ops.naive.linear_cross_entropy, hidden.double(), weight.double(),
                             bias.double() if bias is not None else None,
                             upstream.double() if upstream is not None else None, labels=labels, **math_opts)
    loss = ours[0] if isinstance(ours, tuple) else ours
    ref_loss = ref[0] if isinstance(ref, tuple) else ref
    tol = TOL[dtype] if tol is None else tol
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    # the loss is computed in fp32 from the given inputs: fp32-accurate whatever their dtype
    assert rel_err(loss, ref_loss) < 1e-4 or (loss - ref_loss).abs().max() < 1e-6, (loss, ref_loss)
    for name, a, b in zip(("hidden", "weight", "bias"), g, gr):
        assert a is not None and a.dtype == dtype, name
        assert torch.isfinite(a).all(), name
        err = rel_err(a, b)
        # an absolute floor for gradients below fp32 resolution (e.g. DFT with p ~ exp(-1e4)
        # underflowing to an exact 0 against a float64 reference of 1e-28)
        assert err < tol or (a.double() - b).norm() < 1e-20, f"grad {name}: relative error {err:.2e} > {tol}"
    return ours, ref


# --- calling a backend's passes with the test's descriptive arguments ------------------------------------------

class Coef(NamedTuple):
    """The G coefficients of a test (a, b, c, e, f of the contract); the log-sum-exps come with the call."""

    softmax: torch.Tensor
    target: torch.Tensor
    uniform: torch.Tensor | None = None
    second: torch.Tensor | None = None
    gap: torch.Tensor | None = None


def contract(hidden, weight, bias, targets, rows=None, *, softcap=None, temperature=None, class_weight=None,
             compute_dtype=None, second=None):
    """(Head, Tokens) of the contract (dft_ops.backends.protocol) for a test's tensors.

    ``compute_dtype``: the requested (autocast) dtype, or None for the product-dtype rule of the operands;
    ``second``: a SecondHead whose compute dtype follows the same rule.
    """
    compute = product_dtype(hidden.dtype, weight.dtype, compute_dtype)
    if second is not None and second.compute_dtype is None:
        second = second._replace(compute_dtype=product_dtype(second.hidden.dtype, second.weight.dtype, compute_dtype))
    head = Head(weight, bias, softcap, temperature, compute, class_weight, second)
    return head, Tokens(targets, rows)


def forward(impl, hidden, weight, bias, targets, rows=None, *, with_stats=False, smoothing=False, softcap=None,
            temperature=None, class_weight=None, compute_dtype=None, second=None, **settings):
    """``lse_forward`` of a Backend object or a module-level pass function (``settings``: its own keywords)."""
    head, tokens = contract(hidden, weight, bias, targets, rows, softcap=softcap, temperature=temperature,
                            class_weight=class_weight, compute_dtype=compute_dtype, second=second)
    fn = impl.lse_forward if hasattr(impl, "lse_forward") else impl
    return fn(hidden, head, tokens, with_stats=with_stats, smoothing=smoothing, **settings)


def backward(impl, hidden, weight, bias, targets, rows, lse, coef, *, need_hidden=True, need_weight=True,
             need_bias=False, second_lse=None, softcap=None, temperature=None, class_weight=None, compute_dtype=None,
             second=None, **settings):
    """``grad_backward`` of a Backend object or a module-level backward function; returns Grads."""
    head, tokens = contract(hidden, weight, bias, targets, rows, softcap=softcap, temperature=temperature,
                            class_weight=class_weight, compute_dtype=compute_dtype, second=second)
    terms = GradTerms(lse, *coef, second_lse=second_lse)
    fn = impl.grad_backward if hasattr(impl, "grad_backward") else impl
    return fn(hidden, head, tokens, terms, Needs(need_hidden, need_weight, need_bias), **settings)
