"""The measuring loop: per case, inputs once, the dft-ops reference, then every provider checked and timed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from . import measure
from .cases import Case, Inputs, dtype_name, lower_bound_bytes, make_inputs, useful_flops
from .providers import PROVIDERS, REFERENCE

MB = 2**20
MODE_SHORT = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd"}


@dataclass
class Session:
    """What every record of one run shares."""

    meter: object  # measure.GpuMeter | measure.CpuMeter
    env: dict  # device, device_kind, versions, commit, gemm_tflops, ...
    providers: list[str]
    check: bool = True
    check_only: bool = False  # no timing or memory: status "checked"
    deadline: float | None = None  # time.monotonic() after which no provider starts
    log: Callable[[str], None] = print
    done: set = field(default_factory=set)  # (case.key, provider, mode) measured in this run

    def todo(self, case: Case) -> dict[str, tuple[str, ...]]:
        """provider -> the case's modes this run has not measured yet (providers with none left omitted)."""
        out = {}
        for name in self.providers:
            if case.providers is None or name in case.providers:
                modes = tuple(m for m in case.modes if (case.key, name, m) not in self.done)
                if modes:
                    out[name] = modes
        return out

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def run_case(case: Case, s: Session) -> list[dict]:
    """Records of every provider x mode of the case not measured yet in this run."""
    device = s.meter.device
    todo = s.todo(case)
    if not todo:
        return []
    for name, modes in todo.items():
        s.done.update((case.key, name, m) for m in modes)
    inputs, failure = attempt(lambda: make_inputs(case, device))
    if failure:
        s.meter.cleanup()
        status, reason = failure
        return [_record(case, n, m, s, status=status, reason=f"inputs: {reason}")
                for n, modes in todo.items() for m in modes]

    reference = reference_error = None
    if s.check:
        def run_reference():
            fn, _ = PROVIDERS[REFERENCE].build(case.objective, device)
            return measure.loss_and_grads(fn, inputs.hidden, inputs.weight, inputs.labels)
        reference, failure = attempt(run_reference)
        if failure:
            s.meter.cleanup()
            reference_error = failure[1]
            s.log(f"    reference (dft-ops) failed: {reference_error}; checks skipped for this case")

    records = []
    for name, modes in todo.items():
        records += _run_provider(replace(case, modes=modes), name, inputs, reference, reference_error, s)
    del inputs, reference
    s.meter.cleanup()
    return records


def _run_provider(case: Case, name: str, inputs: Inputs, reference, reference_error, s: Session) -> list[dict]:
    provider = PROVIDERS[name]
    device = s.meter.device

    def every_mode(**fields):
        return [_record(case, name, m, s, **fields) for m in case.modes]

    reason = provider.unavailable(device)
    if reason:
        return every_mode(status="skipped", reason=reason)
    if s.out_of_time():
        return every_mode(status="skipped", reason="time budget of this run used up before it started")
    built, failure = attempt(lambda: provider.build(case.objective, device))
    if failure:
        s.log(f"    {name}: cannot be built: {failure[1]}")
        return every_mode(status="error", reason=f"build: {failure[1]}")
    fn, note = built

    def check_against_reference():
        result = measure.loss_and_grads(fn, inputs.hidden, inputs.weight, inputs.labels)
        if name == REFERENCE:
            return {"reference": True, "ok": True}
        if reference is not None:
            return measure.compare(result, reference, case.dtype)
        return {"ok": None, "note": f"no reference: {reference_error}"} if s.check else None

    # the check doubles as warm-up: compiles, autotunes, first-call allocations
    check, failure = attempt(check_against_reference)
    if failure:
        s.meter.cleanup()
        s.log(f"    {name:14s} {failure[0].upper()}: {failure[1]}")
        return every_mode(status=failure[0], reason=failure[1], impl=note)
    if check is not None and check.get("ok") is False:
        s.log(f"    {name:14s} MISMATCH vs dft-ops: loss {check['loss_rel_err']:.1e}, "
              f"d(hidden) {check['grad_hidden_rel_err']:.1e}, d(weight) {check['grad_weight_rel_err']:.1e} "
              f"(tolerances {check['loss_tol']:.0e} / {check['grad_tol']:.0e})")

    if s.check_only:
        s.log(f"    {name:14s} checked: " + _check_summary(check))
        return every_mode(status="checked", impl=note, check=check)
    records = []
    for mode in case.modes:
        rec = _measure_mode(case, mode, fn, inputs, s)
        rec.update(impl=note, check=check)
        records.append(_finish(case, name, mode, s, rec))
        s.log("    " + progress_line(records[-1]))
    return records


def _measure_mode(case: Case, mode: str, fn, inputs: Inputs, s: Session) -> dict:
    h, w = inputs.leaves()
    y = inputs.labels
    setup = None
    grad_to_none = ()
    if mode == "forward":
        def step(_):
            return fn(h, w, y)  # a training forward: the graph is built, then dropped
    elif mode == "forward+backward":
        grad_to_none = (h, w)

        def step(_):
            fn(h, w, y).backward()
    else:
        def setup():
            h.grad = w.grad = None
            return fn(h, w, y)

        def step(loss):
            loss.backward()
    def measure_both():
        memory = s.meter.memory(step, setup)
        h.grad = w.grad = None
        return memory, s.meter.time(step, setup, grad_to_none)

    measured, failure = attempt(measure_both)
    h.grad = w.grad = None
    if failure:
        s.meter.cleanup()
        return {"status": failure[0], "reason": failure[1]}
    memory, timing = measured
    rec = {"status": "ok", **timing.summary()}
    if memory is not None:
        rec["peak_mb"] = memory.peak_bytes / MB
        if memory.total_bytes is not None:
            rec["peak_total_mb"] = memory.total_bytes / MB
    return rec


def _record(case: Case, provider: str, mode: str, s: Session, **fields) -> dict:
    return _finish(case, provider, mode, s, fields)


def _finish(case: Case, provider: str, mode: str, s: Session, fields: dict) -> dict:
    """The full record: the case, the measured fields, derived rates, the environment."""
    rec = {
        "provider": provider, "objective": case.objective, "shape": case.head.name, "hidden": case.head.hidden,
        "vocab": case.head.vocab, "tokens": case.tokens, "dtype": dtype_name(case.dtype), "mode": mode,
        "inputs": case.inputs, "status": "ok", "reason": None, "impl": None,
        "lower_bound_mb": lower_bound_bytes(case, mode) / MB,
    }
    rec.update(PROVIDERS[provider].params if provider in PROVIDERS else {})
    rec.update(fields)
    if rec["status"] == "ok":
        seconds = rec["ms_median"] / 1e3
        rec["tokens_per_s"] = case.tokens / seconds
        rec["tflops"] = useful_flops(case, mode) / seconds / 1e12
        rec["gemm_fraction"] = rec["tflops"] / s.env["gemm_tflops"] if s.env.get("gemm_tflops") else None
        if "peak_mb" in rec:
            rec["extra_mb"] = rec["peak_mb"] - rec["lower_bound_mb"]
    rec.update(s.env)
    return rec


def _check_summary(check: dict | None) -> str:
    if not check or "loss_rel_err" not in check:
        return "reference" if check and check.get("reference") else "no check"
    return (("ok" if check["ok"] else "MISMATCH") + f" (loss {check['loss_rel_err']:.1e}, d(hidden) "
            f"{check['grad_hidden_rel_err']:.1e}, d(weight) {check['grad_weight_rel_err']:.1e})")


def progress_line(rec: dict) -> str:
    head = f"{rec['provider']:14s} {MODE_SHORT[rec['mode']]:8s}"
    if rec["status"] != "ok":
        return f"{head} {rec['status'].upper()}" + (f": {rec['reason']}" if rec.get("reason") else "")
    mem = ""
    if rec.get("peak_mb") is not None:
        mem = f"  peak {rec['peak_mb']:9.1f} MB ({rec['extra_mb']:+.1f} over bound)"
    check = rec.get("check") or {}
    verdict = "" if check.get("ok") is None else ("  check ok" if check["ok"] else "  check MISMATCH")
    return (f"{head} {rec['ms_median']:10.3f} ms  {rec['tokens_per_s']:12,.0f} tok/s  "
            f"{rec['tflops']:7.2f} TFLOP/s{mem}{verdict}")


def attempt(thunk):
    """(thunk(), None), or (None, (status, reason)) where status is "oom" or "error".

    The exception (and the tensors its frames hold) is gone when this returns,
    so the caller's cleanup can hand the memory back.
    """
    try:
        return thunk(), None
    except Exception as e:  # noqa: BLE001 - every failure of a provider is a reported result
        return None, ("oom" if measure.is_oom(e) else "error", measure.brief(e))
