"""ms-swift's enable_dft_loss runs computed by dft-ops (dft_ops.integrations.ms_swift).

Runs the real ms-swift (``make test-ms-swift`` builds its venv) on a tiny Llama saved from a config:
the same ``sft_main`` run with ms-swift's own DFT (logits) and with dft-ops installed; losses and the
first step's gradients must agree at fp32 tolerance, and the dft-ops run must hold less memory.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("swift", reason="ms-swift is not installed here: `make test-ms-swift` builds its venv "
                    "(.venv/frameworks/ms-swift by default) and runs this file there")
pytest.importorskip("swift.pipelines", reason="ms-swift does not import here")

from dft_ops.integrations import ms_swift as swift_hook  # noqa: E402
from framework_harness import (VOCAB, StepRecorder, losses, rel_err, tiny_llama_dir, toy_sft_records,  # noqa: E402
                               write_jsonl)

TOL = 2e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms_swift")
    tiny_llama_dir(root / "model")
    write_jsonl(root / "toy.jsonl", toy_sft_records(24))
    return root


def run(workdir, name, *, hooked, steps=3, **overrides):
    from swift.arguments import SftArguments
    from swift.callbacks import callbacks_map
    from swift.pipelines import sft_main

    swift_hook.install() if hooked else swift_hook.uninstall()
    recorder = StepRecorder.make(vocab=VOCAB)
    callbacks_map["dft_ops_test_recorder"] = lambda args, trainer: recorder  # ms-swift's callback registry
    kwargs = dict(model=str(workdir / "model"), model_type="llama", template="dummy", dataset=[str(workdir / "toy.jsonl")],
                  tuner_type="full", torch_dtype="float32", max_length=128, output_dir=str(workdir / name),
                  add_version=False, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=steps,
                  learning_rate=1e-3, logging_steps=1, report_to=["none"], save_strategy="no", seed=0, data_seed=0,
                  dataset_shuffle=False, train_dataloader_shuffle=False, dataloader_num_workers=0,
                  split_dataset_ratio=0.0, callbacks=["dft_ops_test_recorder"], enable_dft_loss=True,
                  check_model=False, use_hf=True)
    kwargs.update(overrides)
    try:
        sft_main(SftArguments(**kwargs))
    finally:
        callbacks_map.pop("dft_ops_test_recorder", None)
    return recorder


def compare(plain, fused):
    plain_losses, fused_losses = losses(plain.log_history), losses(fused.log_history)
    assert len(plain_losses) == len(fused_losses) > 0
    for a, b in zip(plain_losses, fused_losses):
        assert abs(a - b) <= TOL * max(abs(a), 1e-3), (plain_losses, fused_losses)
    grads_a, grads_b = plain.grads[0], fused.grads[0]
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    worst = max(rel_err(grads_b[k], grads_a[k]) for k in grads_a)
    assert worst < TOL, worst
    report = dict(plain_peak=plain.memory.peak, fused_peak=fused.memory.peak,
                  plain_vocab_wide=plain.memory.largest_vocab_wide, fused_vocab_wide=fused.memory.largest_vocab_wide,
                  worst_grad_rel_err=worst, losses=(plain_losses, fused_losses))
    print(f"\nms-swift measurements: {report}")
    assert fused.memory.peak < plain.memory.peak, report
    return report


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", [False, True])
def test_enable_dft_loss_matches_ms_swift_and_never_builds_logits(workdir, padding_free):
    extra = dict(padding_free=True) if padding_free else {}
    try:
        plain = run(workdir, f"plain{padding_free}", hooked=False, **extra)
    except (ImportError, ValueError) as exc:
        if padding_free:
            pytest.skip(f"ms-swift refuses padding_free here: {exc}")
        raise
    fused = run(workdir, f"fused{padding_free}", hooked=True, **extra)
    compare(plain, fused)


def test_install_wraps_once_and_uninstall_restores():
    from swift.trainers.seq2seq_trainer import Seq2SeqTrainer

    swift_hook.uninstall()
    original = Seq2SeqTrainer.__init__
    swift_hook.install()
    swift_hook.install(backend="torch")
    assert swift_hook.is_installed() and Seq2SeqTrainer.__init__.__wrapped__ is original
    swift_hook.uninstall()
    assert Seq2SeqTrainer.__init__ is original and not swift_hook.is_installed()
    with pytest.raises(ValueError, match="^objective: set by the ms-swift run"):
        swift_hook.install(objective="ce")


def test_external_plugin_path_installs_itself():
    """What --external_plugins does: import this module's file by path under another name."""
    path = subprocess.run([sys.executable, "-m", "dft_ops.integrations.ms_swift"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert path.endswith("dft_ops/integrations/ms_swift.py")
    from swift.utils.utils import import_external_file

    swift_hook.uninstall()
    import_external_file(path)
    try:
        assert swift_hook.is_installed()
    finally:
        swift_hook.uninstall()
