"""Launch inputs of the second head (ASFT's reference model, a teacher): its logit tiles beside the model's.

Both passes rebuild the second head's (BLOCK_N x BLOCK_V) logit tile ``r`` at
the same token rows and vocabulary columns as the model's tile ``z``
(:func:`~dft_ops.kernels.tile.second_tile`: its own hidden size, strides,
bias and soft-cap; the call's temperature). The forward folds it into a second
online log-sum-exp and the two gap sums; the backward into the ``e q`` and
``f s (log s - log q)`` terms of G (the contract, :mod:`dft_ops.backends.protocol`).
Every input is constexpr-gated: without a second head the kernels compile
exactly as before. This module turns a
:class:`~dft_ops.backends.protocol.SecondHead` into those inputs
(placeholders without one).
"""

from __future__ import annotations

import torch

# absolute: see lse_forward.py
from dft_ops.backends.protocol import Head, SecondHead
from .launch import family, torch_to_tl


def second_head_inputs(second: SecondHead | None, compute: torch.dtype, unused: torch.Tensor) -> tuple[dict, dict]:
    """(arguments, constexprs) of :func:`second_tile`'s inputs for a launch; placeholders without one.

    ``compute``: the model's product dtype, which the placeholders take (never read).
    ``EVEN_D2`` depends on the tile configuration: :func:`second_even_d`.
    The second head's bias is made contiguous (kernels read it with unit stride).
    """
    if second is None:
        args = dict(h2_ptr=unused, w2_ptr=unused, b2_ptr=unused, softcap2=1.0, inv_softcap2=1.0, D2=1,
                    stride_h2n=0, stride_h2d=0, stride_w2v=0, stride_w2d=0)
        return args, dict(HAS_BIAS2=False, HAS_SOFTCAP2=False, COMPUTE_DTYPE2=torch_to_tl(compute))
    hidden, weight, bias, softcap = second.hidden, second.weight, second.bias, second.softcap
    bias = bias.contiguous() if bias is not None else None
    args = dict(
        h2_ptr=hidden, w2_ptr=weight, b2_ptr=bias if bias is not None else unused,
        softcap2=float(softcap) if softcap is not None else 1.0,
        inv_softcap2=1.0 / float(softcap) if softcap is not None else 1.0,
        D2=hidden.shape[1], stride_h2n=hidden.stride(0), stride_h2d=hidden.stride(1),
        stride_w2v=weight.stride(0), stride_w2d=weight.stride(1),
    )
    constexprs = dict(HAS_BIAS2=bias is not None, HAS_SOFTCAP2=softcap is not None,
                      COMPUTE_DTYPE2=torch_to_tl(second.compute_dtype))
    return args, constexprs


def second_even_d(second: SecondHead | None, block_d: int) -> bool:
    """EVEN_D2 for a tile configuration: the second head's hidden size is a multiple of BLOCK_D."""
    return second is None or second.hidden.shape[1] % block_d == 0


def tile_family(head: Head, two_heads: bool) -> str:
    """The list of tile configurations a launch takes (the kernels' ``CONFIGS`` keys).

    "fp32" when either head's products run in fp32 (tf32x3 holds three times the
    operand registers), else "16bit"; with the second head read ("+second"): its
    tile is live through the model's product, and the configurations of those
    lists leave the registers for it (tests/test_compile.py).
    """
    if not two_heads:
        return family(head.compute_dtype)
    return family(torch.float32 if head.second.compute_dtype == torch.float32 else head.compute_dtype) + "+second"


def second_head_key(second: SecondHead | None) -> tuple:
    """What of the second head a tuning key depends on."""
    if second is None:
        return (None,)
    return (second.hidden.shape[1], second.hidden.dtype, second.weight.dtype, second.compute_dtype,
            second.bias is not None, second.softcap is not None)
