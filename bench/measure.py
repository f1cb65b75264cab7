"""Timers, memory meters, the GEMM yardstick and the correctness check.

GPU: times from CUDA events (``triton.testing.do_bench``: L2 flushed before
every run, median of the runs), memory as ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` minus what was allocated before the step.
CPU: wall-clock and process CPU time per run, memory as the peak resident set
size (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident
size before the step - CPU numbers, not comparable with the GPU's.

A step is ``step(state)``; ``setup()`` runs before each timed step, outside
the timed region (the backward mode times ``loss.backward()`` on a fresh
forward each time).
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

Step = Callable[[Any], Any]
Setup = Callable[[], Any]


@dataclass
class Timing:
    ms: list[float]  # wall-clock (device events on GPU) per run
    cpu_ms: list[float] = field(default_factory=list)  # process CPU time per run (CPU only)

    def summary(self) -> dict:
        out = {"ms_median": statistics.median(self.ms), "ms_min": min(self.ms), "ms_max": max(self.ms),
               "n_runs": len(self.ms)}
        if self.cpu_ms:
            out["cpu_ms_median"] = statistics.median(self.cpu_ms)
        return out


@dataclass
class Memory:
    peak_bytes: int  # peak during the step minus allocated (GPU) / resident (CPU) before it
    total_bytes: int | None  # absolute peak (GPU: everything allocated, inputs included)


def brief(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters) for a result record."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, (RuntimeError, MemoryError)) and (
        "out of memory" in str(error).lower() or isinstance(error, MemoryError))


class GpuMeter:
    kind = "cuda"
    memory_metric = "torch.cuda.max_memory_allocated during the step minus memory_allocated before it"
    time_metric = "CUDA events, L2 flushed before each run (triton.testing.do_bench)"

    def __init__(self, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self._flush = None

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def sync(self):
        torch.cuda.synchronize(self.device)

    def cleanup(self):
        gc.collect()
        torch.cuda.empty_cache()

    def time(self, step: Step, setup: Setup | None = None, grad_to_none=()) -> Timing:
        from triton.testing import do_bench

        if setup is None:
            try:
                return Timing(list(do_bench(lambda: step(None), warmup=self.warmup_ms, rep=self.rep_ms,
                                            grad_to_none=list(grad_to_none), return_mode="all")))
            except AssertionError:  # a Triton without return_mode="all": the same protocol below
                def setup():
                    for t in grad_to_none:
                        t.grad = None
        return Timing(self._time_after_setup(step, setup))

    def _time_after_setup(self, step: Step, setup: Setup) -> list[float]:
        """do_bench's protocol with ``setup()`` outside each timed region (events bracket the step only):
        a runtime estimate, warm-up runs for ``warmup_ms``, then runs for ``rep_ms``, L2 flushed before each."""
        if self._flush is None:
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)

        def timed(n):
            events = []
            for _ in range(n):
                state = setup()
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(state)
                end.record()
                events.append((start, end))
                del state
            self.sync()
            return [s.elapsed_time(e) for s, e in events]

        estimate = statistics.mean(timed(3))
        timed(max(1, int(self.warmup_ms / estimate)))
        return timed(max(1, int(self.rep_ms / estimate)))

    def memory(self, step: Step, setup: Setup | None = None) -> Memory:
        state = setup() if setup is not None else None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        out = step(state)
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        del out, state
        return Memory(peak - before, peak)

    def gemm_tflops(self, dtype: torch.dtype, n: int = 8192) -> tuple[float, str]:
        """Dense n x n x n matmul rate (TFLOP/s), the median over do_bench runs."""
        from triton.testing import do_bench

        a = torch.randn(n, n, device=self.device).to(dtype)
        b = torch.randn(n, n, device=self.device).to(dtype)
        ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
        del a, b
        return 2 * n**3 / (ms * 1e-3) / 1e12, f"{n}x{n}x{n} torch.matmul, random data"


class CpuMeter:
    kind = "cpu"
    memory_metric = "peak resident set size (VmHWM) during the step minus resident size before it"
    time_metric = "wall clock (perf_counter) and process CPU time per run"

    def __init__(self, min_runs: int = 3, max_runs: int = 10, rep_ms: float = 1000):
        self.min_runs, self.max_runs, self.rep_ms = min_runs, max_runs, rep_ms
        self.device = torch.device("cpu")
        self._libc = _glibc()
        self.can_measure_memory = _can_reset_peak_rss()

    def name(self) -> str:
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.+)", f.read())
            model = m.group(1).strip() if m else "unknown"
        except OSError:
            model = "unknown"
        return f"CPU {model}"

    def sync(self):
        pass

    def cleanup(self):
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def time(self, step: Step, setup: Setup | None = None, grad_to_none=()) -> Timing:
        wall, cpu = [], []
        budget_end = time.perf_counter() + self.rep_ms / 1e3
        while len(wall) < self.min_runs or (len(wall) < self.max_runs and time.perf_counter() < budget_end):
            for t in grad_to_none:
                t.grad = None
            state = setup() if setup is not None else None
            w0, c0 = time.perf_counter(), time.process_time()
            step(state)
            wall.append((time.perf_counter() - w0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            del state
        return Timing(wall, cpu)

    def memory(self, step: Step, setup: Setup | None = None) -> Memory | None:
        if not self.can_measure_memory:
            return None
        state = setup() if setup is not None else None
        self.cleanup()
        before = _rss_kib()["VmRSS"]
        _reset_peak_rss()
        out = step(state)
        peak = _rss_kib()["VmHWM"]
        del out, state
        return Memory(max(0, peak - before) * 1024, None)

    def gemm_tflops(self, dtype: torch.dtype, n: int = 2048) -> tuple[float, str]:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b
        # the best of a few runs: on a shared CPU the median measures the neighbours as much as the matmul
        ms = min(min(self.time(lambda _: a @ b).ms) for _ in range(3))
        return (2 * n**3 / (ms * 1e-3) / 1e12,
                f"{n}x{n}x{n} torch.matmul on {torch.get_num_threads()} threads, best of the runs")


def _glibc():
    """glibc, set so freed tensors go back to the OS at once (resident-size deltas then mean something)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3  # mallopt: allocations above 64 KiB get their own mapping, unmapped on free
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
        return libc
    except (OSError, AttributeError):
        return None


def _rss_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current resident size


def _can_reset_peak_rss() -> bool:
    try:
        _reset_peak_rss()
        _rss_kib()
        return True
    except (OSError, AttributeError):
        return False


# --- correctness ----------------------------------------------------------------------------------

TOLERANCE = {  # relative error: (loss, gradients)
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-2, 3e-2),
    torch.float16: (1e-2, 3e-2),
}


@dataclass
class Result:
    loss: Tensor  # 0-d float32
    grad_hidden: Tensor
    grad_weight: Tensor


def loss_and_grads(fn, hidden: Tensor, weight: Tensor, labels: Tensor) -> Result:
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(h, w, labels)
    loss.backward()
    return Result(loss.detach().float(), h.grad, w.grad)


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||, in float32 chunks (no float64 copy of an N x D or V x D gradient)."""
    if a is None or b is None:
        return math.inf
    a, b = a.reshape(-1), b.reshape(-1)
    diff2 = ref2 = 0.0
    chunk = 1 << 26
    for i in range(0, b.numel(), chunk):
        bf = b[i:i + chunk].float()
        diff2 += (a[i:i + chunk].float() - bf).square().sum().item()
        ref2 += bf.square().sum().item()
    return math.sqrt(diff2) / math.sqrt(ref2) if ref2 > 0 else math.sqrt(diff2)


def compare(result: Result, reference: Result, dtype: torch.dtype) -> dict:
    """Relative errors of a provider's loss and gradients against dft-ops' on the same inputs."""
    loss_tol, grad_tol = TOLERANCE[dtype]
    errors = {
        "loss_rel_err": rel_err(result.loss, reference.loss),
        "grad_hidden_rel_err": rel_err(result.grad_hidden, reference.grad_hidden),
        "grad_weight_rel_err": rel_err(result.grad_weight, reference.grad_weight),
    }
    finite = all(math.isfinite(v) for v in errors.values())
    ok = (finite and errors["loss_rel_err"] <= loss_tol and errors["grad_hidden_rel_err"] <= grad_tol
          and errors["grad_weight_rel_err"] <= grad_tol)
    return {**errors, "loss_tol": loss_tol, "grad_tol": grad_tol, "ok": ok}
