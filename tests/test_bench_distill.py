"""The distillation benchmark case (python -m bench.distill) end to end on a CPU-sized head, and its
materialized reference against the divergence written out in float64."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is run from the repository root, not installed

from bench import cli, distill, measure  # noqa: E402


def test_distill_case_runs_and_checks_on_cpu(tmp_path):
    """Every provider that runs on a CPU agrees with fp32 materialized logits at beta 0.3 and T = 2 (a
    teacher of hidden size 48 for the student's 32); Liger's Triton-only fused JSD is recorded as skipped;
    ``--report`` rebuilds the table from the JSON."""
    pytest.importorskip("liger_kernel.chunked_loss.jsd_loss")
    assert distill.main(["--device", "cpu", "--shapes", "32x300", "--tokens", "40", "--beta", "0.3",
                         "--temperature", "2.0", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("cpu-*-distill.json")).read_text())
    recs = {r["provider"]: r for r in data["records"]}
    assert list(recs) == list(distill.PROVIDERS)
    assert recs["liger"]["status"] == "skipped" and "CUDA" in recs["liger"]["reason"]
    for name in ("dft-ops", "liger-chunked", "torch"):
        r = recs[name]
        assert r["status"] == "ok" and r["check"]["ok"], (name, r)
        assert r["check"]["grad_hidden_rel_err"] < 1e-5 and r["check"]["grad_weight_rel_err"] < 1e-5, (name, r)
        assert r["ms_median"] > 0
    assert all(r["teacher_hidden"] == 48 and r["hidden"] == 32 and r["tokens"] == 40 for r in recs.values())
    md = next(tmp_path.glob("cpu-*-distill.md"))
    assert "| 32x300 | 48 | 40 | fp32 | 0.3 | 2.0 | dft-ops |" in md.read_text()
    md.unlink()
    assert cli._rebuild_reports(tmp_path, plots=False) == 0
    assert "| 32x300 | 48 | 40 | fp32 | 0.3 | 2.0 | liger | - | - | - | skipped:" in md.read_text()


def _jsd_written_out(h, w, y, t_h, t_w, beta, temperature):
    """float64, the mixture formed from the probabilities themselves (not a logsumexp of log-probs), and the
    beta 0 / 1 ends as the forward / reverse KL."""
    p = F.softmax((h @ w.T) / temperature, -1)
    q = F.softmax((t_h @ t_w.T) / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if beta == 0:
        per_token = kl(q, p)
    elif beta == 1:
        per_token = kl(p, q)
    else:
        m = beta * q + (1 - beta) * p
        per_token = beta * kl(q, m) + (1 - beta) * kl(p, m)
    valid = y != -100
    return per_token[valid].sum() / valid.sum()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_reference_is_the_generalized_jsd(beta):
    """The providers are checked against ``torch_jsd``: it must be the divergence, at every beta, with a
    fifth of the labels ignored and the teacher's hidden size 1.5 D; and the check must tell another beta."""
    inputs = distill.make_distill_inputs("32x300", 40, torch.float32, torch.device("cpu"))
    h, w, y, t_h, t_w = (inputs[k] for k in ("hidden", "weight", "labels", "teacher_hidden", "teacher_weight"))
    assert t_h.shape == (40, 48) and t_w.shape == (300, 48)
    assert torch.equal(t_h[:, :32], h) and torch.equal(t_w[:, :32], w)
    assert 0 < int((y == -100).sum()) < 40
    got = distill.torch_jsd(h.double(), w.double(), y, t_h.double(), t_w.double(), beta, 2.0)
    want = _jsd_written_out(h.double(), w.double(), y, t_h.double(), t_w.double(), beta, 2.0)
    # torch_jsd takes the log-softmaxes in fp32, and a JSD of close distributions is a small difference of them
    assert want > 1e-4 and abs(got - want) / want < 2e-4

    def result(b):
        return measure.loss_and_grads(lambda hh, ww, yy: distill.torch_jsd(hh, ww, yy, t_h, t_w, b, 2.0), h, w, y)

    assert not measure.compare(result(0.5 if beta != 0.5 else 0.2), result(beta), torch.float32)["ok"]
