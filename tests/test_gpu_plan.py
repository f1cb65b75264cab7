"""The GPU window's plan, run on the CPU so it cannot rot: bench/gpu_run.sh call1 and call2 end to end
with tiny shapes (BENCH_DRY_RUN=1), the curated GPU set, and the pieces the plan relies on (the float64
reference, the deadline inside timing loops, results written per provider, the data-driven provider list,
TRL's backward without datasets)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is run from the repository root, not installed

from bench import measure  # noqa: E402
from bench.cases import Case, Head, make_inputs  # noqa: E402
from bench.providers import DFT_OPS_MODES, PROVIDERS, dft_ops_provider  # noqa: E402
from bench.reference import float64_loss_and_grads  # noqa: E402
from gpu_smoke import GPU_SMOKE  # noqa: E402

import dft_ops  # noqa: E402

ALLOWED_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device returns from $OUT
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run of the plan: the GPU runs the real one")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "DFT_OPS_CONFIG")}
    env.update(PYTHON=sys.executable, BENCH_DRY_RUN="1", DFT_OPS_COMMIT="dry-run", **extra)
    return env


def _returned_files(out: Path) -> list[Path]:
    """What the device tool would bring back: at most 8 files, flat, plain names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(p.parent == out and ALLOWED_NAME.match(p.name) for p in files), files
    return files


@no_gpu
def test_call1_dry_run(tmp_path):
    smoke = "--device cpu --shape 32x300 --tokens 24 --dtypes fp32 bf16 --objectives dft"
    done = subprocess.run(["bash", "bench/gpu_run.sh", "call1", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=_env(BENCH_SMOKE_ARGS=smoke, BENCH_TEST_EXTRA="--collect-only"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = {p.name for p in _returned_files(tmp_path)}
    assert names == {"gpu_run.log", "probe.json", "smoke.json", "smoke.md", "gpu-tests.log", "gpu-tests.xml"}
    log = (tmp_path / "gpu_run.log").read_text()
    assert "DFT_OPS_CONFIG=0" in log and "call1 done" in log
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["compiler"]["cc"] and {p["module"] for p in probe["wanted"]} >= {"trl.trainer.utils", "datasets"}
    smoke_data = json.loads((tmp_path / "smoke.json").read_text())
    assert smoke_data["forced_config"] == "0" and smoke_data["commit"] == "dry-run"
    recs = smoke_data["records"]
    assert {r["mode"] for r in recs} == {m[0] for m in DFT_OPS_MODES}
    torch_modes = {"dft-ops", "dft-ops-two-pass"}  # the torch backend on a CPU: one pass and two passes
    shipped = [r for r in recs if r["mode"] in torch_modes]
    assert len(shipped) == 4 and all(r["status"] == "ok" and r["grad_weight_rel_err"] < r["grad_tol"] for r in shipped)
    assert all(r["status"] == "skipped" and r["reason"] for r in recs if r["mode"] not in torch_modes)
    collected = {line.strip() for line in (tmp_path / "gpu-tests.log").read_text().splitlines() if "::" in line}
    assert collected == set(GPU_SMOKE)  # the call's own selection: -m gpu_smoke over the files of the list


@no_gpu
def test_call2_dry_run(tmp_path):
    suite = ("--suite goals --device cpu --shapes 48x500 --tokens 40 --modes forward+backward "
             "--providers dft-ops torch --rep-ms 1 --min-runs 2 --max-runs 3")
    done = subprocess.run(["bash", "bench/gpu_run.sh", "call2", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=_env(BENCH_SUITE_ARGS=suite, BENCH_PREVIOUS=str(tmp_path / "no-previous-results")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = _returned_files(tmp_path)
    names = {p.name for p in files}
    stem = next(p.stem for p in files if p.suffix == ".json")
    assert names == {"gpu_run.log", "goals.txt", f"{stem}.json", f"{stem}.md"}
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    recs = data["records"]
    assert len(recs) == 4 and {r["provider"] for r in recs} == {"dft-ops", "torch"}
    assert all(r["status"] == "ok" and r["n_runs"] >= 2 and r["check"]["against"] == "float64" and r["check"]["ok"]
               and r["commit"] == "dry-run" for r in recs)
    assert all(r["agreement"]["ok"] for r in recs if r["provider"] == "torch")
    assert "Goals" in (tmp_path / "goals.txt").read_text()

    # committing: the returned files into docs/benchmarks, named by the device (a GPU's name in a real window)
    from bench.collect import collect

    data["device_kind"] = "cuda"  # as a GPU's file says
    (tmp_path / f"{stem}.json").write_text(json.dumps(data))
    docs = tmp_path / "docs"
    written = {p.name for p in collect([tmp_path], docs, plots=False)}
    assert written == {f"{stem}.json", f"{stem}.md", f"{stem}-goals.txt", f"{stem}-call2.log"}


def test_curated_gpu_set_names_existing_tests():
    files = sorted({i.split("::")[0] for i in GPU_SMOKE})
    env = {k: v for k, v in os.environ.items() if k != "DFT_OPS_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "gpu_smoke", *files], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = {line.strip() for line in done.stdout.splitlines() if "::" in line}
    assert collected == set(GPU_SMOKE), (set(GPU_SMOKE) - collected, collected - set(GPU_SMOKE))


@pytest.mark.parametrize("objective", ["ce", "dft"])
def test_float64_reference_matches_the_naive_oracle(objective):
    """bench/reference.py (chunked, written from the definitions) against dft_ops.naive through autograd."""
    hidden = torch.randn(37, 24).to(torch.bfloat16)
    weight = (torch.randn(101, 24) / 5).to(torch.bfloat16)
    labels = torch.randint(0, 101, (37,))
    labels[[3, 11]] = -100
    got = float64_loss_and_grads(hidden, weight, labels, objective, chunk_bytes=3 * 8 * 101 * 5)  # 5-token chunks
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = dft_ops.naive.linear_cross_entropy(h, w, labels, objective=objective)
    want.backward()
    assert abs(got.loss.item() - want.item()) < 1e-12
    assert measure.rel_err(got.grad_hidden, h.grad) < 1e-6 and measure.rel_err(got.grad_weight, w.grad) < 1e-6
    with pytest.raises(ValueError, match="objective"):
        float64_loss_and_grads(hidden, weight, labels, "focal")


def test_deadline_stops_a_timing_loop_between_runs():
    def one_run():
        time.sleep(0.02)
        return 20.0

    # planned 10 runs (rep 200 ms / 20 ms), the deadline passes during the third timed run
    deadline = time.monotonic() + 0.07
    timing = measure._timed_runs(one_run, warmup_ms=1, rep_ms=200, min_runs=5, max_runs=50, deadline=deadline)
    assert timing.cut and 1 <= len(timing.ms) < 5
    assert timing.summary()["cut_by_deadline"] and timing.summary()["n_runs"] == len(timing.ms)
    with pytest.raises(measure.OutOfTime):
        measure._timed_runs(one_run, warmup_ms=1, rep_ms=200, min_runs=5, max_runs=50, deadline=time.monotonic())
    full = measure._timed_runs(one_run, warmup_ms=1, rep_ms=1, min_runs=5, max_runs=50, deadline=None)
    assert not full.cut and len(full.ms) == 5
    cpu = measure.CpuMeter(min_runs=5, max_runs=9, rep_ms=1000).time(lambda _: time.sleep(0.02),
                                                                   deadline=time.monotonic() + 0.05)
    assert cpu.cut and len(cpu.ms) < 5


def test_each_provider_is_emitted_as_soon_as_it_is_measured():
    from bench.run import Session, run_case

    emitted = []
    session = Session(meter=measure.CpuMeter(min_runs=1, max_runs=1, rep_ms=1), env={}, providers=["dft-ops", "torch"],
                      emit=lambda recs: emitted.append([r["provider"] for r in recs]), log=lambda line: None)
    case = Case(Head("t", 16, 200), 24, "dft", "peaked", torch.float32, ("forward", "forward+backward"))
    records = run_case(case, session)
    assert emitted == [["dft-ops", "dft-ops"], ["torch", "torch"]]
    assert all(r["check"]["ok"] and r["check"]["against"] == "float64" for r in records)
    assert records[0]["agreement"] is None and all(r["agreement"]["ok"] for r in records[2:])
    assert all(r["peak_total_mb"] is None or r["peak_total_mb"] >= r["peak_mb"] for r in records if "peak_mb" in r)


def test_a_dft_ops_mode_is_one_line_and_unknown_options_are_skipped_with_the_reason():
    from bench import report

    names = [m[0] for m in DFT_OPS_MODES]
    assert names[0] == "dft-ops" and list(PROVIDERS)[: len(names)] == names
    assert report.PROVIDER_ORDER[: len(names)] == tuple(names)
    provider = dft_ops_provider("dft-ops-nope", "a mode this dft-ops lacks", dict(backend="triton", backward_mode="nope"))
    reason = provider.unavailable(torch.device("cuda"))
    assert "backward_mode" in reason and "nope" in reason
    assert dft_ops_provider("x", "y", dict(backend="torch")).unavailable(torch.device("cpu")) is None


def test_trl_backward_runs_without_datasets(tmp_path):
    """TRL's backward imports trl.trainer.utils (which imports datasets): with datasets unimportable the
    provider puts a nullcontext stand-in in its place, says so in its note, and computes the same gradients."""
    pytest.importorskip("trl")
    script = """
import sys
sys.modules["datasets"] = None  # unimportable, as on a GPU image without it
sys.path.insert(0, %r)
import torch
from bench import measure
from bench.providers import PROVIDERS
cpu = torch.device("cpu")
h, w, y = torch.randn(24, 16), torch.randn(200, 16) / 4, torch.randint(0, 200, (24,))
fn, note = PROVIDERS["trl"].build("dft", cpu)
assert "stand-in" in note and "datasets" in note, note
got = measure.loss_and_grads(fn, h, w, y)
want = measure.loss_and_grads(PROVIDERS["torch"].build("dft", cpu)[0], h, w, y)
assert measure.compare(got, want, torch.float32)["ok"], measure.compare(got, want, torch.float32)
print("ok")
""" % str(REPO)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
