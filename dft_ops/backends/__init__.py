"""The backends: the contract (:mod:`.protocol`), its shared math (:mod:`.partials`), the PyTorch backend
(:mod:`.torch_backend`), the vocabulary-parallel wrapper (:mod:`.sharded`), and the selection of one per call.

The Triton backend lives in ``dft_ops.kernels`` (it imports only the protocol and the partials
from here); it is imported the first time a call selects it.
"""

from __future__ import annotations

import importlib.util

import torch

from .protocol import (BACKWARD_MODES, DEFAULT_WORKSPACE_MB, FLOAT_DTYPES, MB, Backend, ForwardStats, Grads,
                       GradTerms, Head, Needs, SecondHead, Tokens, interpreting, product_dtype)
from .torch_backend import TorchBackend

__all__ = ["Backend", "ForwardStats", "Grads", "GradTerms", "Head", "Needs", "SecondHead", "Tokens", "TorchBackend",
           "select_backend", "resolve_backward_mode", "product_dtype", "interpreting", "BACKWARD_MODES",
           "DEFAULT_WORKSPACE_MB", "FLOAT_DTYPES", "MB"]


def resolve_backward_mode(mode: str, filter_eps: float | None) -> str:
    """The Triton backward that runs: "gemm" or "fused" ("auto": gemm, fused when filtering is asked for).

    ``LossOptions`` refuses "gemm" with ``filter_eps`` (on every backend alike).
    """
    if mode == "auto":
        return "fused" if filter_eps is not None else "gemm"
    return mode


def select_backend(options, device: torch.device) -> Backend:
    """The :class:`Backend` of one call, from its validated :class:`~dft_ops.LossOptions` and the inputs' device.

    ``options.backend``: "torch", "triton", or "auto" (Triton on CUDA tensors,
    PyTorch elsewhere). The Triton backend takes ``backward_mode``,
    ``workspace_mb``, ``filter_eps`` and ``precise``; the PyTorch backend has
    a single, exact way to run (they do not change what it computes). Raises
    ValueError naming the option before any work.
    """
    name = options.backend
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchBackend()
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
            f"interpreter); hidden is on {device}. Use backend='torch' or 'auto'."
        )
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend: 'triton' needs the triton package, which is not installed here (Triton ships "
                         "wheels for Linux only); pip install triton, or use backend='torch'")
    from ..kernels import TritonBackend  # imports triton: only when asked for

    return TritonBackend(resolve_backward_mode(options.backward_mode, options.filter_eps),
                         workspace_bytes=max(1, int(options.workspace_mb * MB)), filter_eps=options.filter_eps,
                         precise=options.precise)
