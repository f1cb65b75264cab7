"""Elementwise precision of d(hidden) with 16-bit G, default vs precise mode: the table in docs/math.md.

Run as ``python tests/precision_table.py`` (CPU, Triton interpreter, ~1 minute). Uses the
same inputs and error measure as tests/test_backends.py's precise-mode test.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from dft_ops import kernels, torch_backend  # noqa: E402
from test_backends import elementwise_errors, peaked_case  # noqa: E402


def errors(d_hidden, want):
    e = elementwise_errors(d_hidden, want)
    norm = ((d_hidden.double() - want).norm() / want.norm()).item()
    return e.median().item(), e.quantile(0.99).item(), e.max().item(), norm


def main():
    torch.manual_seed(0)
    n, d, v = 64, 64, 500
    print("| peak | median p | G | median | 99th pct | max | norm-wise |")
    print("|---|---|---|---|---|---|---|")
    for peak in (0.0, 1.0, 1.5, 2.0, 3.0):
        hidden, weight, targets, lse, coef, want = peaked_case(n, d, v, peak, "cpu")
        p = (kernels.lse_forward(hidden, weight, None, targets).target_logit - lse).exp().median().item()
        rows = {
            "bf16 (default)": kernels.grad_backward(hidden, weight, None, targets, None, lse, coef,
                                                    need_weight=False)[0],
            "bf16 hi + lo (precise)": kernels.grad_backward(hidden, weight, None, targets, None, lse, coef,
                                                            need_weight=False, precise=True)[0],
            # the torch backend's own lse: G from logits and lse computed the same way
            "fp32 (torch backend)": torch_backend.grad_backward(
                hidden, weight, None, targets, None, torch_backend.lse_forward(hidden, weight, None, targets).lse,
                coef, need_weight=False)[0],
        }
        for name, d_hidden in rows.items():
            med, p99, mx, norm = errors(d_hidden, want)
            print(f"| {peak} | {p:.3f} | {name} | {med:.1e} | {p99:.1e} | {mx:.1e} | {norm:.1e} |")


if __name__ == "__main__":
    main()
