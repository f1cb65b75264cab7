"""Running a compile check's jobs: in parallel, with progress on stderr, and cached between runs.

A job's result is cached under a digest of everything that decides it: the kernel sources
(``kernels/``), the check script, the launch code the script imports (``dft_ops/backends/``) and the
Triton and torch versions. An unchanged tree rechecks in seconds; a changed kernel recompiles
everything (the digest covers the whole package: which launches a change affects is not worth guessing).
``DFT_OPS_COMPILE_CACHE`` names the folder (default ``~/.cache/dft-ops/compile-check``); ``=0`` turns
the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _digest(script: Path) -> str:
    import torch
    import triton

    h = hashlib.sha256(f"triton {triton.__version__} torch {torch.__version__}".encode())
    for path in sorted([script, *(ROOT / "kernels").rglob("*.py"), *(ROOT / "dft_ops" / "backends").rglob("*.py")]):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:24]


def _cache_file(script: Path) -> Path | None:
    where = os.environ.get("DFT_OPS_COMPILE_CACHE", str(Path.home() / ".cache" / "dft-ops" / "compile-check"))
    if where == "0":
        return None
    return Path(where) / f"{script.stem}-{_digest(script)}.jsonl"


def _key(job) -> str:
    return json.dumps(job, default=sorted)


def run(script: str, check, jobs: list, workers: int) -> int:
    """Print one JSON line per job's result (``check(job)``), cached ones first; progress on stderr."""
    script = Path(script).resolve()
    cache = _cache_file(script)
    known: dict[str, dict] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            entry = json.loads(line)
            known[entry["job"]] = entry["result"]
    todo = [job for job in jobs if _key(job) not in known]
    for job in jobs:
        if _key(job) in known:
            print(json.dumps(known[_key(job)]), flush=True)
    start, done = time.monotonic(), len(jobs) - len(todo)
    print(f"{script.stem}: {len(jobs)} variants, {done} from the cache ({cache or 'off'}), compiling {len(todo)} "
          f"on {workers} workers", file=sys.stderr, flush=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool, (open(cache, "a") if cache is not None else open(os.devnull, "w")) as out:
        for job, result in zip(todo, pool.map(check, todo)):
            print(json.dumps(result), flush=True)
            if "error" not in result:  # an error is rechecked next time (it may be the machine's)
                out.write(json.dumps({"job": _key(job), "result": result}) + "\n")
                out.flush()
            done += 1
            if done % 10 == 0 or done == len(jobs):
                print(f"{script.stem}: {done}/{len(jobs)} variants, {time.monotonic() - start:.0f} s",
                      file=sys.stderr, flush=True)
    return 0


def run_from_test(request, script: Path, timeout: float = 1500) -> list[dict]:
    """Run ``script`` in a subprocess without TRITON_INTERPRET; its progress lines reach the terminal while
    pytest captures everything else; the JSON results."""
    import subprocess
    import threading

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    capture = request.config.pluginmanager.getplugin("capturemanager")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)
    reader.start()
    errors: list[str] = []
    for line in proc.stderr:
        errors.append(line)
        if capture is not None and line.startswith(script.stem + ":"):  # progress, not tracebacks
            with capture.global_and_fixture_disabled():
                sys.stderr.write(f"\n  [{line.rstrip()}]")
                sys.stderr.flush()
    proc.wait()
    watchdog.cancel()
    reader.join()
    tail = "".join(errors)[-4000:]
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{tail}"
    rows = [json.loads(line) for line in stdout if line.startswith("{")]
    assert rows, tail
    return rows
