"""A patched model in transformers.Trainer and TRL's SFTTrainer (tiny models, in-memory data, CPU)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import dft_ops  # noqa: E402
from dft_ops.patching import patch_state  # noqa: E402

from helpers import rel_err  # noqa: E402

V = 67
COMMON_ARGS = dict(report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0)


def tiny_llama(seed=0, vocab=V):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=None,
                                      eos_token_id=1)
    return transformers.LlamaForCausalLM(config)


class Sequences(torch.utils.data.Dataset):
    """Fixed random sequences; the first `prompt[i]` labels of sequence i are masked (-100)."""

    def __init__(self, n, length, prompt_lengths, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(2, V, (n, length), generator=g)
        self.labels = self.input_ids.clone()
        for i in range(n):
            self.labels[i, : prompt_lengths[i % len(prompt_lengths)]] = -100

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones_like(self.input_ids[i]),
                "labels": self.labels[i]}


def first_and_last_losses(trainer, k=3):
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def test_trainer_trains_a_patched_model(tmp_path):
    model = dft_ops.patch(tiny_llama(), objective="ce")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=15, per_device_train_batch_size=4,
                                          learning_rate=1e-2, **COMMON_ARGS)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(8, 16, [0, 3, 6]))
    assert trainer.model_accepts_loss_kwargs  # the kept signature lets Trainer pass num_items_in_batch
    trainer.train()
    first, last = first_and_last_losses(trainer)
    assert last < first - 0.5, (first, last)
    assert patch_state(model).calls == 15  # every step's loss came from dft-ops


def test_trainer_survives_a_step_whose_labels_are_all_ignored(tmp_path):
    """Trainer passes num_items_in_batch=0 for a step with no label to train on: loss 0 and zero
    gradients (the all-ignored convention), not a ValueError that kills the run midway."""
    model = dft_ops.patch(tiny_llama(), objective="dft")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, **COMMON_ARGS)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(8, 16, [16]))  # all masked
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("num_items_in_batch")),
                                    with_kwargs=True)
    trainer.train()
    assert [int(n) for n in seen] == [0, 0]  # what Trainer really passes
    assert patch_state(model).calls == 2
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry] == [0.0, 0.0]
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_trainer_computing_its_own_loss_is_warned_about(tmp_path):
    # label_smoothing_factor makes Trainer pop the labels and smooth full logits itself: not the patch's objective
    model = dft_ops.patch(tiny_llama(), objective="dft")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          label_smoothing_factor=0.1, **COMMON_ARGS)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(8, 16, [0, 3]))
    with pytest.warns(UserWarning, match="label_smoothing=") as record:
        trainer.train()
    assert sum("without labels returns full logits" in str(w.message) for w in record) == 1  # once per patch
    assert patch_state(model).calls == 0
    # the fix the warning names: smoothing inside the fused loss, no warning
    dft_ops.patch(model, objective="dft", label_smoothing=0.1)
    trainer.label_smoother = None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dft_ops.patch")
        trainer.train()
    assert patch_state(model).calls == 2


class GradientSnapshot(transformers.TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(tmp_path, objective, batch_size, accumulation):
    model = dft_ops.patch(tiny_llama(), objective=objective)
    snapshot = GradientSnapshot()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1e-3, max_grad_norm=0.0, **COMMON_ARGS)
    # very different numbers of trained tokens per sequence: a mean of per-micro-batch means would differ
    data = Sequences(4, 14, [0, 11, 2, 12], seed=3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[snapshot])
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, snapshot.grads, data


@pytest.mark.parametrize("objective", ["ce", "dft"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, objective):
    loss_big, grads_big, data = one_step(tmp_path, objective, batch_size=4, accumulation=1)
    loss_acc, grads_acc, _ = one_step(tmp_path, objective, batch_size=2, accumulation=2)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for name in grads_big:
        assert rel_err(grads_acc[name], grads_big[name]) < 1e-5, name

    # and both are the loss of the whole batch computed once, from the unpatched model's logits
    model = tiny_llama()
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "labels")}
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    logp = F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = -logp if objective == "ce" else -logp.exp().detach() * logp
    reference = per_token[targets != -100].mean()
    reference.backward()
    assert loss_big == pytest.approx(reference.item(), rel=1e-4)  # Trainer logs it rounded
    for name, p in model.named_parameters():
        assert rel_err(grads_big[name], p.grad) < 1e-5, name


# ------------------------------------------------------------------------------------------- TRL SFTTrainer


def word_tokenizer(n_words):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def word_dataset(n_docs, n_words, seed=0):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(seed)
    texts = []
    for start in range(n_docs):  # learnable: each document walks the vocabulary with a stride of 3
        length = int(torch.randint(4, 13, (1,), generator=g))
        texts.append(" ".join(f"w{(start + 3 * k) % n_words}" for k in range(length)))
    return datasets.Dataset.from_dict({"text": texts})


def sft_trainer(tmp_path, objective, max_steps, order="trainer, patch_sft_trainer", wrap_model=None,
                patch_options=None, **config):
    """A tiny SFTTrainer; ``order`` says how dft-ops is applied (comma-separated steps, in order).

    Steps: "patch" (dft_ops.patch(model, objective)), "trainer" (build the SFTTrainer),
    "patch_sft_trainer" (dft_ops.patch_sft_trainer(trainer, objective, **patch_options)).
    ``wrap_model(model)`` (e.g. PEFT) gives the model the trainer trains.
    """
    trl = pytest.importorskip("trl")
    n_words = 60
    tokenizer = word_tokenizer(n_words)
    model = tiny_llama(vocab=len(tokenizer))
    if wrap_model is not None:
        model = wrap_model(model)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                         learning_rate=1e-2, max_length=48, bf16=False, **COMMON_ARGS, **config)
    trainer = None
    for step in order.split(", "):
        if step == "patch":
            dft_ops.patch(model, objective=objective)
        elif step == "trainer":
            trainer = trl.SFTTrainer(model=model, args=args, train_dataset=word_dataset(32, n_words),
                                     processing_class=tokenizer)
        else:
            assert step == "patch_sft_trainer", step
            dft_ops.patch_sft_trainer(trainer, objective=objective, **(patch_options or {}))
    return trainer, model


def test_sft_trainer_packed_padding_free_trains(tmp_path):
    trainer, model = sft_trainer(tmp_path, "ce", max_steps=12, packing=True, padding_free=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch  # packed, padding-free
    trainer.train()
    first, last = first_and_last_losses(trainer)
    assert last < first - 0.3, (first, last)
    assert patch_state(model).calls == 12
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    accuracy = [entry["mean_token_accuracy"] for entry in logged]
    assert all(0.0 <= a <= 1.0 for a in accuracy) and accuracy[-1] > accuracy[0]
    assert all(0.0 < entry["entropy"] <= torch.log(torch.tensor(float(V))).item() + 1e-3 for entry in logged)


@pytest.mark.parametrize("order", ["trainer, patch_sft_trainer", "patch, trainer, patch_sft_trainer",
                                   "trainer, patch, patch_sft_trainer"])
def test_sft_trainer_loss_and_metrics_match_reference(tmp_path, order):
    """One packed batch: the loss SFTTrainer computes is DFT of the unpatched logits; so are its metrics.

    Whenever patch_sft_trainer comes last, whatever dft_ops.patch did before (below or above TRL's head).
    """
    trainer, model = sft_trainer(tmp_path, "dft", max_steps=1, order=order, packing=True, padding_free=True)
    inputs = next(iter(trainer.get_train_dataloader()))
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    assert patch_state(model).calls == 1
    grads = torch.autograd.grad(loss, list(model.parameters()))

    plain = {k: v for k, v in inputs.items() if k != "labels"}
    dft_ops.unpatch(model)
    logits = model.forward(**plain, use_cache=False).logits[:, :-1]
    targets = inputs["labels"][:, 1:]
    valid = targets != -100
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    reference = (-logp.exp().detach() * logp)[valid].sum() / valid.sum()
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    assert rel_err(loss.detach(), reference.detach()) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5

    metrics = trainer._metrics["train"]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    assert metrics["entropy"][-1] == pytest.approx(entropy[valid].mean().item(), rel=1e-5)
    accuracy = (logits.argmax(-1) == targets)[valid].float().mean().item()
    assert metrics["mean_token_accuracy"][-1] == pytest.approx(accuracy, abs=1e-6)


def test_patch_sft_trainer_refuses_what_it_cannot_serve(tmp_path):
    trl = pytest.importorskip("trl")
    trainer, _ = sft_trainer(tmp_path, "dft", max_steps=1)
    trainer.args.loss_type = "dft"  # served (TRL's DFT on dft-ops' log-probs), but not with another objective
    with pytest.raises(ValueError, match="^objective: SFTConfig\\(loss_type='dft'\\)"):
        dft_ops.patch_sft_trainer(trainer, objective="ce")
    trainer.args.loss_type = "other"
    with pytest.raises(ValueError, match="^trainer: SFTConfig\\(loss_type='other'\\)"):
        dft_ops.patch_sft_trainer(trainer)
    plain = transformers.Trainer(model=tiny_llama(), args=transformers.TrainingArguments(str(tmp_path), **COMMON_ARGS))
    with pytest.raises(TypeError, match="^trainer"):
        dft_ops.patch_sft_trainer(plain)
    assert trl is not None


def test_patch_sft_trainer_without_trl(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    with pytest.raises(ImportError, match="needs TRL"):
        dft_ops.patch_sft_trainer(object())


@pytest.mark.parametrize("order", ["patch, trainer", "trainer, patch"])
def test_a_plain_patch_never_lets_trl_train_another_objective(tmp_path, order):
    """dft_ops.patch without patch_sft_trainer: SFTTrainer's fused-head call raises with the fix, in either order.

    Patched first, TRL's head wraps the patch and answers its calls itself (the backbone guard notices);
    patched after, the call reaches the patch, which does not serve TRL's protocol.
    """
    trainer, model = sft_trainer(tmp_path, "dft", max_steps=1, order=order)
    inputs = next(iter(trainer.get_train_dataloader()))
    model.train()
    with pytest.raises(dft_ops.PatchError, match="^model: TRL .*patch_sft_trainer"):
        trainer.compute_loss(model, dict(inputs))
    model.eval()
    with pytest.raises(dft_ops.PatchError, match="patch_sft_trainer"), torch.no_grad():
        trainer.compute_loss(model, dict(inputs))
    assert patch_state(model).calls == 0
    # generation and the model's ordinary calls still work through both heads
    assert model(input_ids=inputs["input_ids"]).logits.shape[-1] == model.config.vocab_size
