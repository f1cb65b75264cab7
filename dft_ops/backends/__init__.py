"""The backends: the contract (:mod:`.protocol`), its shared math (:mod:`.partials`, :mod:`.products`), the
PyTorch backend (:mod:`.torch_backend`), the one-pass head (:mod:`.one_pass`), the vocabulary-parallel wrapper
(:mod:`.sharded`), and the choice of one per call (:func:`backward_mode`, :func:`select_backend`).

The Triton backend lives in ``dft_ops.kernels`` (it imports only the protocol and the shared math from
here); it is imported the first time a call selects it.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch

from . import one_pass
from .protocol import (BACKWARD_MODES, DEFAULT_WORKSPACE_MB, FLOAT_DTYPES, MB, Backend, ForwardStats, Grads,
                       GradTerms, Head, Needs, OnePassBackend, SecondHead, Tokens, interpreting, product_dtype)
from .torch_backend import TorchBackend

__all__ = ["Backend", "OnePassBackend", "ForwardStats", "Grads", "GradTerms", "Head", "Needs", "SecondHead",
           "Tokens", "TorchBackend", "Plan", "backward_mode", "select_backend", "resolve_backward_mode",
           "product_dtype", "interpreting", "BACKWARD_MODES", "DEFAULT_WORKSPACE_MB", "FLOAT_DTYPES", "MB"]


def resolve_backward_mode(mode: str, filter_eps: float | None) -> str:
    """The two-pass Triton backward of a mode: "gemm" or "fused" ("auto": gemm, fused with filtering)."""
    if mode in ("auto", "onepass"):
        return "fused" if filter_eps is not None else "gemm"
    return mode


class Plan(NamedTuple):
    """How one call runs: ``mode`` "onepass" or "two-pass", and why (a sentence for errors and benchmarks);
    ``chunk``: tokens per chunk of a one-pass call."""

    mode: str
    reason: str
    chunk: int | None = None


def saved_tensor_hooks_active() -> bool:
    """Saved-tensor hooks are set (activation checkpointing without re-entry, CPU offload): what the forward
    keeps would be packed by them."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        return top(False) is not None
    except TypeError:  # an older signature without the tracing flag
        return top() is not None


def backward_mode(options, *, device: torch.device, vocab_size: int | None, hidden_size: int | None,
                  compute_dtype: torch.dtype, needs: Needs, second_head: bool, fits: bool | None = None) -> Plan:
    """The way a call runs, decided before the autograd Function from global shapes and options only.

    One-pass (every product in BLAS, 6NDV) where it applies; else the two passes.
    It does not apply (``options.backward_mode == "auto"`` then runs two passes) when:
    no gradient is needed (``needs``; a no-grad call is the two-pass forward, 2NDV);
    the reduction is "none" (a per-token upstream gradient); the objective needs whole
    sequences; the products run in fp16 (G formed before a loss scale is known would
    underflow); saved-tensor hooks are set (checkpointing without re-entry would keep and
    then recompute the formed gradients; offload would copy them); gradient filtering is
    asked for, or the precise mode; an explicit ``workspace_mb`` cannot hold the smallest fast chunk.
    ``options.backward_mode == "onepass"`` runs one-pass whatever the budget (the
    options refused it where it cannot apply); "gemm" / "fused" run two passes.
    Under vocabulary parallelism ``vocab_size`` is the whole vocabulary's: every rank
    plans the same chunks and so issues the same collectives.

    ``fits``: whether the smallest fast chunk fits ``workspace_mb``, when the caller has
    worked it out (:func:`workspace_fits`; the compiler's symbolic shapes): the sizes are
    then not read and the plan's ``chunk`` is None, for the caller to fill in.
    """
    mode = options.backward_mode
    if mode in ("gemm", "fused"):
        return Plan("two-pass", f"backward_mode={mode!r}")
    if fits is None:
        chunk, fits = one_pass.chunk_tokens(vocab_size, hidden_size, device_type=device.type,
                                            workspace_bytes=workspace_bytes(options), second_head=second_head)
    else:
        chunk = None
    if not any(needs):
        return Plan("two-pass", "no gradient is needed: the forward's statistics only")
    if mode == "onepass":
        return Plan("onepass", "backward_mode='onepass'", chunk)
    for applies, reason in (
            (options.reduction != "none", "reduction='none': an upstream gradient per token"),
            (not options.objective.needs_segments, f"{type(options.objective).__name__} weighs whole sequences"),
            (compute_dtype != torch.float16, "fp16 products: G formed before the loss scale would underflow"),
            (not saved_tensor_hooks_active(), "saved-tensor hooks are set (checkpointing, offload)"),
            (options.filter_eps is None, "gradient filtering runs the fused two-pass backward"),
            (not options.precise, "precise splits the two-pass backward's G in two 16-bit parts"),
            (fits, f"workspace_mb={options.workspace_mb} holds fewer than {chunk} tokens of the vocabulary")):
        if not applies:
            return Plan("two-pass", reason)
    return Plan("onepass", "backward_mode='auto'", chunk)


def workspace_bytes(options) -> int | None:
    """The one-pass head's workspace budget of the options, in bytes (None: the mode's default)."""
    return None if options.workspace_mb is None else int(options.workspace_mb * MB)


def select_backend(options, device: torch.device, plan: Plan | None = None) -> Backend:
    """The :class:`Backend` of one call, from its validated :class:`~dft_ops.LossOptions`, the inputs' device
    and its :class:`Plan` (None: two passes).

    ``options.backend``: "torch", "triton", or "auto" (Triton on CUDA tensors, PyTorch elsewhere). The
    Triton backend takes ``backward_mode``, ``workspace_mb``, ``filter_eps`` and ``precise``; the PyTorch
    backend runs its own exact two passes or the one-pass head with fp32 G. Raises ValueError naming the
    option before any work.
    """
    name = options.backend
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        backend = TorchBackend()
        if plan is not None and plan.mode == "onepass":
            return one_pass.OnePass(one_pass.TorchRowPasses(), backend, plan.chunk, g_dtype="fp32")
        return backend
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
            f"interpreter); hidden is on {device}. Use backend='torch' or 'auto'."
        )
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend: 'triton' needs the triton package, which is not installed here (Triton ships "
                         "wheels for Linux only); pip install triton, or use backend='torch'")
    from ..kernels import TritonBackend, TritonRowPasses  # imports triton: only when asked for

    workspace = DEFAULT_WORKSPACE_MB if options.workspace_mb is None else options.workspace_mb
    backend = TritonBackend(resolve_backward_mode(options.backward_mode, options.filter_eps),
                            workspace_bytes=max(1, int(workspace * MB)), filter_eps=options.filter_eps,
                            precise=options.precise)
    if plan is not None and plan.mode == "onepass":
        return one_pass.OnePass(TritonRowPasses(), backend, plan.chunk, g_dtype="compute")
    return backend
