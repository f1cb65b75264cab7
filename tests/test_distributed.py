"""A patched model under distributed engines: two processes (gloo on CPU), compared with one process.

All cases run in one spawned job of two ranks (tests/distributed_worker.py), sharing
the process group: every FSDP2 layout (head in the root's group, in its own, or with
the embedding it is tied to; resharding after forward or not; patched before or
after fully_shard), DDP (patching the wrapper or the model), DeepSpeed ZeRO-1/2/3,
accelerate and transformers.Trainer. Each compares the loss and every parameter's
gathered gradient with the patched model run in one process on the whole batch
(relative error <= 1e-5, fp32). A negative control reproduces the old failure (the
head gathered with .full_tensor() outside its forward) and must be seen as wrong;
a vocabulary-parallel head must be refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD_SIZE = 2
TOLERANCE = 1e-5
NEEDS = {"zero": "deepspeed", "accelerate": "accelerate"}  # case-name prefix -> the package it needs

FSDP2 = ["fsdp2-root", "fsdp2-root-patch-after", "fsdp2-root-no-reshard", "fsdp2-own-group",
         "fsdp2-own-group-patch-after", "fsdp2-own-group-no-reshard", "fsdp2-own-group-no-reshard-patch-after",
         "fsdp2-tied-root", "fsdp2-tied-with-embedding", "fsdp2-tied-with-embedding-patch-after"]
EXACT = FSDP2 + ["ddp-patch-wrapper", "ddp-patch-before", "zero1", "zero2", "zero3", "zero3-patch-engine",
                 "zero3-tied", "accelerate-ddp", "trainer-ddp"]
CONTROL = "control-fsdp2-full-tensor-outside-the-head"
REFUSED = "tensor-parallel-head-refused"


def _missing_package(case: str) -> str | None:
    for prefix, package in NEEDS.items():
        if case.startswith(prefix) and importlib.util.find_spec(package) is None:
            return package
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every available case once in a two-rank job; {case: result} as the worker reports it."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    cases = [c for c in EXACT + [CONTROL, REFUSED] if _missing_package(c) is None]
    out = tmp_path_factory.mktemp("distributed") / "results.json"
    port = _free_port()
    procs, logs = [], []
    for rank in range(WORLD_SIZE):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                   LOCAL_WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        log = open(out.with_name(f"rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), *cases], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
    tails = []
    for rank, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if not out.exists():
        pytest.fail("the distributed job wrote no results:\n" + "\n".join(tails))
    return json.loads(out.read_text())


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
    assert result["n_grads"] >= 26  # every parameter of the tiny Qwen2 (26 with a tied head)
    assert result["loss_err"] <= TOLERANCE, result
    assert result["grad_err"] <= TOLERANCE, result


@pytest.mark.slow
def test_the_comparison_sees_a_wrongly_reduced_head(results):
    """The old way (head.weight.full_tensor() after the forward) gets the head gradient wrong: the harness can fail."""
    result = _result(results, CONTROL)
    assert result["loss_err"] <= TOLERANCE
    assert result["worst"] == "lm_head.weight" and result["grad_err"] > 0.5, result


@pytest.mark.slow
def test_a_vocabulary_parallel_head_is_refused(results):
    assert "tensor/vocabulary parallel" in _result(results, REFUSED)["raised"]
