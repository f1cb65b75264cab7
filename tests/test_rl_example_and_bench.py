"""The RL pieces a user runs: examples/grpo_toy.py (a few GRPO steps through dft_ops.token_logprobs) and the
benchmark case bench/token_logprobs.py, each end to end at a small size on CPU.

The example's own check (fused log-probs and entropies against the materialized log_softmax + gather +
entropy of the same batch) must hold, its loss must stay finite, and the largest tensor of the loss's
forward and backward must be smaller than the logits it reports never building (the PyTorch backend's
token x vocabulary blocks set to a fraction of them, as at real sizes). The benchmark checks every
provider against float64 before timing: dft-ops and the materialized recipe must pass that check, a
provider computing something else must fail it, and the verl providers are reported as skipped (with
the reason) where verl is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import small_chunks

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is run from the repository root, not installed

from bench import measure  # noqa: E402
from bench import token_logprobs as bench_tl  # noqa: E402


def _load_example():
    spec = importlib.util.spec_from_file_location("grpo_toy", REPO / "examples" / "grpo_toy.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_grpo_example_trains_without_building_the_logits(tmp_path, monkeypatch):
    example = _load_example()
    small_chunks(monkeypatch, 64, 512)  # blocks of 64 tokens x 512 classes: a fraction of the 126 x 3001 logits
    result = example.main(["--steps", "3", "--vocab", "3001", "--hidden", "24", "--prompts", "2", "--group", "3",
                           "--prompt-len", "5", "--completion-len", "17", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "grpo_toy.json").read_text())
    assert saved["steps"] == result["steps"] and len(result["steps"]) == 3
    assert result["tokens_per_step"] == 2 * 3 * (5 + 17 - 1)
    assert result["materialized_logits_bytes"] == result["tokens_per_step"] * 3001 * 4
    assert result["max_abs_difference_vs_materialized"] < 1e-4
    assert all(math.isfinite(s["loss"]) and 0 <= s["reward"] <= 1 and s["entropy"] > 0 for s in result["steps"])
    # the largest tensor is the tied head's (V, D) gradient or a block, never the logits
    largest = result["largest_tensor_in_loss_forward_backward_bytes"]
    assert largest < result["materialized_logits_bytes"] / 2, result


def test_grpo_example_policy_learns_the_toy_reward(tmp_path):
    """Enough steps at the example's own block sizes that the reward rises: the gradients point the right way."""
    example = _load_example()
    result = example.main(["--steps", "6", "--vocab", "500", "--hidden", "16", "--prompts", "4", "--group", "6",
                           "--prompt-len", "4", "--completion-len", "12", "--lr", "3e-2", "--out", str(tmp_path)])
    rewards = [s["reward"] for s in result["steps"]]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards  # seeds 0-2: +0.15, +0.26, +0.29


def test_benchmark_case_checks_and_reports_on_cpu(tmp_path):
    assert bench_tl.main(["--device", "cpu", "--shapes", "48x700", "--tokens", "37", "--modes", "forward",
                          "forward+backward", "--out", str(tmp_path), "--no-plot"]) == 0
    data = json.loads(next(tmp_path.glob("cpu-*-token-logprobs.json")).read_text())
    assert data["device_kind"] == "cpu"
    recs = data["records"]
    measured = [r for r in recs if r["provider"] in ("dft-ops", "torch")]
    assert len(measured) == 4 and all(r["status"] == "ok" for r in measured), measured
    for r in measured:
        check = r["check"]
        assert check["ok"] and check["against"] == "float64", check
        assert check["logprob_rel_err"] < 1e-5 and check["entropy_rel_err"] < 1e-5 and check["grad_weight_rel_err"] < 1e-4
        assert r["n_runs"] >= 3 and r["ms_median"] > 0 and r["temperature"] == bench_tl.TEMPERATURE
    if importlib.util.find_spec("verl") is None:
        skipped = [r for r in recs if r["provider"].startswith("verl")]
        assert {r["provider"] for r in skipped} == {"verl-torch", "verl-triton"}
        assert all(r["status"] == "skipped" and "verl" in r["reason"] for r in skipped)
    md = next(tmp_path.glob("cpu-*-token-logprobs.md")).read_text()
    assert "| 48x700 | 37 | fp32 | forward+backward | dft-ops |" in md and "PyTorch backend" in md


def test_benchmark_check_flags_a_wrong_provider():
    """The check before timing fails a provider whose entropy gradient is missing (entropy detached)."""
    case = bench_tl.Case(bench_tl.parse_head("32x300"), 29, "ce", "peaked", torch.float32, ("forward",))
    inputs = bench_tl.make_inputs(case, torch.device("cpu"))
    h, w, y = inputs.hidden, inputs.weight, inputs.labels
    g_l, g_h = bench_tl.upstream(29, "cpu")
    truth, truth_outputs = bench_tl.reference(h, w, y, g_l, g_h)

    def detached_entropy(h, w, y, t):
        logp, entropy = bench_tl.torch_fn(h, w, y, t)
        return logp, entropy.detach()

    verdicts = {}
    for name, fn in (("torch", bench_tl.torch_fn), ("wrong", detached_entropy)):
        loss = bench_tl.objective(fn, g_l, g_h)
        result = measure.loss_and_grads(loss, h, w, y)
        verdicts[name] = bench_tl.check(result, loss.outputs, truth, truth_outputs, torch.float32)
    assert verdicts["torch"]["ok"] and not verdicts["wrong"]["ok"], verdicts
