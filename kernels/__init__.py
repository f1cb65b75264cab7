"""Triton kernels of dft-ops (imported as ``dft_ops.kernels``).

Passes over (token tile x vocabulary tile) blocks of the logits, none of which
writes the tokens x vocabulary logits to global memory:

- :func:`lse_forward` - per-token log-sum-exp, label logit, and optionally entropy,
  max logit, argmax and the label-smoothing sum (``ForwardStats``).
- :func:`gemm_backward` - the default backward: per vocabulary split, the logit
  gradient G of (tokens x split) into a bounded workspace (kernels/logit_grad.py),
  then cuBLAS products for d(hidden), d(weight), d(bias).
- :func:`grad_backward` - the fused backward: d(hidden), d(weight), d(bias) from
  recomputed tiles with fp32 atomics, no workspace (the memory-first mode).

:class:`TritonBackend` joins them as one :class:`dft_ops.backend_contract.Backend`.
No autograd, nn.Module or transformers here: see ``dft_ops`` for those.
"""

from dft_ops.backend_contract import interpreting

from .backend import TritonBackend
from .gemm_backward import gemm_backward, plan_splits
from .grad_backward import grad_backward
from .lse_forward import lse_forward
from .row_pass import RowStats, logit_grad_in_place, row_stats

__all__ = ["TritonBackend", "lse_forward", "gemm_backward", "grad_backward", "plan_splits", "interpreting"]
