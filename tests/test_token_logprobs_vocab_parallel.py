"""dft_ops.token_logprobs over a vocabulary split across two ranks (gloo on CPU, tests/token_logprobs_worker.py).

Per-token log-probs, entropies and every gradient (upstream gradients of both outputs at once) equal the
whole vocabulary's in one process: the explicit option on both backends (Triton's two backward modes on
the interpreter), with a temperature per token, soft-cap, bias, shift and ignored tokens; every token ignored
(zeros and zero gradients, PyTorch and the fused Triton backward); bf16; an empty
slice; a Shard(0) DTensor head; verl's drop-in with ``dist_process_group`` (d(hidden) left as each rank's
share, summed by the caller). Temperatures that differ between the ranks, or are bad on one, are refused
on every rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rank_harness import run_ranks

WORKER = Path(__file__).with_name("token_logprobs_worker.py")
EXACT = ["torch", "triton-gemm", "triton-fused", "torch-bf16", "torch-uneven-empty-slice", "torch-all-ignored",
         "triton-fused-all-ignored", "dtensor-shard0",
         "verl-process-group", "verl-process-group-mean"]
REFUSED = ["refused-temperature-differs", "refused-bad-temperature-on-one-rank"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    return run_ranks(WORKER, tmp_path_factory.mktemp("token_logprobs") / "results.json", EXACT + REFUSED)


@pytest.mark.slow
@pytest.mark.parametrize("case", EXACT)
def test_equals_the_whole_vocabulary(results, case):
    result = results[case]
    assert "error" not in result, result["error"]
    errors = result["errors"]
    assert {"logprob", "entropy", "hidden", "weight"} <= errors.keys(), errors
    tol = 1e-2 if "bf16" in case else 1e-5
    for name, err in errors.items():
        assert err <= tol, f"{name}: {err:.2e} > {tol} ({errors})"


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSED)
def test_refused_on_every_rank(results, case):
    result = results[case]
    assert "error" not in result, result["error"]
    assert "raised" in result, result
