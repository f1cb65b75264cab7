"""Tolerances that differ between the CPU interpreter and GPU hardware (tests/gpu_smoke.py: the error model).

The interpreter computes in NumPy (float32 elementwise math as libm does it, dots in float32 or
float64, one fixed order of every sum); a GPU runs ``ex2.approx`` exponentials, ``div.full``
divisions, tf32x3 products for fp32 operands and fp32 atomics in no fixed order. Tests that are
exact or bitwise on the interpreter take their bound from here.
"""

import torch

ON_GPU = torch.cuda.is_available()

# tanh (kernels/tile.py) against float64, in units of 2^-24 relative: 3.2 ulp measured on the
# interpreter; on a GPU ex2.approx (~2 ulp, plus |x| 2^-24 from rounding x * log2(e)) and div.full
# (2 ulp) add up to ~8: 16 allows for both without letting a wrong branch (errors of 1e-3+) through
TANH_ULP = 16 if ON_GPU else 4
# a soft-capped fp32 loss against float64: the interpreter's fp32 dots keep it within 5e-7; tf32x3
# products (~2^-21 per term) move logits by ~1e-6 of their scale
SOFTCAP_LOSS_REL = 4e-6 if ON_GPU else 5e-7


def assert_same_sums(a, b, rel: float = 1e-6):
    """Two computations that differ only in the order of their fp32 sums: bitwise equal on the
    interpreter (one order), within ``rel`` norm-wise on a GPU (fused atomics in any order)."""
    if not ON_GPU:
        assert torch.equal(a, b)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = (a.double() - b.double()).norm().item()
    assert diff <= rel * max(b.double().norm().item(), 1e-30), diff
