"""TRL ``SFTConfig(loss_type="dft")`` served by ``dft_ops.patch_sft_trainer`` (TRL >= 1.15, in dft-ops' own venv).

TRL computes its DFT through its own fused head (chunks of 4096 tokens x V logits, recomputed in
backward). Patched, the head's log-probs come from dft-ops and TRL's DFT weighting and reduction run
on them unchanged: losses and gradients equal TRL's own at fp32 tolerance, with no vocabulary-wide
tensor beyond dft-ops' bounded block.
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'dft-ops[trl]')")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from packaging.version import Version  # noqa: E402

import dft_ops  # noqa: E402
from framework_harness import VOCAB, StepRecorder, TensorMemory, rel_err, toy_sft_records, word_tokenizer  # noqa: E402

if Version(trl.__version__) < Version("1.15"):
    pytest.skip(f"TRL {trl.__version__} has no fused LM head (patch_sft_trainer needs TRL >= 1.15)",
                allow_module_level=True)

TOL = 2e-5


def trainer(tmp_path, *, patched, steps=3, **config):
    datasets = pytest.importorskip("datasets")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=1, tie_word_embeddings=False))
    records = toy_sft_records(16)
    data = datasets.Dataset.from_dict({"prompt": [r["instruction"] for r in records],
                                       "completion": [" " + r["output"] for r in records]})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, learning_rate=1e-3, max_length=128, bf16=False,
                         report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
                         seed=0, loss_type="dft", **config)
    recorder = StepRecorder.make(vocab=VOCAB)
    t = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[recorder])
    if patched:
        dft_ops.patch_sft_trainer(t)
    return t, recorder


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_loss_type_dft_matches_trl_and_builds_no_logits(tmp_path, packing):
    extra = dict(packing=True, padding_free=True) if packing else {}
    plain, plain_rec = trainer(tmp_path / "plain", patched=False, **extra)
    plain.train()
    fused, fused_rec = trainer(tmp_path / "fused", patched=True, **extra)
    fused.train()
    a = [e["loss"] for e in plain_rec.log_history if "loss" in e]
    b = [e["loss"] for e in fused_rec.log_history if "loss" in e]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= TOL * abs(x), (a, b)
    worst = max(rel_err(fused_rec.grads[0][k], plain_rec.grads[0][k]) for k in plain_rec.grads[0])
    report = dict(trl_peak=plain_rec.memory.peak, dft_ops_peak=fused_rec.memory.peak,
                  trl_vocab_wide=plain_rec.memory.largest_vocab_wide,
                  dft_ops_vocab_wide=fused_rec.memory.largest_vocab_wide, worst_grad_rel_err=worst, losses=(a, b))
    print(f"\nTRL loss_type='dft' measurements (packing={packing}): {report}")
    assert worst < TOL, report
    assert fused_rec.memory.peak < plain_rec.memory.peak, report
    # TRL's metrics are still fed without logits
    logged = [e for e in fused_rec.log_history if "loss" in e]
    assert all(0.0 <= e["mean_token_accuracy"] <= 1.0 and e["entropy"] > 0 for e in logged)


def test_loss_type_dft_refuses_what_trl_would_reweight(tmp_path):
    t, _ = trainer(tmp_path, patched=False, steps=1)
    with pytest.raises(ValueError, match="^objective: SFTConfig\\(loss_type='dft'\\) already trains DFT"):
        dft_ops.patch_sft_trainer(t, objective=dft_ops.objectives.Power(2.0))
    with pytest.raises(ValueError, match="^label_smoothing: with SFTConfig\\(loss_type='dft'\\)"):
        dft_ops.patch_sft_trainer(t, label_smoothing=0.1)
    with pytest.raises(ValueError, match="^class_weight: with SFTConfig\\(loss_type='dft'\\)"):
        dft_ops.patch_sft_trainer(t, class_weight=torch.ones(VOCAB))
    with pytest.raises(ValueError, match="^temperature: with SFTConfig\\(loss_type='dft'\\)"):
        dft_ops.patch_sft_trainer(t, temperature=2.0)
    assert TensorMemory(VOCAB).peak == 0


@pytest.mark.slow
def test_the_readme_sft_trainer_snippet_runs_on_cpu(tmp_path, monkeypatch):
    """The README's SFTTrainer block, as written, on a CPU: a tiny saved model as ``path`` and a few
    conversations standing in for load_dataset's download (the only substitutions); it trains a step."""
    import re
    from pathlib import Path

    datasets = pytest.importorskip("datasets")
    from framework_harness import tiny_llama_dir

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "trl.SFTTrainer(" in b]
    path = tiny_llama_dir(tmp_path / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    # a chat template for the conversational records (the tiny word tokenizer has none)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}"
                               "{% endfor %}{% if add_generation_prompt %} {% endif %}")
    tokenizer.save_pretrained(path)
    records = toy_sft_records(8)
    conversations = datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        for r in records]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: conversations)
    monkeypatch.chdir(tmp_path)  # the snippet's output_dir="out"
    namespace = {"path": str(path)}
    exec(compile(snippet, "README.md", "exec"), namespace)
    losses = [e["loss"] for e in namespace["trainer"].state.log_history if "loss" in e]
    assert namespace["trainer"].state.global_step >= 1 and all(map(torch.isfinite, map(torch.tensor, losses)))
