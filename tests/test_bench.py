"""Smoke test of the benchmark (bench/, run as python -m bench): the CLI end to end on a tiny head,
the correctness check that runs before timing, and the goal lines read from GPU results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is run from the repository root, not installed

from bench import goals, measure  # noqa: E402
from bench.cases import HEADS, Case, Head, lower_bound_bytes, make_inputs, useful_flops  # noqa: E402
from bench.providers import PROVIDERS  # noqa: E402

RECORD_FIELDS = {
    "provider", "objective", "shape", "hidden", "vocab", "tokens", "dtype", "mode", "inputs", "status",
    "ms_median", "ms_min", "ms_max", "n_runs", "cpu_ms_median", "peak_mb", "lower_bound_mb", "extra_mb",
    "tokens_per_s", "tflops", "gemm_tflops", "gemm_fraction", "check", "impl", "device", "device_kind",
    "versions", "commit", "measured_at",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU window runs the CLI itself (bench/gpu_run.sh)")
def test_cli_tiny_cpu_run_writes_records(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench", "--device", "cpu", "--shapes", "64x1000", "--tokens", "32", "96",
           "--providers", "torch", "liger", "dft-ops", "--modes", "forward", "forward+backward",
           "--rep-ms", "20", "--min-runs", "2", "--max-runs", "3", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped liger" in done.stdout  # never silently dropped

    files = list(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["device_kind"] == "cpu"
    recs = data["records"]
    # 3 providers x 2 objectives x 2 token counts x 2 modes
    assert len(recs) == 24
    measured = [r for r in recs if r["provider"] in ("torch", "dft-ops")]
    assert all(r["status"] == "ok" for r in measured), [r for r in measured if r["status"] != "ok"]
    for r in measured:
        assert RECORD_FIELDS <= r.keys(), RECORD_FIELDS - r.keys()
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["ms_median"] / 1e3))
        assert r["versions"]["torch"] == torch.__version__ and "triton" in r["versions"]
        assert r["inputs"] == "peaked" and r["dtype"] == "fp32"
    # every provider was checked against float64 before timing, and against dft-ops (which runs first)
    assert all(r["check"]["against"] == "float64" and r["check"]["ok"] and r["check"]["grad_weight_rel_err"] < 1e-4
               for r in measured)
    plain = [r for r in measured if r["provider"] == "torch"]
    assert all(r["agreement"]["against"] == "dft-ops" and r["agreement"]["ok"] for r in plain)
    assert all(r["agreement"] is None for r in measured if r["provider"] == "dft-ops")
    assert all(r["n_runs"] >= 2 for r in measured)
    skipped = [r for r in recs if r["provider"] == "liger"]
    assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in skipped)
    # backward modes are bounded below by the gradient buffers; forward by nothing
    fb = next(r for r in measured if r["mode"] == "forward+backward" and r["tokens"] == 96)
    assert fb["lower_bound_mb"] == pytest.approx((96 + 1000) * 64 * 4 / 2**20)
    assert fb["extra_mb"] == pytest.approx(fb["peak_mb"] - fb["lower_bound_mb"])

    md = files[0].with_suffix(".md").read_text()
    assert "CPU numbers" in md and "| torch |" in md and "Correctness against float64" in md
    # one summary line per forward+backward case: dft-ops against the fastest peer that ran (plain PyTorch)
    assert md.count("dft-ops against the fastest peer") == 1 and "vs the fastest peer, torch," in md
    assert done.stdout.count("vs the fastest peer, torch,") == 4  # 2 objectives x 2 token counts
    assert list(tmp_path.glob("cpu-*-dft-fwd-bwd.png"))


def test_summary_and_the_rows_of_a_backward_done_in_the_forward():
    from bench import report

    def rec(provider, mode, ms, peak):
        return dict(_goal_record(provider, "dft", "tiny", 4096, ms, mode=mode, peak_mb=peak),
                    hidden=256, vocab=10000, ms_min=ms, ms_max=ms, n_runs=3, tokens_per_s=1.0, tflops=1.0)

    recs = [rec("dft-ops", "forward", 30.0, 100.0), rec("dft-ops", "backward", 2.0, 50.0),  # grads in the forward
            rec("dft-ops", "forward+backward", 32.0, 120.0),
            rec("cce", "forward", 10.0, 90.0), rec("cce", "backward", 20.0, 90.0),          # two passes
            rec("cce", "forward+backward", 30.0, 150.0), rec("torch", "forward+backward", 60.0, 900.0)]
    assert report.backward_in_forward(recs) == {("dft-ops", ("tiny", "dft", "bf16", "peaked", 4096))}
    _, rows = report.result_rows(recs, cpu=False)
    modes = {(row[4], row[2]) for row in rows}
    assert {("dft-ops", "fwd*"), ("dft-ops", "bwd*"), ("dft-ops", "fwd+bwd"), ("cce", "fwd"), ("cce", "bwd")} <= modes
    (line,) = report.summary_lines(recs)
    assert "dft-ops 32.0 ms vs the fastest peer, cce, 30.0 ms: time 1.07x, memory 0.80x (120 vs 150 MB)" in line


def test_check_flags_a_provider_that_computes_another_loss():
    case = Case(Head("t", 32, 300), 40, "dft", "peaked", torch.float32, ("forward",))
    inputs = make_inputs(case, torch.device("cpu"))
    args = (inputs.hidden, inputs.weight, inputs.labels)
    cpu = torch.device("cpu")
    reference = measure.loss_and_grads(PROVIDERS["dft-ops"].build("dft", cpu)[0], *args)
    same = measure.loss_and_grads(PROVIDERS["torch"].build("dft", cpu)[0], *args)
    other = measure.loss_and_grads(PROVIDERS["torch"].build("ce", cpu)[0], *args)
    assert measure.compare(same, reference, torch.float32)["ok"]
    wrong = measure.compare(other, reference, torch.float32)
    assert not wrong["ok"] and wrong["loss_rel_err"] > 1e-2


def test_peaked_inputs_are_peaked_and_random_ones_flat():
    probs = {}
    for kind in ("peaked", "random"):
        case = Case(Head("t", 64, 2000), 512, "ce", kind, torch.float32, ("forward",))
        x = make_inputs(case, torch.device("cpu"))
        probs[kind] = torch.softmax(x.hidden @ x.weight.T, dim=1).gather(1, x.labels[:, None]).median().item()
    assert 0.6 < probs["peaked"] < 0.99
    assert probs["random"] < 10 / 2000


def test_yardsticks_of_a_goal_shape():
    case = Case(HEADS["llama3-8b"], 16384, "dft", "peaked", torch.bfloat16, ("forward+backward",))
    assert lower_bound_bytes(case, "forward+backward") == (16384 + 128256) * 4096 * 2
    assert lower_bound_bytes(case, "forward") == 0
    assert useful_flops(case, "forward+backward") == 6 * 16384 * 4096 * 128256


def _goal_record(provider, objective, shape, tokens, ms, status="ok", **extra):
    return {"provider": provider, "objective": objective, "shape": shape, "tokens": tokens, "dtype": "bf16",
            "mode": "forward+backward", "inputs": "peaked", "status": status, "ms_median": ms, "reason": None,
            **extra}


def test_goal_lines_from_gpu_records(tmp_path):
    recs = [
        _goal_record("dft-ops", "dft", "llama3-8b", 16384, 60.0, extra_mb=500.0, gemm_fraction=0.85),
        _goal_record("dft-ops", "ce", "llama3-8b", 16384, 59.0),             # 1.017x: met
        _goal_record("liger", "dft", "llama3-8b", 16384, 100.0),             # 0.60x: met
        _goal_record("cce-exact", "dft", "llama3-8b", 16384, 50.0),          # 1.20x: not met
        _goal_record("torch-compile", "dft", "llama3-8b", 16384, None, status="oom", reason="CUDA out of memory"),
        _goal_record("dft-ops-fused", "dft", "llama3-8b", 16384, 200.0, extra_mb=300.0),  # > 64 MB: not met
        _goal_record("dft-ops", "dft", "gemma2-2b", 8192, 30.0, extra_mb=4000.0, gemm_fraction=0.5),
        _goal_record("dft-ops", "dft", "qwen2.5-7b", 131072, 900.0, peak_total_mb=12000.0),
    ]
    (tmp_path / "nvidia-h100.json").write_text(json.dumps(
        {"device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda", "records": recs}))
    # a workspace sweep holds no goal case: not read
    (tmp_path / "nvidia-h100-workspace.json").write_text(json.dumps(
        {"device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda", "records": []}))
    lines = {g.what: g for g in goals.evaluate(recs)}
    assert lines["llama3-8b @ 16k: time vs Liger FLCE use_token_scaling (DFT)"].verdict == "met"
    assert lines["llama3-8b @ 16k: time vs Cut Cross-Entropy exact, DFT"].verdict == "not met"
    assert lines["llama3-8b @ 16k: time vs torch.compile materialized CE + DFT"].verdict.startswith("met")
    assert lines["llama3-8b @ 16k: time vs TRL fused LM head, DFT"].verdict.startswith("not measured")
    assert lines["llama3-8b @ 16k: DFT time over CE time, same path"].verdict == "met"
    assert lines["llama3-8b @ 16k: share of the measured GEMM rate (6NDV)"].verdict == "met"
    # 4 N D bytes of fp32 d(hidden) (256 MiB) + the 256 MiB workspace + 64 MB; the one-pass head as shipped also
    # holds fp32 d(weight) (4 V D: 2004 MiB) and a chunk of 1024 tokens' fp32 logits (501 MiB)
    memory = lines["llama3-8b @ 16k: extra peak memory over the lower bound"]
    assert memory.verdict == "met" and memory.target == "<= 3081 MB"
    assert lines["llama3-8b @ 16k: memory-first mode, extra peak memory"].verdict == "not met"
    assert lines["gemma2-2b @ 8k: share of the measured GEMM rate (6NDV)"].verdict == "not met"
    assert lines["gemma2-2b @ 8k: extra peak memory over the lower bound"].verdict == "not met"  # 72+256+64 MB, + 2250 + 1000 MB of one-pass
    assert lines["gemma2-2b @ 8k: DFT time over CE time, same path"].verdict.startswith("not measured")
    assert lines["qwen2.5-7b @ 128k: runs on one 80 GB GPU (peak allocated)"].verdict == "met"
    text = goals.report(tmp_path)
    assert "measured on NVIDIA H100 80GB HBM3" in text and "nvidia-h100-workspace" not in text
    assert "The same for dft-ops-fused (dft-ops, backward_mode='fused'" in text
    assert "no GPU result" in goals.report(tmp_path / "empty")


def test_results_go_to_a_scratch_folder_by_default():
    from bench.cli import parse_args
    from bench.environment import RESULTS_DIR, SCRATCH_DIR

    assert parse_args([]).out == SCRATCH_DIR != RESULTS_DIR
    assert parse_args(["--out", "docs/benchmarks"]).out == Path("docs/benchmarks")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU window runs the sweep itself (bench/gpu_run.sh)")
def test_workspace_sweep_checks_each_size_on_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench", "--interpret", "--device", "cpu", "--workspace-sweep", "0.002", "0.01",
           "--shapes", "64x300", "--tokens", "40", "--objectives", "dft", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(next(tmp_path.glob("cpu-*-workspace.json")).read_text())
    recs = data["records"]
    assert sorted(r["workspace_mb"] for r in recs) == [0.002, 0.01]
    assert all(r["mode"] == "backward" and r["status"] == "checked" and r["check"]["ok"] for r in recs)


def test_workspace_plot_and_cpu_note(tmp_path):
    from bench import report

    recs = [dict(_goal_record(f"dft-ops-gemm@{mb}MB", "dft", "llama3-8b", 16384, 100.0 + 1000 / mb,
                              peak_mb=300.0 + mb), workspace_mb=float(mb), mode="backward")
            for mb in (16, 64, 256)]
    data = {"device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda", "records": recs}
    paths = report.write_workspace_plots(tmp_path, "gpu-workspace", data)
    assert len(paths) == 1 and paths[0].stat().st_size > 0
    assert "PyTorch fallback" in report.CPU_NOTE


def test_asft_case_runs_checks_and_plots_on_cpu(tmp_path):
    """python -m bench.asft end to end, CPU-sized: every provider agrees with fp32 materialized logits."""
    from bench import asft

    assert asft.main(["--device", "cpu", "--shapes", "32x300", "--tokens", "40", "--direction", "reverse",
                      "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("cpu-*-asft.json")).read_text())
    recs = data["records"]
    assert [r["provider"] for r in recs] == list(asft.PROVIDERS)
    assert all(r["status"] == "ok" and r["check"]["ok"] and r["check"]["grad_weight_rel_err"] < 1e-5 for r in recs)
    assert all(r["direction"] == "reverse" and r["tokens"] == 40 for r in recs)
    assert "| 32x300 | 40 | fp32 | reverse | dft-ops |" in next(tmp_path.glob("cpu-*-asft.md")).read_text()
    assert list(tmp_path.glob("cpu-*-asft-fwd-bwd.png"))
    # a provider computing another loss would be flagged: the check compares against the KL-free DFT
    inputs = asft.make_asft_inputs("32x300", 40, torch.float32, torch.device("cpu"))
    args = [inputs[k] for k in ("hidden", "weight", "labels", "ref_hidden", "ref_weight")]
    with_kl = asft._loss_and_grads(asft.torch_asft, *args, 0.5, "forward")
    without = asft._loss_and_grads(asft.torch_asft, *args, 0.0, "forward")
    assert not measure.compare(without, with_kl, torch.float32)["ok"]
