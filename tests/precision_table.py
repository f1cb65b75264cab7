"""Elementwise precision of d(hidden) with 16-bit G, default vs precise mode: the table in docs/math.md.

Run as ``python tests/precision_table.py`` (CPU, Triton interpreter, ~1 minute). Uses the
same inputs and error measure as tests/test_backends.py's precise-mode test.
``python tests/precision_table.py modes``: the norm-wise errors of every backward mode per input
dtype, the table in docs/backward.md.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from dft_ops import kernels  # noqa: E402
from dft_ops.backends import torch_backend  # noqa: E402
from helpers import Coef, backward, forward  # noqa: E402
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
        p = (forward(kernels.lse_forward, hidden, weight, None, targets).target_logit - lse).exp().median().item()
        rows = {
            "bf16 (default)": backward(kernels.fused_backward, hidden, weight, None, targets, None, lse, coef,
                                                    need_weight=False)[0],
            "bf16 hi + lo (precise)": backward(kernels.fused_backward, hidden, weight, None, targets, None, lse, coef,
                                                            need_weight=False, precise=True)[0],
            # the torch backend's own lse: G from logits and lse computed the same way
            "fp32 (torch backend)": backward(torch_backend.grad_backward,
                hidden, weight, None, targets, None, forward(torch_backend.lse_forward, hidden, weight, None, targets).lse,
                coef, need_weight=False)[0],
        }
        for name, d_hidden in rows.items():
            med, p99, mx, norm = errors(d_hidden, want)
            print(f"| {peak} | {p:.3f} | {name} | {med:.1e} | {p99:.1e} | {mx:.1e} | {norm:.1e} |")


if __name__ == "__main__" and sys.argv[1:] != ["modes"]:
    main()


def mode_table(n=128, d=64, v=1000, seed=0):
    """Norm-wise relative error of every backward against float64, per input dtype (docs/backward.md).

    Peaked inputs (label probabilities spread over (0, 1)), DFT coefficients a = b = p / n (a mean
    over n tokens); the gradients come back in the inputs' dtype, so 16-bit rows include that
    final rounding.
    """
    from test_backends import reference

    print("| inputs | backward | G stored as | d(hidden) | d(weight) |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(seed)
        weight = (torch.randn(v, d) / d**0.5).to(dtype)
        targets = torch.randint(0, v, (n,))
        hidden = (1.5 * weight[targets].float() * d**0.5 + torch.randn(n, d)).to(dtype)
        stats = forward(kernels.lse_forward, hidden, weight, None, targets)
        p = (stats.target_logit - stats.lse).exp()
        coef = Coef(p / n, p / n)
        _, want = reference(hidden, weight, None, targets, None, coef)
        g16 = "fp32" if dtype == torch.float32 else ("bf16" if dtype == torch.bfloat16 else "fp16")
        runs = {
            ("gemm", g16): lambda: backward(kernels.gemm_backward, hidden, weight, None, targets, None, stats.lse, coef),
            ("gemm, precise", f"{g16} hi + lo"): lambda: backward(kernels.gemm_backward,
                hidden, weight, None, targets, None, stats.lse, coef, precise=True),
            ("fused", g16): lambda: backward(kernels.fused_backward, hidden, weight, None, targets, None, stats.lse, coef),
            ("torch backend", "fp32"): lambda: backward(torch_backend.grad_backward,
                hidden, weight, None, targets, None, stats.lse, coef),
        }
        for (mode, stored), run in runs.items():
            if dtype == torch.float32 and "precise" in mode:
                continue  # nothing to split: the products run in fp32
            d_hidden, d_weight, _ = run()
            errs = [((g.double() - w).norm() / w.norm()).item() for g, w in zip((d_hidden, d_weight), want)]
            print(f"| {g16} | {mode} | {stored} | {errs[0]:.1e} | {errs[1]:.1e} |")


if __name__ == "__main__" and sys.argv[1:] == ["modes"]:
    mode_table()
