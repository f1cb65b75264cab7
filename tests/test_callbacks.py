"""TokenStatsRecorder sums against direct computation; TokenStatsCallback in short Trainer runs."""

import numpy as np
import sys

import pytest
import torch
from torch import nn

import dft_ops
from dft_ops.callbacks import (CE_LOSS, ENTROPY, LABEL_PROB, TOKENS, TOP1, TokenStatsRecorder, attach_recorder,
                               recorder_of)
from helpers import make_inputs

STAT_KEYS = {LABEL_PROB, ENTROPY, TOP1, CE_LOSS, TOKENS}


def test_recorder_matches_direct_computation(device):
    rec = TokenStatsRecorder(bins=10)
    batches = []
    for shape in ((2, 9), (3, 5)):
        hidden, weight, labels, _ = make_inputs(shape, 16, 40, torch.float32, device, scale=8.0, ignore_frac=0.3)
        labels[0, 0] = dft_ops.naive.logits(hidden[0, 0], weight).argmax()  # at least one top-1 hit
        _, stats = dft_ops.linear_cross_entropy(hidden, weight, labels, return_stats=True)
        mask = labels != -100
        rec.record(stats, mask)
        batches.append((stats, mask))
    out = rec.collect()
    logp = torch.cat([s.logprob[m] for s, m in batches]).double()
    entropy = torch.cat([s.entropy[m] for s, m in batches]).double()
    top1 = torch.cat([s.is_top1[m] for s, m in batches]).double()
    assert out[TOKENS] == logp.numel()
    assert out[LABEL_PROB] == pytest.approx(logp.exp().mean().item(), rel=1e-9)
    assert out[ENTROPY] == pytest.approx(entropy.mean().item(), rel=1e-9)
    assert out[TOP1] == pytest.approx(top1.mean().item(), rel=1e-9) and 0 < out[TOP1] < 1
    assert out[CE_LOSS] == pytest.approx(-logp.mean().item(), rel=1e-9)
    counts, _ = np.histogram(logp.exp().cpu().numpy(), bins=10, range=(0.0, 1.0))
    fractions = [out[k] for k in rec.histogram_keys()]
    assert fractions == pytest.approx((counts / counts.sum()).tolist(), abs=1e-12)
    assert rec.histogram_keys()[0] == "token_label_prob_hist/0-0.1"
    assert rec.collect() is None  # collect resets


def test_recorder_edges_disabled_and_bad_mask():
    rec = TokenStatsRecorder(bins=4)
    stats = dft_ops.TokenStats(logprob=torch.tensor([0.0, -20.0, -0.5, -3.0]), entropy=torch.zeros(4),
                               is_top1=torch.tensor([True, False, False, True]))
    rec.record(stats, torch.tensor([True, True, False, True]))
    out = rec.collect()
    hist = [out[k] for k in rec.histogram_keys()]
    assert out[TOKENS] == 3 and hist == pytest.approx([2 / 3, 0, 0, 1 / 3])  # p == 1 lands in the last bin
    rec.enabled = False
    rec.record(stats, torch.ones(4, dtype=torch.bool))
    assert rec.collect() is None
    rec.enabled = True
    with pytest.raises(ValueError, match="^mask"):
        rec.record(stats, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="^mask"):
        rec.record(stats, torch.ones(4))
    with pytest.raises(ValueError, match="^bins"):
        TokenStatsRecorder(bins=0)


def test_attach_reaches_wrapped_models():
    class Inner(nn.Module):  # stands in for a Hugging Face model inside a PEFT-style wrapper
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.lm_head

    wrapper = nn.Sequential(nn.Sequential(Inner()))
    rec = TokenStatsRecorder()
    attach_recorder(wrapper, rec)
    inner = wrapper[0][0]
    assert recorder_of(wrapper) is rec and recorder_of(inner) is rec
    assert recorder_of(inner.lm_head) is None and recorder_of(wrapper[0]) is None
    assert "lm_head.weight" in inner.state_dict() and len(inner.state_dict()) == 2  # nothing added to the weights
    attach_recorder(wrapper, None)
    assert recorder_of(inner) is None


# --- short Trainer runs -------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
VOCAB, SEQ = 53, 12


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, :3] = -100  # a prompt

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def training_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  learning_rate=1e-2, max_steps=4, logging_steps=1, save_strategy="no", report_to="none",
                  use_cpu=True, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


class Reporter(transformers.TrainerCallback):
    """A logging integration: sees the log records in callback order."""

    def __init__(self):
        self.records = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.records.append(dict(logs))


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_callback_logs_the_promised_keys_with_a_custom_compute_loss(tmp_path):
    """The plain route: compute_loss asks for stats and records them; eval batches are not counted."""

    class StatsTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            hidden = model.model(**inputs).last_hidden_state
            loss, stats = dft_ops.linear_cross_entropy(hidden, model.lm_head.weight, labels, objective="ce",
                                                       shift=True, return_stats=True)
            stats_callback.record(stats, labels[..., 1:] != -100)  # ignored outside training steps
            return (loss, {"loss": loss}) if return_outputs else loss

    reporter = Reporter()
    args = training_args(tmp_path, eval_strategy="steps", eval_steps=2, prediction_loss_only=True)
    trainer = StatsTrainer(model=tiny_llama(), args=args, train_dataset=TokenData(16, 0),
                           eval_dataset=TokenData(8, 1), callbacks=[reporter])
    stats_callback = dft_ops.TokenStatsCallback.add_to(trainer, log_histogram=True)
    trainer.train()

    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(train_logs) == 4
    hist_keys = stats_callback.recorder.histogram_keys()
    for record in train_logs:
        assert STAT_KEYS | set(hist_keys) <= set(record)
        # one step per record, CE objective: the plain cross-entropy is the Trainer's loss
        assert record[CE_LOSS] == pytest.approx(record["loss"], rel=1e-4)
        assert record[TOKENS] == 4 * (SEQ - 3)  # training tokens only, evaluation batches excluded
        assert 0 < record[LABEL_PROB] < 1 and 0 <= record[TOP1] <= 1 and record[ENTROPY] > 0
        assert sum(record[k] for k in hist_keys) == pytest.approx(1.0)
    # the reporting integration (called before callbacks given to the Trainer) saw the same keys
    reported = [r for r in reporter.records if "loss" in r]
    assert [r[CE_LOSS] for r in reported] == [r[CE_LOSS] for r in train_logs]
    assert len(stats_callback.histograms) == 4 and stats_callback.histograms[-1][0] == 4
    assert any("eval_loss" in r and CE_LOSS not in r for r in trainer.state.log_history)


class TinyPatchedLM(nn.Module):
    """Stands in for a model patched by dft-ops: its forward records stats when a recorder is attached."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.lm_head = nn.Linear(24, VOCAB, bias=False)

    def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
        hidden = self.embed(input_ids)
        recorder = recorder_of(self)
        want_stats = recorder is not None and self.training
        out = dft_ops.linear_cross_entropy(hidden, self.lm_head.weight, labels, objective="dft", shift=True,
                                           return_stats=want_stats, num_items_in_batch=num_items_in_batch)
        if want_stats:
            loss, stats = out
            recorder.record(stats, labels[..., 1:] != -100)
        else:
            loss = out
        return {"loss": loss}


def test_callback_feeds_from_a_patched_forward_with_gradient_accumulation(tmp_path):
    model = TinyPatchedLM()
    args = training_args(tmp_path, gradient_accumulation_steps=2, logging_steps=2, per_device_train_batch_size=2)
    stats_callback = dft_ops.TokenStatsCallback(bins=5)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(16, 0),
                                   callbacks=[stats_callback])
    trainer.train()
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(train_logs) == 2
    for record in train_logs:
        # 2 optimizer steps x 2 micro-batches x 2 sequences per record
        assert record[TOKENS] == 8 * (SEQ - 3)
        # the histogram is kept on the callback, not added to every log line (log_histogram=False)
        assert record[CE_LOSS] > 0 and not [k for k in record if k.startswith("token_label_prob_hist/")]
    assert [len(fractions) for _, fractions in stats_callback.histograms] == [5, 5]
    assert all(sum(fractions) == pytest.approx(1.0) for _, fractions in stats_callback.histograms)
    assert recorder_of(model) is None  # detached when training ends


def test_callback_feeds_from_dft_ops_patch(tmp_path):
    """The real patch(): its fused loss asks for stats while a callback's recorder is attached."""
    model = dft_ops.patch(tiny_llama(), objective="dft")
    args = training_args(tmp_path, logging_steps=2, per_device_train_batch_size=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(16, 0))
    dft_ops.TokenStatsCallback.add_to(trainer, bins=4, log_histogram=True)
    trainer.train()
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert train_logs
    for record in train_logs:
        assert record[TOKENS] > 0 and 0 < record["token_label_prob"] < 1
        assert record[CE_LOSS] > 0 and len([k for k in record if k.startswith("token_label_prob_hist/")]) == 4
    assert recorder_of(model) is None


def test_callback_warns_when_integrations_would_miss_it(tmp_path):
    stats_callback = dft_ops.TokenStatsCallback()
    args = training_args(tmp_path)
    args.report_to = ["tensorboard"]  # only read by the callback here; no integration is created
    with pytest.warns(UserWarning, match="add_to"):
        stats_callback.on_train_begin(args, None, None, model=None)


def test_callback_errors_name_what_is_wrong(monkeypatch):
    with pytest.raises(TypeError, match="^trainer: expected a transformers.Trainer"):
        dft_ops.TokenStatsCallback.add_to(object())
    with pytest.raises(TypeError, match="^log_histogram: "):
        dft_ops.TokenStatsCallback(log_histogram="yes")
    from dft_ops import callbacks

    monkeypatch.setattr(callbacks, "_CALLBACK_CLASS", None)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    with pytest.raises(ModuleNotFoundError, match=r"needs transformers: pip install 'dft-ops\[hf\]'"):
        dft_ops.TokenStatsCallback
