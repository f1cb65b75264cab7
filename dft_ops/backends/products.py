"""Matrix products with fp32 accumulation, whatever the torch version: cuBLAS on CUDA, BLAS elsewhere.

Shared by the Triton "gemm" backward (``dft_ops.kernels.gemm_backward``) and the one-pass head
(:mod:`dft_ops.backends.one_pass`). Three operations, on 2-D operands of one dtype (fp32, bf16 or fp16):

- :func:`add_product`: ``acc += a @ b`` into an fp32 accumulator. 16-bit
  operands on CUDA use ``torch.addmm(..., out_dtype=torch.float32)`` in place
  where the installed torch has it, else ``torch.mm(..., out_dtype=...)`` into a
  temporary and an add, else fp32 copies of the operands (torch < 2.8). Which one
  works is found once per device by a small exact probe (one synchronisation
  per process), not guessed from version numbers: torch builds differ in which
  input dtypes the ``out_dtype`` overloads accept.
- :func:`write_product`: ``out = a @ b`` in the operands' dtype, accumulated in
  fp32 and rounded once (cuBLAS does exactly that for 16-bit GEMMs).
- :func:`fp32_product`: ``out = a @ b`` into an fp32 tensor (the one-pass head's logits and d(hidden)).

Off CUDA (the tests on CPU) both run as fp32 matmuls of the operands upcast,
which is what cuBLAS computes (products of 16-bit values are exact in fp32);
the ``out_dtype`` overloads are CUDA-only.

fp32 operands run a plain fp32 GEMM: on CUDA it follows PyTorch's global
``torch.backends.cuda.matmul.allow_tf32`` (off by default: full fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor

_method: dict[tuple[str, int | None], str] = {}


def add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32, (m, n)) += a (m, k) @ b (k, n), accumulated in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    method = accumulate_method(acc.device)
    if method == "addmm_out_dtype":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif method == "mm_out_dtype":
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


def fp32_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out (fp32, (m, n), any row stride) = a (m, k) @ b (k, n), accumulated in fp32."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
        return
    method = accumulate_method(out.device)
    if method == "addmm_out_dtype":
        torch.addmm(out, a, b, beta=0, out_dtype=torch.float32, out=out)
    elif method == "mm_out_dtype":
        out.copy_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        torch.mm(a.float(), b.float(), out=out)


def write_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out (a's dtype, (m, n)) = a @ b, accumulated in fp32 and rounded once."""
    if out.device.type == "cuda" or a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a.float() @ b.float())


def accumulate_method(device: torch.device) -> str:
    """How :func:`add_product` adds a 16-bit product into fp32 on ``device`` (probed once per device)."""
    key = (device.type, device.index)
    if key not in _method:
        _method[key] = _probe(device) if device.type == "cuda" else "upcast"
    return _method[key]


def _probe(device: torch.device) -> str:
    """The first method whose result is exact on small integers (any error or mismatch: the next one)."""
    a = torch.randint(-4, 5, (48, 40), device=device).to(torch.bfloat16)
    b = torch.randint(-4, 5, (40, 36), device=device).to(torch.bfloat16)
    acc = torch.randint(-64, 65, (48, 36), device=device).float()
    want = acc + a.float() @ b.float()
    attempts = {
        "addmm_out_dtype": lambda out: torch.addmm(out, a, b, out_dtype=torch.float32, out=out),
        "mm_out_dtype": lambda out: out.add_(torch.mm(a, b, out_dtype=torch.float32)),
    }
    for name, attempt in attempts.items():
        try:
            out = acc.clone()
            attempt(out)
            if torch.equal(out, want):
                return name
        except (TypeError, RuntimeError, NotImplementedError):
            continue
    return "upcast"
