"""The measuring loop: per case, inputs once, the float64 reference, then every provider checked and timed.

Each provider's loss and gradients are compared with the float64 reference (``bench.reference``: the
truth, so a wrong dft-ops reads as a dft-ops mismatch) and with dft-ops' own (agreement; dft-ops runs
first in a case). ``Session.emit`` receives each provider's records as soon as they exist (the CLI
writes them to disk at once), and the deadline is checked inside the timing loops too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from . import measure
from .cases import Case, Inputs, dtype_name, lower_bound_bytes, make_inputs, useful_flops
from .providers import PROVIDERS, REFERENCE
from .reference import float64_loss_and_grads

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
    deadline: float | None = None  # time.monotonic() after which no provider starts and no timed run begins
    log: Callable[[str], None] = print
    emit: Callable[[list[dict]], None] = lambda records: None  # each provider's records, as soon as they exist
    done: set = field(default_factory=set)  # (case.key, provider, mode) measured in this run

    def todo(self, case: Case) -> dict[str, tuple[str, ...]]:
        """provider -> the case's modes this run has not measured yet (providers with none left omitted)."""
        out = {}
        for name in self.providers:
            if case.runs(name):
                modes = tuple(m for m in case.modes if (case.key, name, m) not in self.done)
                if modes:
                    out[name] = modes
        return out

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def run_case(case: Case, s: Session) -> list[dict]:
    """Records of every provider x mode of the case not measured yet in this run (each also emitted)."""
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
        records = [_record(case, n, m, s, status=status, reason=f"inputs: {reason}")
                   for n, modes in todo.items() for m in modes]
        s.emit(records)
        return records

    truth = None
    truth_error = "not checked (--no-check)"
    if s.check:
        truth, failure = attempt(lambda: float64_loss_and_grads(inputs.hidden, inputs.weight, inputs.labels,
                                                                case.objective))
        if failure:
            s.meter.cleanup()
            truth_error = f"float64 reference failed: {failure[1]}"
            s.log(f"    {truth_error}; providers are compared with dft-ops only")
    refs = {"float64": truth, "dft-ops": None, "float64_error": truth_error}

    records = []
    for name, modes in todo.items():
        recs = _run_provider(replace(case, modes=modes), name, inputs, refs, s)
        s.emit(recs)
        records += recs
    del inputs, truth, refs
    s.meter.cleanup()
    return records


def _run_provider(case: Case, name: str, inputs: Inputs, refs: dict, s: Session) -> list[dict]:
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

    def checks():
        result = measure.loss_and_grads(fn, inputs.hidden, inputs.weight, inputs.labels)
        if not s.check:
            return None, None
        truth = refs["float64"]
        check = (measure.compare(result, truth, case.dtype, "float64") if truth is not None
                 else {"against": "float64", "ok": None, "note": refs["float64_error"]})
        agreement = None
        if name == REFERENCE:
            refs["dft-ops"] = result  # what the later providers of this case are compared with
        elif refs["dft-ops"] is not None:
            agreement = measure.compare(result, refs["dft-ops"], case.dtype, "dft-ops")
        return check, agreement

    # the check doubles as warm-up: compiles, autotunes, first-call allocations
    checked, failure = attempt(checks)
    if failure:
        s.meter.cleanup()
        s.log(f"    {name:14s} {failure[0].upper()}: {failure[1]}")
        return every_mode(status=failure[0], reason=failure[1], impl=note)
    check, agreement = checked
    if check is not None and check.get("ok") is False:
        s.log(f"    {name:14s} MISMATCH vs float64: " + _errors(check))
    if agreement is not None and agreement.get("ok") is False:
        s.log(f"    {name:14s} differs from dft-ops: " + _errors(agreement))

    if s.check_only:
        s.log(f"    {name:14s} checked: " + _check_summary(check))
        return every_mode(status="checked", impl=note, check=check, agreement=agreement)
    records = []
    for mode in case.modes:
        if s.out_of_time():
            rec = {"status": "skipped", "reason": "time budget of this run used up before this mode"}
        else:
            rec = _measure_mode(case, mode, fn, inputs, s)
        rec.update(impl=note, check=check, agreement=agreement)
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
        # the memory step was the warm-up (after the check's compiles): timed runs start at once
        return memory, s.meter.time(step, setup, grad_to_none, deadline=s.deadline, warm=memory is not None)

    measured, failure = attempt(measure_both)
    h.grad = w.grad = None
    if failure:
        s.meter.cleanup()
        return {"status": failure[0], "reason": failure[1]}
    memory, timing = measured
    rec = {"status": "ok", **timing.summary()}
    if memory is not None:
        rec["peak_mb"] = memory.peak_bytes / MB
        # what one GPU must hold for this step: the inputs and the step's peak over what was allocated
        # before it (the harness's references and earlier providers' leftovers are not counted)
        rec["peak_total_mb"] = (inputs.nbytes() + memory.peak_bytes) / MB
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


def _errors(check: dict) -> str:
    return (f"loss {check['loss_rel_err']:.1e}, d(hidden) {check['grad_hidden_rel_err']:.1e}, "
            f"d(weight) {check['grad_weight_rel_err']:.1e} (tolerances {check['loss_tol']:.0e} / "
            f"{check['grad_tol']:.0e})")


def _check_summary(check: dict | None) -> str:
    if not check or "loss_rel_err" not in check:
        return (check or {}).get("note", "no check")
    return ("ok" if check["ok"] else "MISMATCH") + f" vs {check['against']} (" + _errors(check) + ")"


def progress_line(rec: dict) -> str:
    head = f"{rec['provider']:14s} {MODE_SHORT[rec['mode']]:8s}"
    if rec["status"] != "ok":
        return f"{head} {rec['status'].upper()}" + (f": {rec['reason']}" if rec.get("reason") else "")
    mem = ""
    if rec.get("peak_mb") is not None:
        mem = f"  peak {rec['peak_mb']:9.1f} MB ({rec['extra_mb']:+.1f} over bound)"
    check = rec.get("check") or {}
    verdict = "" if check.get("ok") is None else ("  float64 ok" if check["ok"] else "  float64 MISMATCH")
    runs = f"  n={rec['n_runs']}" + (" (cut)" if rec.get("cut_by_deadline") else "")
    return (f"{head} {rec['ms_median']:10.3f} ms [{rec['ms_min']:.3f}-{rec['ms_max']:.3f}]{runs}  "
            f"{rec['tokens_per_s']:12,.0f} tok/s  {rec['tflops']:7.2f} TFLOP/s{mem}{verdict}")


def attempt(thunk):
    """(thunk(), None), or (None, (status, reason)) where status is "oom" or "error".

    The exception (and the tensors its frames hold) is gone when this returns,
    so the caller's cleanup can hand the memory back.
    """
    try:
        return thunk(), None
    except measure.OutOfTime as e:
        return None, ("skipped", str(e))
    except Exception as e:  # noqa: BLE001 - every failure of a provider is a reported result
        return None, ("oom" if measure.is_oom(e) else "error", measure.brief(e))
