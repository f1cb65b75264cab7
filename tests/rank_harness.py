"""Multi-process tests on CPU: spawning the ranks (pytest side) and running cases in each rank (worker side).

A worker script calls :func:`serve` with its cases; a test calls :func:`run_ranks`
with the worker and the case names, and reads back rank 0's JSON results.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import traceback
from typing import Callable


def run_ranks(worker, out, args, *, world_size: int = 2, timeout: float = 600) -> dict:
    """Run ``python worker OUT ARGS...`` as ``world_size`` ranks (gloo on CPU); the JSON rank 0 wrote to ``out``.

    Environment as torchrun sets it (one thread per rank: the machine's cores are
    shared). Fails the test with each rank's log tail when no result was written.
    """
    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        log = open(out.with_name(f"rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(worker), str(out), *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
    tails = []
    for rank, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if not out.exists():
        pytest.fail(f"the distributed job {worker.name} wrote no results:\n" + "\n".join(tails))
    return json.loads(out.read_text())


def serve(out_path: str, names: list[str], cases: dict[str, Callable], judge: Callable) -> None:
    """Run the named cases in this rank (gloo, torchrun's environment); rank 0 writes ``{case: result}`` to ``out_path``.

    ``cases[name](rank, world)`` returns an outcome, which ``judge(case, *outcome)``
    turns into a JSON-able dict. A case with ``expect_error = (ExceptionType,
    regex)`` must raise a matching exception on every rank: its result is
    ``{"raised": message}``. Anything else raised is ``{"error": traceback}``, and
    an error on any rank is the case's result; the next case still runs.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # a rank that fails inside a collective must not leave the other waiting forever
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    results = {}
    for name in names:
        run = cases[name]
        expected, pattern = getattr(run, "expect_error", (None, None))
        try:
            outcome = run(rank, world)
            if expected is None:
                results[name] = judge(run, *outcome)
            else:
                results[name] = {"error": f"rank {rank}: expected {expected.__name__} matching {pattern!r}, "
                                          "nothing raised"}
        except Exception as exc:
            if expected is not None and isinstance(exc, expected) and re.search(pattern, str(exc)):
                results[name] = {"raised": f"{type(exc).__name__}: {exc}"}
            else:
                results[name] = {"error": f"rank {rank}: {traceback.format_exc()}"}
        dist.barrier()
    errors = [None] * world
    dist.all_gather_object(errors, {n: r["error"] for n, r in results.items() if "error" in r})
    if rank == 0:
        for other in errors:
            for name, message in other.items():
                results[name] = {"error": message}
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
