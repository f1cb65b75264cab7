"""The Triton backend as one object: the forward kernel and a backward mode.

``TritonBackend("gemm")`` (the default on CUDA) reduces per vocabulary split
with cuBLAS (:mod:`~dft_ops.kernels.gemm_backward`); ``TritonBackend("fused")``
runs the single atomic kernel (:mod:`~dft_ops.kernels.grad_backward`, no
workspace, the memory-first mode, and the one gradient filtering applies to).
docs/backward.md says which to use when.
"""

from __future__ import annotations

import numbers

# absolute: see grad_backward.py
from dft_ops.backend_contract import DEFAULT_WORKSPACE_MB, MB, Grads, resolve_backward_mode
from .gemm_backward import gemm_backward
from .grad_backward import grad_backward
from .lse_forward import lse_forward


class TritonBackend:
    """The :class:`~dft_ops.backend_contract.Backend` of the Triton kernels.

    Args:
        backward_mode: "gemm", "fused", or "auto" ("gemm"; "fused" for a call
            that asks for gradient filtering).
        workspace_bytes: bound of the "gemm" backward's workspace.
        vocab_chunk: vocabulary rows per launch of the "fused" backward (None: about 32 MB of fp32 rows).
        splits: vocabulary slices of the forward (None: from the tiles and the GPU's SM count).
    """

    def __init__(self, backward_mode: str = "auto", *, workspace_bytes: int = DEFAULT_WORKSPACE_MB * MB,
                 vocab_chunk: int | None = None, splits: int | None = None):
        resolve_backward_mode(backward_mode, None)
        for name, value, optional in (("workspace_bytes", workspace_bytes, False), ("vocab_chunk", vocab_chunk, True),
                                      ("splits", splits, True)):
            if not (optional and value is None) and (
                    isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name}: expected a positive int{' or None' if optional else ''}, got {value!r}")
        self.backward_mode = backward_mode
        self.workspace_bytes, self.vocab_chunk, self.splits = int(workspace_bytes), vocab_chunk, splits

    @property
    def name(self) -> str:
        return f"triton-{self.backward_mode}"

    def __repr__(self) -> str:
        return (f"TritonBackend({self.backward_mode!r}, workspace_bytes={self.workspace_bytes}, "
                f"vocab_chunk={self.vocab_chunk}, splits={self.splits})")

    def lse_forward(self, hidden, weight, bias, targets, rows=None, **options):
        """:func:`dft_ops.kernels.lse_forward` (keywords of the contract only)."""
        return lse_forward(hidden, weight, bias, targets, rows, splits=self.splits, **options)

    def grad_backward(self, hidden, weight, bias, targets, rows, lse, coef, *, filter_eps=None, **options) -> Grads:
        """The backward of this mode: :func:`~dft_ops.kernels.gemm_backward.gemm_backward` or the fused
        :func:`~dft_ops.kernels.grad_backward.grad_backward` (keywords of the contract only)."""
        if resolve_backward_mode(self.backward_mode, filter_eps) == "fused":
            return grad_backward(hidden, weight, bias, targets, rows, lse, coef, filter_eps=filter_eps,
                                 vocab_chunk=self.vocab_chunk, **options)
        return gemm_backward(hidden, weight, bias, targets, rows, lse, coef, workspace_bytes=self.workspace_bytes,
                             **options)


