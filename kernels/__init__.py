"""Triton kernels of dft-ops (imported as ``dft_ops.kernels``).

Two passes over (token tile x vocabulary tile) blocks of the logits, neither of
which writes the tokens x vocabulary logits to global memory:

- :func:`lse_forward` - per-token log-sum-exp, label logit, and optionally entropy,
  max logit, argmax and the label-smoothing sum (``ForwardStats``).
- :func:`grad_backward` - d(hidden), d(weight), d(bias) from recomputed tiles, given
  per-token coefficients of softmax, one-hot and class weights (``GradCoefficients``).

The contract both backends share is :mod:`dft_ops.backend_contract`.

No autograd, nn.Module or transformers here: see ``dft_ops`` for those.
"""

from .grad_backward import grad_backward
from .launch import interpreting
from .lse_forward import lse_forward

__all__ = ["lse_forward", "grad_backward", "interpreting"]
