"""A patched model under distributed engines: two processes (gloo on CPU), compared with one process.

All cases run in one spawned job of two ranks (tests/distributed_worker.py), sharing
the process group: every FSDP2 layout (head in the root's group, in its own, or with
the embedding it is tied to; resharding after forward or not; patched before or
after fully_shard), DDP (patching the wrapper or the model), DeepSpeed ZeRO-1/2/3,
accelerate (DDP, and its FSDP plugin with fsdp_version=2), transformers.Trainer, and a tensor-parallel
(vocabulary-sharded) head: torch's ColwiseParallel and transformers' tp_plan="auto"; ASFT with a frozen reference
model (FSDP2, DDP, ZeRO-3) and with a LoRA model's adapters disabled (FSDP2). Each compares the loss and every parameter's
gathered gradient with the patched model run in one process on the whole batch
(relative error <= 1e-5, fp32). A negative control reproduces the old failure (the
head gathered with .full_tensor() outside its forward) and must be seen as wrong.
FSDP2 with a bf16 MixedPrecisionPolicy runs the model in bf16, so it is compared with the
unpatched model under the same engine (DFT from its logits) at bf16 tolerance.
The vocabulary-parallel functional API has its own job (tests/test_vocab_parallel.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rank_harness import run_ranks

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD_SIZE = 2
TOLERANCE = 1e-5
NEEDS = {"zero": "deepspeed", "asft-zero": "deepspeed", "asft-fsdp2-lora": "peft", "accelerate": "accelerate"}  # case-name prefix -> the package it needs

FSDP2 = ["fsdp2-root", "fsdp2-root-patch-after", "fsdp2-root-no-reshard", "fsdp2-own-group",
         "fsdp2-own-group-patch-after", "fsdp2-own-group-no-reshard", "fsdp2-own-group-no-reshard-patch-after",
         "fsdp2-tied-root", "fsdp2-tied-with-embedding", "fsdp2-tied-with-embedding-patch-after"]
EXACT = FSDP2 + ["ddp-patch-wrapper", "ddp-patch-before", "zero1", "zero2", "zero3", "zero3-patch-engine",
                 "zero3-tied", "accelerate-ddp", "accelerate-fsdp2", "trainer-ddp", "tp-colwise-head",
                 "tp-colwise-head-replicated-output", "tp-plan-auto",
                 # ASFT: the model under the engine, its frozen reference model plain on every rank
                 "asft-fsdp2-own-group", "asft-ddp-patch-wrapper", "asft-zero3",
                 # ASFT on a PEFT model whose reference is itself with the adapters disabled
                 "asft-fsdp2-lora-adapters-disabled"]
BF16 = ["fsdp2-bf16-own-group"]  # the model itself runs in bf16: compared with the unpatched model at bf16 tolerance
BF16_TOLERANCE = 3e-2
CONTROL = "control-fsdp2-full-tensor-outside-the-head"


def _missing_package(case: str) -> str | None:
    for prefix, package in NEEDS.items():
        if case.startswith(prefix) and importlib.util.find_spec(package) is None:
            return package
    return None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every available case once in a two-rank job; {case: result} as the worker reports it."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    cases = [c for c in EXACT + BF16 + [CONTROL] if _missing_package(c) is None]
    return run_ranks(WORKER, tmp_path_factory.mktemp("distributed") / "results.json", cases, world_size=WORLD_SIZE)


def _result(results, case):
    package = _missing_package(case)
    if package is not None:
        pytest.skip(f"{package} is not installed; `make test` installs it (deepspeed: DS_BUILD_OPS=0 pip install "
                    "--no-build-isolation deepspeed)")
    result = results[case]
    assert "error" not in result, result["error"]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("case", EXACT)
def test_exact_under_engine(results, case):
    result = _result(results, case)
    # every parameter of the tiny Qwen2 (26 with a tied head); the LoRA case trains its 8 adapter matrices only
    assert result["n_grads"] >= (8 if "lora" in case else 26)
    assert result["loss_err"] <= TOLERANCE, result
    assert result["grad_err"] <= TOLERANCE, result


@pytest.mark.slow
@pytest.mark.parametrize("case", BF16)
def test_bf16_engine_matches_the_unpatched_model(results, case):
    result = _result(results, case)
    assert result["n_grads"] >= 26
    assert result["loss_err"] <= BF16_TOLERANCE, result
    assert result["grad_err"] <= BF16_TOLERANCE, result


@pytest.mark.slow
def test_the_comparison_sees_a_wrongly_reduced_head(results):
    """The old way (head.weight.full_tensor() after the forward) gets the head gradient wrong: the harness can fail."""
    result = _result(results, CONTROL)
    assert result["loss_err"] <= TOLERANCE
    assert result["worst"] == "lm_head.weight" and result["grad_err"] > 0.5, result
