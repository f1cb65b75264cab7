"""The float64 reference of the benchmark's losses: materialized logits, in token chunks, on the inputs' device.

Every provider is checked against this before it is timed (``bench.run``), so a wrong dft-ops is
caught as such instead of making every peer read as a mismatch. The reference is written out here
from the definitions (no code of dft-ops or of a peer is used):

- ``ce``:  mean over non-ignored tokens of ``-log p(y)``;
- ``dft``: mean over non-ignored tokens of ``-sg(p(y)) log p(y)``;

with ``log p = z - logsumexp(z)``, ``z = h W^T`` computed in float64 from the given inputs (bf16
inputs are exact in float64). The logit gradient of a token is ``w_t (softmax - onehot(y)) / n``
with ``w_t = 1`` (ce) or ``p(y)`` (dft), ``n`` the number of non-ignored tokens; then
``d(hidden) = G W`` and ``d(weight) = G^T H``. Chunks of tokens keep the float64 logits within
``chunk_bytes`` (about three chunk-sized buffers live at once), so the Llama-3-8B head at 16k
tokens needs ~4 GB beyond the float64 copy of the head, and Qwen2.5-7B at 128k fits on one GPU.

Cost: 6NDV float64 FLOPs (three products), about 1 s at the Llama-3-8B head with 16k tokens on an
H100-class GPU (~50 TFLOP/s of float64 matrix work, an estimate, not a measurement); on a CPU
only the small shapes of the dry runs. The gradients are returned in float32 (relative error
~1e-7 against the float64 values: far under every tolerance checked with them), which halves what
the run keeps on the device while the providers of a case are measured.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .measure import Result

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 4 << 30


def float64_loss_and_grads(hidden: Tensor, weight: Tensor, labels: Tensor, objective: str, *,
                           chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Result:
    """Loss (0-d float64) and float32 gradients of the mean ``objective`` loss, from float64 logits."""
    if objective not in ("ce", "dft"):
        raise ValueError(f"objective: the float64 reference knows 'ce' and 'dft', got {objective!r}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels: expected shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    N, D = hidden.shape
    V = weight.shape[0]
    f64 = torch.float64
    w = weight.detach().to(f64)
    valid = labels != IGNORE_INDEX
    n = valid.sum().clamp(min=1).to(f64)
    grad_hidden = torch.empty(N, D, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(V, D, dtype=f64, device=hidden.device)
    loss = torch.zeros((), dtype=f64, device=hidden.device)
    chunk = max(1, int(chunk_bytes // (3 * 8 * V)))
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        h = hidden[start:stop].detach().to(f64)
        keep = valid[start:stop]
        y = torch.where(keep, labels[start:stop], 0)
        z = h @ w.T  # (C, V)
        lse = torch.logsumexp(z, dim=1)
        logp = z.gather(1, y[:, None]).squeeze(1) - lse
        weight_t = torch.ones_like(logp) if objective == "ce" else logp.exp()
        weight_t = torch.where(keep, weight_t, 0.0)
        loss += (-weight_t * logp).sum()
        # z becomes the logit gradient in place: (softmax - onehot) * w_t / n
        z.sub_(lse[:, None]).exp_()
        z.scatter_add_(1, y[:, None], torch.full_like(logp[:, None], -1.0))
        z.mul_((weight_t / n)[:, None])
        grad_hidden[start:stop] = z @ w
        grad_weight.addmm_(z.T, h)
        del z, h
    return Result(loss / n, grad_hidden, grad_weight.float())
