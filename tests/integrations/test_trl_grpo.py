"""TRL ``GRPOTrainer`` with ``dft_ops.patch_grpo_trainer``: per-token log-probs and entropies from dft-ops.

A tiny Llama trains a few GRPO steps on a toy reward (sampling temperature 0.8, a KL penalty to a
reference model, an entropy bonus) twice from the same seed: with TRL's own fused head and patched.
Every per-token log-prob and entropy the trainer computes (the policy's with gradients, the old policy's
and the reference model's without), the gradients of every parameter before the first optimizer step, and
the logged losses match at fp32 tolerance; the patched run's head calls and backwards build no tensor
whose last dimension is the vocabulary (TRL's head builds its completion tokens x V chunk). Also with a PEFT (LoRA) policy, whose
reference is the same model with its adapters disabled, and TRL's ``cast_lm_head_to_fp32``.
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'dft-ops[trl]')")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
from packaging.version import Version  # noqa: E402

import dft_ops  # noqa: E402
from framework_harness import StepRecorder, TensorMemory, rel_err, tiny_llama_dir, word_tokenizer  # noqa: E402
from helpers import small_chunks  # noqa: E402

if Version(trl.__version__) < Version("1.15"):
    pytest.skip(f"TRL {trl.__version__} has no fused LM head", allow_module_level=True)

N_WORDS = 197
VOCAB = N_WORDS + 3
TOL = 1e-5


def reward_w1(completions, **_):
    """The toy reward: how often the completion says w1."""
    return [float(c.split().count("w1")) for c in completions]


class Calls:
    """Records every per-token log-prob / entropy computation of the trainer (policy, old policy, reference),
    and the largest tensor whose last dimension is the vocabulary in those calls and in every backward
    (``largest_vocab_wide``, elements; generation is not watched: its next-token logits are its own)."""

    def __init__(self, trainer):
        self.seen = []
        self.largest_vocab_wide = 0
        original = trainer._get_per_token_logps_and_entropies
        backward = trainer.accelerator.backward

        def recorded(*args, **kwargs):
            with TensorMemory(VOCAB) as memory:
                logps, entropies, aux = original(*args, **kwargs)
            self.largest_vocab_wide = max(self.largest_vocab_wide, memory.largest_vocab_wide)
            self.seen.append((logps.detach().clone(), None if entropies is None else entropies.detach().clone()))
            return logps, entropies, aux

        def watched_backward(*args, **kwargs):
            with TensorMemory(VOCAB) as memory:
                out = backward(*args, **kwargs)
            self.largest_vocab_wide = max(self.largest_vocab_wide, memory.largest_vocab_wide)
            return out

        trainer._get_per_token_logps_and_entropies = recorded
        trainer.accelerator.backward = watched_backward


def make_trainer(tmp_path, *, patched, peft=False, steps=3, **config):
    # on disk: GRPO loads its reference model (beta > 0) from the policy's path
    model_dir = tiny_llama_dir(tmp_path / "model", n_words=N_WORDS)
    tokenizer = word_tokenizer(N_WORDS)
    prompts = [" ".join(f"w{(7 * i + 3 * j) % N_WORDS}" for j in range(4 + i % 3)) for i in range(8)]
    data = datasets.Dataset.from_dict({"prompt": prompts})
    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, learning_rate=1e-2, beta=0.1, entropy_coef=0.05, temperature=0.8,
                          bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                          disable_tqdm=True, seed=0, model_init_kwargs={"dtype": torch.float32}, **config)
    peft_config = None
    if peft:
        peft_lib = pytest.importorskip("peft")
        peft_config = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    recorder = StepRecorder.make(vocab=VOCAB)
    trainer = trl.GRPOTrainer(model=str(model_dir), reward_funcs=reward_w1, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[recorder], peft_config=peft_config)
    if patched:
        dft_ops.patch_grpo_trainer(trainer, backend="torch")
    return trainer, recorder, Calls(trainer)


def _run(tmp_path, **kwargs):
    results = []
    for patched in (False, True):
        trainer, recorder, calls = make_trainer(tmp_path / str(patched), patched=patched, **kwargs)
        trainer.train()
        results.append((trainer, recorder, calls))
    return results


def _compare(plain, fused, *, calls_at_least):
    (_, plain_rec, plain_calls), (trainer, fused_rec, fused_calls) = plain, fused
    assert len(plain_calls.seen) == len(fused_calls.seen) >= calls_at_least
    for (lp, ent), (flp, fent) in zip(plain_calls.seen, fused_calls.seen):
        assert lp.shape == flp.shape and (lp != 0).any()
        assert rel_err(flp, lp) < TOL, rel_err(flp, lp)
        if ent is not None:
            assert rel_err(fent, ent) < TOL, rel_err(fent, ent)
    grads, fused_grads = plain_rec.grads[0], fused_rec.grads[0]
    assert grads.keys() == fused_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert rel_err(fused_grads[name], g) < 1e-4, (name, rel_err(fused_grads[name], g))
    losses = [e["loss"] for e in plain_rec.log_history if "loss" in e]
    fused_losses = [e["loss"] for e in fused_rec.log_history if "loss" in e]
    assert len(losses) == len(fused_losses) == 3
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(losses, fused_losses)), (losses, fused_losses)
    assert dft_ops.patching.patch_state(trainer.model).calls > 0


@pytest.mark.slow
def test_grpo_matches_trl_and_builds_no_logits(tmp_path, monkeypatch):
    small_chunks(monkeypatch, tokens=16, vocab=64)  # so that no block of dft-ops is vocabulary-wide either
    plain, fused = _run(tmp_path)
    # per step: the policy with gradients, and (beta > 0) the reference model
    _compare(plain, fused, calls_at_least=6)
    largest, fused_largest = plain[2].largest_vocab_wide, fused[2].largest_vocab_wide
    assert largest >= 16 * VOCAB  # TRL's head: its chunk of (completion tokens) x V, forward and backward
    assert fused_largest == 0  # dft-ops' blocks are 16 x 64 here: nothing vocabulary-wide at all
    assert dft_ops.patching.patch_state(fused[0].ref_model).calls > 0


@pytest.mark.slow
def test_grpo_with_a_peft_policy(tmp_path):
    pytest.importorskip("peft")
    plain, fused = _run(tmp_path, peft=True)
    _compare(plain, fused, calls_at_least=6)


@pytest.mark.slow
def test_grpo_with_the_head_cast_to_fp32(tmp_path):
    plain, fused = _run(tmp_path, cast_lm_head_to_fp32=True)
    _compare(plain, fused, calls_at_least=6)


def test_refusals(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, patched=False, steps=1)
    with pytest.raises(TypeError, match="^temperature: not an option of patch_grpo_trainer"):
        dft_ops.patch_grpo_trainer(trainer, temperature=2.0)
    with pytest.raises(TypeError, match="^trainer: expected a trl.GRPOTrainer"):
        dft_ops.patch_grpo_trainer(object())
    # a plain patch does not answer GRPO's calls: TRL's head would run instead, so it refuses with the fix
    dft_ops.patch(trainer.model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(dft_ops.PatchError, match="patch_grpo_trainer"):
        trainer.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
