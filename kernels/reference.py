"""Launch inputs of ASFT's second head: a frozen reference model's logit tiles beside the model's.

Both passes rebuild the reference's (BLOCK_N x BLOCK_V) logit tile ``r`` at the
same token rows and vocabulary columns as the model's tile ``z``
(:func:`~dft_ops.kernels.tile.reference_tile`: its own hidden size, strides,
bias and soft-cap; the call's temperature). The forward folds it into a second
online log-sum-exp and the two gap sums; the backward into the ``e q`` and
``f s (log s - log q)`` terms of G (:mod:`dft_ops.backend_contract`). Every input is
constexpr-gated: without a reference the kernels compile exactly as before.
This module turns a :class:`~dft_ops.backend_contract.ReferenceHead` into
those inputs (placeholders without one).
"""

from __future__ import annotations

import torch

# absolute: see lse_forward.py
from dft_ops.backend_contract import ReferenceHead, logit_scales, product_dtype
from .launch import family, torch_to_tl


def reference_compute_dtype(reference: ReferenceHead, compute_dtype) -> torch.dtype:
    """The dtype of the reference's products: its own pair's rule (product_dtype), or the requested one."""
    return product_dtype(reference.hidden.dtype, reference.weight.dtype, compute_dtype)


def reference_inputs(reference: ReferenceHead | None, compute: torch.dtype, unused: torch.Tensor,
                     compute_dtype=None) -> tuple[dict, dict]:
    """(arguments, constexprs) of :func:`reference_tile`'s inputs for a launch; placeholders without one.

    ``compute``: the model's product dtype, which the placeholders take (never read).
    ``REF_EVEN_D`` depends on the tile configuration: :func:`reference_even_d`.
    The reference's bias is made contiguous (kernels read it with unit stride).
    """
    if reference is None:
        args = dict(rh_ptr=unused, rw_ptr=unused, rb_ptr=unused, ref_softcap=1.0, ref_inv_softcap=1.0, D_ref=1,
                    stride_rhn=0, stride_rhd=0, stride_rwv=0, stride_rwd=0)
        return args, dict(REF_HAS_BIAS=False, REF_HAS_SOFTCAP=False, REF_COMPUTE_DTYPE=torch_to_tl(compute))
    hidden, weight, bias, softcap = reference
    bias = bias.contiguous() if bias is not None else None
    inv_softcap, _ = logit_scales(softcap, None)
    args = dict(
        rh_ptr=hidden, rw_ptr=weight, rb_ptr=bias if bias is not None else unused,
        ref_softcap=float(softcap) if softcap is not None else 1.0, ref_inv_softcap=inv_softcap,
        D_ref=hidden.shape[1], stride_rhn=hidden.stride(0), stride_rhd=hidden.stride(1),
        stride_rwv=weight.stride(0), stride_rwd=weight.stride(1),
    )
    constexprs = dict(REF_HAS_BIAS=bias is not None, REF_HAS_SOFTCAP=softcap is not None,
                      REF_COMPUTE_DTYPE=torch_to_tl(reference_compute_dtype(reference, compute_dtype)))
    return args, constexprs


def reference_even_d(reference: ReferenceHead | None, block_d: int) -> bool:
    """REF_EVEN_D for a tile configuration: the reference's hidden size is a multiple of BLOCK_D."""
    return reference is None or reference.hidden.shape[1] % block_d == 0


def tile_family(compute: torch.dtype, reference: ReferenceHead | None, compute_dtype=None) -> str:
    """The list of tile configurations a launch takes (the kernels' ``CONFIGS`` keys).

    "fp32" when either head's products run in fp32 (tf32x3 holds three times the
    operand registers), else "16bit"; with a reference head "+ref": its tile is
    live through the model's product, and the configurations of those lists
    leave the registers for it (tests/test_compile.py).
    """
    if reference is None:
        return family(compute)
    return family(torch.float32 if reference_compute_dtype(reference, compute_dtype) == torch.float32
                  else compute) + "+ref"


def reference_key(reference: ReferenceHead | None, compute_dtype=None) -> tuple:
    """What of the reference a tuning key depends on."""
    if reference is None:
        return (None,)
    return (reference.hidden.shape[1], reference.hidden.dtype, reference.weight.dtype,
            reference_compute_dtype(reference, compute_dtype), reference.bias is not None,
            reference.softcap is not None)

