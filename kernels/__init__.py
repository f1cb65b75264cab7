"""Triton kernels of dft-ops (imported as ``dft_ops.kernels``).

Passes over (token tile x vocabulary tile) blocks of the logits, none of which
writes the tokens x vocabulary logits to global memory:

- :func:`lse_forward` - per-token log-sum-exp, label logit, and optionally entropy,
  max logit, argmax and the label-smoothing sum (``ForwardStats``).
- :func:`gemm_backward` - the default backward: per vocabulary split, the logit
  gradient G of (tokens x split) into a bounded workspace (kernels/logit_grad.py),
  then cuBLAS products for d(hidden), d(weight), d(bias).
- :func:`fused_backward` - d(hidden), d(weight), d(bias) from recomputed tiles
  with fp32 atomics, no workspace (the memory-first mode).
- :func:`row_stats`, :func:`logit_grad_in_place` - the one-pass head's row passes over a chunk's
  fp32 workspace of full-vocabulary logits (:class:`TritonRowPasses`; the chunk loop and its
  cuBLAS products: ``dft_ops.backends.one_pass``).

:class:`TritonBackend` joins them as one :class:`dft_ops.backends.protocol.Backend`.
This package imports only the contract from dft_ops (``dft_ops.backends.protocol``
and its shared math ``dft_ops.backends.partials``); no autograd, nn.Module or
transformers here.
"""

from .backend import TritonBackend
from .fused_backward import fused_backward
from .gemm_backward import gemm_backward, plan_splits
from .lse_forward import lse_forward
from .row_pass import RowStats, TritonRowPasses, logit_grad_in_place, row_stats

__all__ = ["TritonBackend", "TritonRowPasses", "lse_forward", "gemm_backward", "fused_backward", "plan_splits",
           "row_stats", "logit_grad_in_place", "RowStats"]
