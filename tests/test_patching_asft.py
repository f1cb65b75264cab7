"""dft_ops.patch with objective ASFT: a frozen reference model, or a PEFT model's adapters disabled (tiny, CPU).

The expected loss and gradients are written out here in float64 from both
models' materialized logits (the unpatched model's own forward, and the
reference's forward in eval mode under no_grad): per token the base
objective's value plus ``kl_coef`` times the KL of the two softmaxes, the
mean over the non-ignored tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import dft_ops  # noqa: E402
from dft_ops.objectives import ASFT  # noqa: E402
from dft_ops.patching import HeadTransform, PatchError, patch_state  # noqa: E402

from helpers import rel_err  # noqa: E402
from test_patching import V, assert_same_grads, build, grads_of, make_batch  # noqa: E402


def token_terms(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, direction: str):
    """Per loss position (causal shift) in float64: DFT's value, the KL, and the mask of non-ignored tokens."""
    z, r, targets = logits[:, :-1].double(), ref_logits[:, :-1].double(), labels[:, 1:]
    valid = targets != -100
    logp_all, logq_all = F.log_softmax(z, -1), F.log_softmax(r, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    dft = -logp.exp().detach() * logp
    if direction == "forward":  # KL(q || p)
        kl = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
    else:  # KL(p || q)
        kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
    return dft, kl, valid


def asft_from_logits(logits, ref_logits, labels, kl_coef, direction):
    dft, kl, valid = token_terms(logits, ref_logits, labels, direction)
    return (dft + kl_coef * kl)[valid].sum() / valid.sum()


def reference_logits(reference: nn.Module, input_ids) -> torch.Tensor:
    training = reference.training
    reference.eval()
    with torch.no_grad():
        logits = reference(input_ids=input_ids).logits
    reference.train(training)
    return logits


def head_calls(monkeypatch, *heads):
    """Counts nn.Linear.forward calls of the given heads: neither may run (no logits) in a fused call."""
    counts = {id(h): 0 for h in heads}
    original = nn.Linear.forward

    def counting(self, x):
        if id(self) in counts:
            counts[id(self)] += 1
        return original(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counting)
    return counts


# reference family -> the transform the probe must find on it (the model is always llama, D=32)
REFERENCES = {
    "qwen2": HeadTransform(),  # another family, same vocabulary
    "gemma2": HeadTransform(softcap=1.5),  # a soft-capped reference head
    "cohere": HeadTransform(scale=0.5),  # a logit-scaled reference head
    "phi": HeadTransform(),  # a reference head with a bias
}


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("ref_family", REFERENCES)
def test_frozen_reference_loss_and_gradients(ref_family, direction, monkeypatch, backend_options=None):
    model, reference = build("llama"), build(ref_family, seed=5)
    input_ids, labels = make_batch()
    ref_logits = reference_logits(reference, input_ids)
    logits = model(input_ids=input_ids).logits
    want = asft_from_logits(logits, ref_logits, labels, 0.3, direction)
    want_grads = grads_of(model, want)
    _, want_kl, valid = token_terms(logits.detach(), ref_logits, labels, direction)

    asft = ASFT(0.3, direction=direction)
    dft_ops.patch(model, objective=asft, reference=reference, return_stats=True, **(backend_options or {}))
    assert patch_state(model).reference.transform == REFERENCES[ref_family]
    calls = head_calls(monkeypatch, model.get_output_embeddings(), reference.get_output_embeddings())
    out = model(input_ids=input_ids, labels=labels)
    assert out.logits is None and set(calls.values()) == {0}, "a head ran: logits were built"
    assert rel_err(out.loss.detach(), want.detach()) < 1e-5
    got = grads_of(model, out.loss)
    assert_same_grads(got, want_grads)
    assert all(p.grad is None for p in reference.parameters())  # the reference gets no gradient
    assert reference.training  # its training flag is restored after the eval-mode reference pass
    kl = out.token_stats.kl
    assert kl.shape == valid.shape and bool((kl[~valid] == 0).all())
    assert rel_err(kl[valid], want_kl[valid]) < 1e-4
    assert not asft.has_reference and asft == ASFT(0.3, direction=direction)  # the patch-time objective holds no tensor


@pytest.mark.parametrize("backward_mode, ref_family, direction", [("gemm", "gemma2", "reverse"),
                                                                    ("fused", "phi", "forward")])
def test_frozen_reference_on_the_triton_backend(backward_mode, ref_family, direction, monkeypatch):
    """The same through the Triton kernels (the interpreter without a GPU): a soft-capped or biased reference."""
    test_frozen_reference_loss_and_gradients(ref_family, direction, monkeypatch,
                                             backend_options=dict(backend="triton", backward_mode=backward_mode))


@pytest.mark.parametrize("reference", ["frozen", "adapters_disabled"])
def test_no_tokens_x_vocabulary_tensor_for_either_model(reference, monkeypatch):
    from helpers import OutputsSeen, small_chunks

    small_chunks(monkeypatch, tokens=32, vocab=64)
    if reference == "frozen":
        model, ref = build("llama"), build("gemma2", seed=2)
    else:
        model, ref = lora_model(), "adapters_disabled"
    dft_ops.patch(model, objective=ASFT(0.5, direction="reverse"), reference=ref)
    input_ids, labels = make_batch(batch=16, seq=10)  # short rows: attention scores stay small too
    N = labels.numel()
    with OutputsSeen() as watch:
        model(input_ids=input_ids, labels=labels).loss.backward()
    largest = max(numel for numel, _ in watch.seen)
    # the largest legitimate tensors are the heads' weights (V x D) and gradients; logits would be N x V
    assert largest < N * V / 2, (largest, N * V)
    assert largest >= V * 32


def test_reference_equal_to_the_model_gives_kl_zero_and_the_base_gradient():
    model = build("gemma2")  # soft-capped: both heads go through the same cap
    input_ids, labels = make_batch()
    dft_ops.patch(model, objective="dft")
    reference = copy.deepcopy(model)  # patched itself: probed and run as the model it wraps
    plain = model(input_ids=input_ids, labels=labels)
    plain_grads = grads_of(model, plain.loss)
    for direction in ("forward", "reverse"):
        dft_ops.patch(model, objective=ASFT(2.0, direction=direction), reference=reference, return_stats=True)
        out = model(input_ids=input_ids, labels=labels)
        assert out.token_stats.kl.abs().max() < 1e-5
        assert rel_err(out.loss.detach(), plain.loss.detach()) < 1e-5
        assert_same_grads(grads_of(model, out.loss), plain_grads, tol=1e-4)


def lora_model(seed=0):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(build("llama", seed=seed),
                               peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero (adapters off = on): make the adapters change the model
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return lora


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_peft_reference_is_the_model_with_adapters_disabled(direction, monkeypatch):
    lora = lora_model()
    input_ids, labels = make_batch()
    with lora.disable_adapter():
        ref_logits = reference_logits(lora, input_ids)
    assert rel_err(ref_logits, lora(input_ids=input_ids).logits.detach()) > 1e-2  # the adapters matter
    want = asft_from_logits(lora(input_ids=input_ids).logits, ref_logits, labels, 0.5, direction)
    want_grads = grads_of(lora, want)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}

    dft_ops.patch(lora, objective=ASFT(0.5, direction=direction), reference="adapters_disabled")
    calls = head_calls(monkeypatch, lora.get_output_embeddings())
    out = lora(input_ids=input_ids, labels=labels)
    assert out.logits is None and set(calls.values()) == {0}
    assert rel_err(out.loss.detach(), want.detach()) < 1e-5
    got = grads_of(lora, out.loss)
    assert any("lora_B" in n for n in got)
    assert_same_grads(got, want_grads)
    # the adapters are on again, trainable as before, and the model is in training mode
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == trainable
    assert all(not m._disable_adapters for m in dft_ops.patching.reference.adapter_layers(lora))
    assert all(m.training for m in lora.modules())


def test_adapters_disabled_refuses_a_trainable_base():
    """A trainable parameter outside the adapters would make the base-model reference drift with training."""
    lora = lora_model()
    head = lora.get_output_embeddings()
    head.weight.requires_grad_(True)
    with pytest.raises(PatchError, match="^reference: 'adapters_disabled' .* outside the adapters"):
        dft_ops.patch(lora, objective=ASFT(0.1), reference="adapters_disabled")
    head.weight.requires_grad_(False)
    dft_ops.patch(lora, objective=ASFT(0.1), reference="adapters_disabled")
    head.weight.requires_grad_(True)  # unfrozen after patching: refused at the next training call
    input_ids, labels = make_batch()
    with pytest.raises(PatchError, match="outside the adapters"):
        lora(input_ids=input_ids, labels=labels)


def test_reference_runs_without_dropout():
    """A reference left in training mode with dropout: the anchor is its eval-mode distribution, every call."""
    model, reference = build("llama"), build("qwen2", seed=5)
    for module in reference.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    input_ids, labels = make_batch()
    ref_logits = reference_logits(reference, input_ids)
    assert rel_err(reference(input_ids=input_ids).logits.detach(), ref_logits) > 1e-2  # dropout is live in train mode
    want = asft_from_logits(model(input_ids=input_ids).logits, ref_logits, labels, 0.3, "reverse")
    dft_ops.patch(model, objective=ASFT(0.3, direction="reverse"), reference=reference)
    for _ in range(2):
        assert rel_err(model(input_ids=input_ids, labels=labels).loss.detach(), want.detach()) < 1e-5
    assert reference.training


def test_packed_rows_need_the_same_attention_in_both_models():
    model, reference = build("llama"), build("qwen2", seed=5)
    model.config._attn_implementation = "eager"
    reference.config._attn_implementation = "sdpa"
    dft_ops.patch(model, objective=ASFT(0.1), reference=reference)
    input_ids, labels = make_batch(batch=1)
    position_ids = torch.cat([torch.arange(6), torch.arange(7)])[None]  # two packed documents
    with pytest.raises(ValueError, match="^reference: packed rows .*'eager'.*'sdpa'"):
        model(input_ids=input_ids, labels=labels, position_ids=position_ids)
    model(input_ids=input_ids, labels=labels)  # unpacked rows read the same under any implementation
    reference.config._attn_implementation = "eager"
    assert torch.isfinite(model(input_ids=input_ids, labels=labels, position_ids=position_ids).loss)


def test_no_second_copy_and_sharing_under_deepcopy():
    model, reference = build("llama"), build("qwen2", seed=3)
    dft_ops.patch(model, objective=ASFT(0.1), reference=reference)
    # the reference is not a submodule: its parameters never reach the optimizer or the state dict
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in reference.parameters())
    assert not any(k.startswith("model.layers") and "qwen" in k for k in model.state_dict())
    clone = copy.deepcopy(model)
    assert patch_state(clone).reference.model is reference  # the frozen reference is shared, not copied


@pytest.mark.parametrize("make, error, fragment", [
    (lambda m: dict(objective=ASFT(0.1)), ValueError, "^reference: objective ASFT needs"),
    (lambda m: dict(objective="dft", reference=build("qwen2")), ValueError, "^reference: only ASFT"),
    (lambda m: dict(objective=ASFT(0.1), reference=m), ValueError, "^reference: is the trained model itself"),
    (lambda m: dict(objective=ASFT(0.1), reference="adapters_disabled"), PatchError, "^reference: 'adapters_disabled'"),
    (lambda m: dict(objective=ASFT(0.1), reference="base"), ValueError, "^reference: expected"),
    (lambda m: dict(objective=ASFT(0.1), reference=3), TypeError, "^reference: expected"),
    (lambda m: dict(objective=ASFT(0.1).with_reference(torch.randn(2, 32), torch.randn(V, 32)),
                    reference=build("qwen2")), ValueError, "^objective: "),
])
def test_bad_references_are_refused(make, error, fragment):
    model = build("llama")
    with pytest.raises(error, match=fragment):
        dft_ops.patch(model, **make(model))


def test_reference_with_another_vocabulary_is_refused():
    model = build("llama")
    other = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V + 1, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(PatchError, match="^reference: its output head has 132 rows"):
        dft_ops.patch(model, objective=ASFT(0.1), reference=other)


# ------------------------------------------------------------------------------------------------ trainers


def test_trainer_logs_the_kl_to_the_reference(tmp_path):
    """transformers.Trainer + TokenStatsCallback: the reference is the initial model, so the KL starts at 0."""
    from test_trainers import COMMON_ARGS, Sequences, tiny_llama

    model = tiny_llama()
    reference = copy.deepcopy(model)
    dft_ops.patch(model, objective=ASFT(0.2, direction="reverse"), reference=reference)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                                          learning_rate=1e-2, **COMMON_ARGS)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(8, 16, [0, 3, 6]))
    dft_ops.TokenStatsCallback.add_to(trainer)
    trainer.train()
    kl = [entry["token_kl"] for entry in trainer.state.log_history if "token_kl" in entry]
    assert len(kl) == 8 and abs(kl[0]) < 1e-5 and kl[-1] > 1e-3, kl
    assert patch_state(model).calls == 8
    assert all(p.grad is None for p in reference.parameters())


@pytest.mark.parametrize("kind", ["frozen", "adapters_disabled"])
def test_sft_trainer_packed_loss_matches_float64(tmp_path, kind):
    """patch_sft_trainer with ASFT: one packed, padding-free batch; both models see the same position_ids."""
    from test_trainers import sft_trainer

    peft = pytest.importorskip("peft")
    kept = {}

    def wrap(model):
        if kind == "frozen":
            kept["reference"] = copy.deepcopy(model)
            with torch.no_grad():
                for p in kept["reference"].parameters():
                    p.add_(0.05 * torch.randn_like(p))
            return model
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        return lora

    reference = (lambda: kept["reference"]) if kind == "frozen" else (lambda: "adapters_disabled")
    trainer, model = sft_trainer(tmp_path, None, max_steps=1, packing=True, padding_free=True, wrap_model=wrap,
                                 order="trainer")
    dft_ops.patch_sft_trainer(trainer, objective=ASFT(0.4), reference=reference())
    inputs = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in inputs and "attention_mask" not in inputs
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)

    plain = {k: v for k, v in inputs.items() if k != "labels"}
    dft_ops.unpatch(model)
    logits = model(**plain, use_cache=False).logits
    if kind == "frozen":
        ref_logits = kept["reference"].eval()(**plain, use_cache=False).logits.detach()
    else:
        with model.disable_adapter(), torch.no_grad():
            ref_logits = model(**plain, use_cache=False).logits
    want = asft_from_logits(logits, ref_logits, inputs["labels"], 0.4, "forward")
    assert rel_err(loss.detach(), want.detach()) < 1e-5
    for got, expected in zip(grads, torch.autograd.grad(want, params)):
        assert rel_err(got, expected) < 1e-5


def test_example_runs_end_to_end(tmp_path):
    """examples/asft_vs_dft.py, a few steps: both runs train through the patch and the plot is written."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "asft_vs_dft.py"
    spec = importlib.util.spec_from_file_location("asft_vs_dft", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--pretrain-steps", "2", "--steps", "2", "--eval-every", "2", "--batch-size", "2",
                            "--out", str(tmp_path)])
    assert (tmp_path / "asft_vs_dft.png").exists() and (tmp_path / "asft_vs_dft.json").exists()
    assert len(results["curves"]) == 2 and all(len(curve) == 2 for curve in results["curves"].values())
    assert all(sum(counts) == 2 * 2 * (example.SEQ - 1) for counts in results["histograms"].values())
