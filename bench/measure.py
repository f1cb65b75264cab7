"""Timers, memory meters, the GEMM yardstick and the correctness check.

GPU: times from CUDA events around each run (L2 flushed before it, the device
synchronized after it), at least ``min_runs`` timed runs after a warm-up, the
median, min and max reported; memory as ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` minus what was allocated before the step.
CPU: wall-clock and process CPU time per run, memory as the peak resident set
size (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident
size before the step - CPU numbers, not comparable with the GPU's.

A step is ``step(state)``; ``setup()`` runs before each timed step, outside
the timed region (the backward mode times ``loss.backward()`` on a fresh
forward each time). Both meters take a ``deadline`` (``time.monotonic()``):
it is checked after every run, warm-up included, so a measurement stops
within one step of it and returns the runs it has (``Timing.cut``).
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
    cut: bool = False  # the deadline stopped it before its planned runs

    def summary(self) -> dict:
        out = {"ms_median": statistics.median(self.ms), "ms_min": min(self.ms), "ms_max": max(self.ms),
               "n_runs": len(self.ms)}
        if self.cpu_ms:
            out["cpu_ms_median"] = statistics.median(self.cpu_ms)
        if self.cut:
            out["cut_by_deadline"] = True
        return out


class OutOfTime(Exception):
    """The deadline passed before a single timed run (a record with status "skipped")."""


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


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
    time_metric = ("CUDA events around each run, L2 flushed before it and the device synchronized after it; "
                   "at least min_runs timed runs after a warm-up")

    def __init__(self, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100, min_runs: int = 5,
                 max_runs: int = 100):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.min_runs, self.max_runs = min_runs, max(min_runs, max_runs)
        self._flush = None

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def sync(self):
        torch.cuda.synchronize(self.device)

    def cleanup(self):
        gc.collect()
        torch.cuda.empty_cache()

    def time(self, step: Step, setup: Setup | None = None, grad_to_none=(), deadline: float | None = None,
             warm: bool = False) -> Timing:
        """Warm-up runs for ``warmup_ms`` (at least one; none when ``warm``: the step just ran), then
        ``rep_ms`` worth of timed runs, at least ``min_runs`` and at most ``max_runs``; ``setup()`` and the
        L2 flush stay outside the events."""
        if self._flush is None:
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)

        def one_run() -> float:
            for t in grad_to_none:
                t.grad = None
            state = setup() if setup is not None else None
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(state)
            end.record()
            end.synchronize()
            del state
            return start.elapsed_time(end)

        return _timed_runs(one_run, 0.0 if warm else self.warmup_ms, self.rep_ms, self.min_runs, self.max_runs,
                           deadline)

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


def three_products(meter, N: int, D: int, V: int, dtype: torch.dtype, deadline: float | None = None) -> dict:
    """The floor of a fused linear + loss step measured on ``meter``: the three products of its shapes,
    logits (N x D x V), d(hidden) and d(weight), fp32 outputs, nothing else (the same meter's timing).

    Returns a Timing summary (ms) and the FLOPs counted (6 N D V).
    """
    gen = torch.Generator(device=meter.device).manual_seed(1)
    h = torch.randn(N, D, generator=gen, device=meter.device).to(dtype)
    w = torch.randn(V, D, generator=gen, device=meter.device).to(dtype)
    g = torch.randn(N, V, generator=gen, device=meter.device).to(dtype)

    def step(_):
        z = torch.mm(h, w.T)
        dh = torch.mm(g, w)
        dw = torch.mm(g.T, h)
        return z, dh, dw

    timing = meter.time(step, deadline=deadline)
    del h, w, g
    meter.cleanup()
    return {**timing.summary(), "flops": 6.0 * N * D * V}


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

    def time(self, step: Step, setup: Setup | None = None, grad_to_none=(), deadline: float | None = None,
             warm: bool = False) -> Timing:
        wall, cpu = [], []
        budget_end = time.perf_counter() + self.rep_ms / 1e3
        cut = False
        while len(wall) < self.min_runs or (len(wall) < self.max_runs and time.perf_counter() < budget_end):
            if wall and _past(deadline):
                cut = len(wall) < self.min_runs
                break
            for t in grad_to_none:
                t.grad = None
            state = setup() if setup is not None else None
            w0, c0 = time.perf_counter(), time.process_time()
            step(state)
            wall.append((time.perf_counter() - w0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            del state
        return Timing(wall, cpu, cut=cut)

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


def _timed_runs(one_run: Callable[[], float], warmup_ms: float, rep_ms: float, min_runs: int, max_runs: int,
                deadline: float | None) -> Timing:
    """Warm-up runs until ``warmup_ms`` (at least one; none for 0), then n = rep_ms / (mean run time) timed
    runs within [min_runs, max_runs] (the mean of the warm-up, else of the first timed run); the deadline is
    checked after every run: past it, no further run starts (OutOfTime if the warm-up used it up)."""
    warm = []
    while warmup_ms > 0 and (not warm or sum(warm) < warmup_ms):
        warm.append(one_run())
        if _past(deadline):
            raise OutOfTime("time budget of this run used up during the warm-up")
    ms = [] if warm else [one_run()]
    planned = int(min(max_runs, max(min_runs, math.ceil(rep_ms / max(statistics.mean(warm or ms), 1e-3)))))
    while len(ms) < planned:
        if _past(deadline):
            return Timing(ms, cut=True)
        ms.append(one_run())
    return Timing(ms)


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

# relative error (norm-wise) against the float64 reference on the same inputs: (loss, gradients).
# fp32: tf32x3 products (~2^-21 per term) and fp32 accumulation land near 1e-6; 1e-4 leaves room for
# sums over 100k+ terms and atomics in any order, and still catches plain tf32 (~3e-4). 16-bit: peers
# materialize logits in bf16 (2^-9 per logit) and accumulate d(weight) in bf16; G in bf16 alone costs
# ~2.6e-3 (docs/backward.md); a wrong formula is off by O(1).
TOLERANCE = {
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


def compare(result: Result, reference: Result, dtype: torch.dtype, against: str = "float64") -> dict:
    """Relative errors of a provider's loss and gradients against a reference on the same inputs
    (``against``: "float64", the truth, or "dft-ops", for agreement), with the dtype's tolerances."""
    loss_tol, grad_tol = TOLERANCE[dtype]
    errors = {
        "loss_rel_err": rel_err(result.loss, reference.loss),
        "grad_hidden_rel_err": rel_err(result.grad_hidden, reference.grad_hidden),
        "grad_weight_rel_err": rel_err(result.grad_weight, reference.grad_weight),
    }
    finite = all(math.isfinite(v) for v in errors.values())
    ok = (finite and errors["loss_rel_err"] <= loss_tol and errors["grad_hidden_rel_err"] <= grad_tol
          and errors["grad_weight_rel_err"] <= grad_tol)
    return {"against": against, **errors, "loss_tol": loss_tol, "grad_tol": grad_tol, "ok": ok}
