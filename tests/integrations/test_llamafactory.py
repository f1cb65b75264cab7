"""LLaMA-Factory's use_dft_loss / use_asft_loss runs computed by dft-ops (dft_ops.integrations.llamafactory).

Runs the real LLaMA-Factory (``make test-llamafactory`` builds its venv) on a tiny Llama saved from a
config: the same run with LLaMA-Factory's own loss (logits) and with dft-ops installed; losses and
the first step's gradients must agree at fp32 tolerance, and the dft-ops run must hold less memory.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("llamafactory", reason="LLaMA-Factory is not installed here: `make test-llamafactory` "
                    "builds its venv (.venv/frameworks/llamafactory by default) and runs this file there")
pytest.importorskip("llamafactory.train.tuner", reason="LLaMA-Factory does not import here (its text path imports "
                    "torchaudio; `make test-llamafactory` installs a placeholder)")

import torch  # noqa: E402

from dft_ops.integrations import llamafactory as lf_hook  # noqa: E402
from framework_harness import (VOCAB, StepRecorder, losses, rel_err, tiny_llama_dir, toy_sft_records,  # noqa: E402
                               write_jsonl)

TOL = 2e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamafactory")
    tiny_llama_dir(root / "model")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "toy.jsonl", toy_sft_records(24))
    (data / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.jsonl"}}))
    return root


def run(workdir, name, *, hooked, steps=3, **overrides):
    from llamafactory.train.tuner import run_exp

    from dft_ops.integrations.llamafactory import install, uninstall

    install() if hooked else uninstall()
    args = dict(model_name_or_path=str(workdir / "model"), stage="sft", do_train=True, finetuning_type="full",
                dataset="toy", dataset_dir=str(workdir / "data"), template="empty", cutoff_len=128,
                output_dir=str(workdir / name), overwrite_output_dir=True, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_steps=steps, learning_rate=1e-3, logging_steps=1,
                report_to="none", save_strategy="no", disable_shuffling=True, seed=0, bf16=False, fp16=False,
                dataloader_num_workers=0, preprocessing_num_workers=None, plot_loss=False, use_dft_loss=True)
    args.update(overrides)
    recorder = StepRecorder.make(vocab=VOCAB)
    run_exp(args=args, callbacks=[recorder])
    state = json.loads((workdir / name / "trainer_state.json").read_text())
    return losses(state["log_history"]), recorder


def compare(plain, fused):
    (plain_losses, plain_rec), (fused_losses, fused_rec) = plain, fused
    assert len(plain_losses) == len(fused_losses) > 0
    for a, b in zip(plain_losses, fused_losses):
        assert abs(a - b) <= TOL * max(abs(a), 1e-3), (plain_losses, fused_losses)
    grads_a, grads_b = plain_rec.grads[0], fused_rec.grads[0]
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    worst = max(rel_err(grads_b[k], grads_a[k]) for k in grads_a)
    assert worst < TOL, worst
    # memory: LLaMA-Factory builds the (batch, seq, V) logits and their float softmax; dft-ops a bounded block
    report = dict(plain_peak=plain_rec.memory.peak, fused_peak=fused_rec.memory.peak,
                  plain_vocab_wide=plain_rec.memory.largest_vocab_wide,
                  fused_vocab_wide=fused_rec.memory.largest_vocab_wide, worst_grad_rel_err=worst,
                  losses=(plain_losses, fused_losses))
    print(f"\nLLaMA-Factory measurements: {report}")
    assert fused_rec.memory.peak < plain_rec.memory.peak, report
    return report


@pytest.mark.slow
def test_use_dft_loss_matches_llamafactory_and_never_builds_logits(workdir):
    plain = run(workdir, "plain_dft", hooked=False)
    fused = run(workdir, "fused_dft", hooked=True)
    compare(plain, fused)


@pytest.mark.slow
def test_use_asft_loss_matches_llamafactory(workdir):
    # LLaMA-Factory's ASFT sums the micro-batches' means (no division by the accumulation steps):
    # compared without gradient accumulation, where both are the mean over the batch
    plain = run(workdir, "plain_asft", hooked=False, use_dft_loss=False, use_asft_loss=True, asft_alpha=0.3,
                gradient_accumulation_steps=1)
    fused = run(workdir, "fused_asft", hooked=True, use_dft_loss=False, use_asft_loss=True, asft_alpha=0.3,
                gradient_accumulation_steps=1)
    compare(plain, fused)


def test_install_wraps_once_and_uninstall_restores():
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    lf_hook.uninstall()
    original = CustomSeq2SeqTrainer.__init__
    lf_hook.install()
    assert lf_hook.is_installed() and CustomSeq2SeqTrainer.__init__ is not original
    lf_hook.install(backend="torch")  # again: options replaced, never wrapped twice
    assert CustomSeq2SeqTrainer.__init__.__wrapped__ is original
    lf_hook.uninstall()
    assert CustomSeq2SeqTrainer.__init__ is original and not lf_hook.is_installed()


def test_install_refuses_options_the_config_sets():
    with pytest.raises(ValueError, match="^objective: set by the LLaMA-Factory config"):
        lf_hook.install(objective="ce")
    with pytest.raises(ValueError, match="backend"):
        lf_hook.install(backend="nope")
    assert not lf_hook.is_installed()


def test_launcher_usage_and_multi_device_message(monkeypatch, capsys):
    with pytest.raises(SystemExit, match="usage: python -m dft_ops.integrations.llamafactory train"):
        lf_hook.main(["chat", "x.yaml"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(lf_hook, "_device_count", lambda: 2)
    with pytest.raises(SystemExit, match="torchrun --nproc_per_node N -m dft_ops.integrations.llamafactory"):
        lf_hook.main(["train", "x.yaml"])
    assert os.environ.get("LOCAL_RANK") is None and torch is not None
