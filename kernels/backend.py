"""The Triton backend as one object: the forward kernel and a backward mode.

``TritonBackend("gemm")`` (the default on CUDA) reduces per vocabulary split
with cuBLAS (:mod:`~dft_ops.kernels.gemm_backward`); ``TritonBackend("fused")``
runs the single atomic kernel (:mod:`~dft_ops.kernels.fused_backward`, no
workspace, the memory-first mode, and the one gradient filtering applies to).
docs/backward.md says which to use when.
"""

from __future__ import annotations

# absolute: see fused_backward.py
from dft_ops.backends.protocol import DEFAULT_WORKSPACE_MB, MB, Grads
from .fused_backward import fused_backward
from .gemm_backward import gemm_backward
from .lse_forward import lse_forward


class TritonBackend:
    """The :class:`~dft_ops.backends.protocol.Backend` of the Triton kernels.

    Args:
        backward_mode: "gemm" or "fused" (``dft_ops.backends.resolve_backward_mode``
            turns the option's "auto" into one of them).
        workspace_bytes: bound of the "gemm" backward's workspace.
        filter_eps: gradient filtering of the "fused" backward, or None (exact).
        precise: 16-bit G as a high and a low part in the backward's products.
        vocab_chunk: vocabulary rows per launch of the "fused" backward (None: about 32 MB of fp32 rows).
        splits: vocabulary slices of the forward (None: from the tiles and the GPU's SM count).

    The settings arrive validated (``LossOptions``); the constructor asserts them.
    """

    def __init__(self, backward_mode: str = "gemm", *, workspace_bytes: int = DEFAULT_WORKSPACE_MB * MB,
                 filter_eps: float | None = None, precise: bool = False, vocab_chunk: int | None = None,
                 splits: int | None = None):
        assert backward_mode in ("gemm", "fused"), backward_mode
        assert filter_eps is None or backward_mode == "fused", "gradient filtering skips tiles of the fused kernel"
        assert workspace_bytes > 0 and (vocab_chunk is None or vocab_chunk > 0) and (splits is None or splits > 0)
        self.backward_mode, self.filter_eps, self.precise = backward_mode, filter_eps, precise
        self.workspace_bytes, self.vocab_chunk, self.splits = int(workspace_bytes), vocab_chunk, splits

    @property
    def name(self) -> str:
        return f"triton-{self.backward_mode}"

    def __repr__(self) -> str:
        return (f"TritonBackend({self.backward_mode!r}, workspace_bytes={self.workspace_bytes}, "
                f"filter_eps={self.filter_eps}, precise={self.precise}, vocab_chunk={self.vocab_chunk}, "
                f"splits={self.splits})")

    def lse_forward(self, hidden, head, tokens, *, with_stats=False, smoothing=False):
        """:func:`dft_ops.kernels.lse_forward`."""
        return lse_forward(hidden, head, tokens, with_stats=with_stats, smoothing=smoothing, splits=self.splits)

    def grad_backward(self, hidden, head, tokens, terms, needs) -> Grads:
        """The backward of this mode: :func:`~dft_ops.kernels.gemm_backward.gemm_backward` or
        :func:`~dft_ops.kernels.fused_backward.fused_backward`."""
        if self.backward_mode == "fused":
            return fused_backward(hidden, head, tokens, terms, needs, filter_eps=self.filter_eps,
                                  precise=self.precise, vocab_chunk=self.vocab_chunk)
        return gemm_backward(hidden, head, tokens, terms, needs, precise=self.precise,
                             workspace_bytes=self.workspace_bytes)
