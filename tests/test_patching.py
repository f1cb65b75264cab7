"""dft_ops.patch on tiny randomly initialised Hugging Face causal LMs (CPU, fp32, no downloads).

For every family: with objective "ce" the patched loss and every parameter
gradient equal the unpatched model's own; with "dft" they equal DFT computed
from the unpatched model's logits (plus the MoE auxiliary loss); no logits are
built while training; inference, generate() and unpatch are unchanged; what
cannot be computed exactly is refused.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import dft_ops  # noqa: E402
from dft_ops.patching import HeadTransform, PatchError, patch_state  # noqa: E402

from helpers import rel_err  # noqa: E402

V = 131  # not a multiple of any block size
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, **TOKEN_IDS)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)

# family -> (config class, model class, config overrides, the head transform the probe must find)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, HeadTransform()),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, HeadTransform()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8), HeadTransform()),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, HeadTransform()),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=1.5),
               HeadTransform(softcap=1.5)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, HeadTransform()),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, HeadTransform()),  # head bias
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=32, n_layer=1, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             HeadTransform()),  # tied head
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5), HeadTransform(scale=0.5)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0), HeadTransform(scale=0.25)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=8, num_experts=4, moe_intermediate_size=16, **MOE), HeadTransform()),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, **MOE), HeadTransform()),
}


def build(family: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised model whose head gives O(1) logits (so soft-cap and scale matter)."""
    config_name, model_name, overrides, _ = FAMILIES[family]
    kwargs = dict(SMALL)
    if family == "gpt2":
        kwargs = dict(vocab_size=V, **TOKEN_IDS)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, 3.0 / head.weight.shape[1] ** 0.5)
        if head.bias is not None:
            head.bias.normal_(0.0, 1.0)
    return model.train()


def make_batch(batch: int = 2, seq: int = 13, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, V, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[-1, -3:] = -100  # padding
    return input_ids, labels


def grads_of(model: nn.Module, loss: torch.Tensor, retain_graph=False) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=retain_graph)
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def dft_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DFT written out on materialized logits: mean over valid tokens of -sg(p) log p (causal shift)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    valid = targets != -100
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = -logp.exp().detach() * logp
    return per_token[valid].sum() / valid.sum()


def assert_same_grads(got: dict, want: dict, tol: float = 2e-5):
    assert got.keys() == want.keys()
    worst = max(want, key=lambda n: rel_err(got[n], want[n]))
    assert rel_err(got[worst], want[worst]) < tol, f"{worst}: rel err {rel_err(got[worst], want[worst]):.2e}"


@pytest.fixture
def head_forward_calls(monkeypatch):
    """Counts nn.Linear.forward calls on each module: the output head must not run while training."""
    calls = {}
    original = nn.Linear.forward

    def counting(self, x):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counting)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_gradient_match(family, head_forward_calls):
    model = build(family)
    input_ids, labels = make_batch()
    reference = model(input_ids=input_ids, labels=labels)
    aux = reference.get("aux_loss")
    aux_term = model.config.router_aux_loss_coef * aux if aux is not None else 0.0
    ref_ce_grads = grads_of(model, reference.loss, retain_graph=True)
    ref_dft = dft_from_logits(reference.logits, labels) + aux_term
    ref_dft_grads = grads_of(model, ref_dft)

    head = model.get_output_embeddings()
    assert dft_ops.patch(model, objective="ce") is model
    found, want = patch_state(model).transform, FAMILIES[family][3]
    assert found.softcap == want.softcap and found.scale == pytest.approx(want.scale, rel=1e-12)
    head_forward_calls.clear()
    out = model(input_ids=input_ids, labels=labels)
    assert type(out) is type(reference) and out.logits is None
    assert head_forward_calls.get(id(head), 0) == 0, "the output head ran: logits were built"
    if aux is not None:
        assert rel_err(out.aux_loss.detach(), aux.detach()) < 1e-6
    assert rel_err(out.loss.detach(), reference.loss.detach()) < 1e-5
    assert_same_grads(grads_of(model, out.loss), ref_ce_grads)

    dft_ops.patch(model, objective="dft")  # re-patching changes the objective
    out = model(input_ids=input_ids, labels=labels)
    assert out.logits is None
    assert rel_err(out.loss.detach(), ref_dft.detach()) < 1e-5
    assert_same_grads(grads_of(model, out.loss), ref_dft_grads)
    assert patch_state(model).calls == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_generate_and_unpatch_unchanged(family):
    model = build(family).eval()
    input_ids, labels = make_batch(batch=1, seq=10)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        eval_loss = model(input_ids=input_ids, labels=labels).loss
        generated = model.generate(input_ids, max_new_tokens=4, do_sample=False)
    signature = inspect.signature(model.forward)

    dft_ops.patch(model, objective="dft")
    assert inspect.signature(model.forward) == signature
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, logits)
        assert torch.equal(model(input_ids=input_ids, labels=labels).loss, eval_loss)  # eval: the model's own loss
        assert torch.equal(model.generate(input_ids, max_new_tokens=4, do_sample=False), generated)
        model.train()
        assert torch.equal(model(input_ids=input_ids).logits, logits)  # no labels: logits as usual
        model.eval()

    dft_ops.unpatch(model)
    assert "forward" not in model.__dict__ and not dft_ops.patching.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, logits)


def test_patch_is_idempotent_and_options_change():
    model = build("llama")
    input_ids, labels = make_batch()
    dft_ops.patch(model, objective="ce")
    forward = model.forward
    dft_ops.patch(model, objective="ce", reduction="sum")
    assert model.forward is forward and patch_state(model).options.reduction == "sum"
    summed = model(input_ids=input_ids, labels=labels).loss
    n_valid = (labels[:, 1:] != -100).sum()
    dft_ops.patch(model, objective="ce")
    mean = model(input_ids=input_ids, labels=labels).loss
    assert rel_err(summed.detach(), mean.detach() * n_valid) < 1e-6
    dft_ops.unpatch(model)
    assert "forward" not in model.__dict__
    dft_ops.unpatch(model)  # unpatching twice is harmless


def test_return_tuple_shift_labels_num_items_and_stats():
    model = build("qwen2")
    input_ids, labels = make_batch()
    reference = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(40))
    dft_ops.patch(model, objective="ce", return_stats=True)
    out = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(40))
    assert rel_err(out.loss.detach(), reference.loss.detach()) < 1e-5

    as_tuple = model(input_ids=input_ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and rel_err(as_tuple[0].detach(), out.loss.detach() * 40 /
                                                   (labels[:, 1:] != -100).sum()) < 1e-5

    # shift_labels (context parallelism): given already shifted, with no `labels`
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    shifted = model(input_ids=input_ids, shift_labels=shift_labels)
    assert rel_err(shifted.loss.detach(), as_tuple[0].detach()) < 1e-6

    # per-token stats without logits: compare with the reference logits
    logp = F.log_softmax(reference.logits[:, :-1].float(), -1)
    targets = labels[:, 1:]
    valid = targets != -100
    stats = out.token_stats
    want_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(stats.logprob[valid], want_logp[valid].detach(), atol=1e-5)
    entropy = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(stats.entropy[valid], entropy[valid].detach(), atol=1e-5)
    assert torch.equal(stats.is_top1[valid], (logp.argmax(-1) == targets)[valid])


def test_packed_batch_with_position_ids():
    """Padding-free packing: one row, documents restart at position 0, no attention mask."""
    model = build("llama")
    input_ids, _ = make_batch(batch=1, seq=20)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5]])
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    reference = model(input_ids=input_ids, position_ids=position_ids, labels=labels)
    ref_grads = grads_of(model, reference.loss)
    dft_ops.patch(model, objective="ce")
    out = model(input_ids=input_ids, position_ids=position_ids, labels=labels)
    assert rel_err(out.loss.detach(), reference.loss.detach()) < 1e-5
    assert_same_grads(grads_of(model, out.loss), ref_grads)


def test_autocast_bf16_matches_unpatched():
    """Mixed precision: hidden states and head are cast to the autocast dtype, like nn.Linear under autocast."""
    model = build("llama")
    input_ids, labels = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=input_ids, labels=labels).loss
        dft_ops.patch(model, objective="ce")
        loss = model(input_ids=input_ids, labels=labels).loss
    assert loss.dtype == torch.float32 and rel_err(loss.detach(), reference.detach()) < 3e-2


def test_the_loss_is_computed_inside_the_heads_forward_call(head_forward_calls):
    """What sharding engines rely on (FSDP2, ZeRO-3): the head's hooks run around the loss computation, and
    backward reaches the head's output before the head's weight gets its gradient."""
    model = build("qwen2")
    input_ids, labels = make_batch()
    head = model.get_output_embeddings()
    events = []

    def pre_hook(module, args):  # an engine gathers the weight here
        events.append(("pre-forward", head_forward_calls.get(id(head), 0)))

    def post_hook(module, args, out):  # and reshards it here, hooking the output to gather it for backward
        events.append(("post-forward", patch_state(model).calls, tuple(out.shape), out.requires_grad))
        out.register_hook(lambda grad: events.append(("output-grad",)))

    # registered as an engine's hooks are (torch.distributed, deepspeed, accelerate): part of how the head runs,
    # not of what it computes, so the head probe leaves them out
    pre_hook.__module__ = post_hook.__module__ = "torch.distributed.emulated_engine"
    dft_ops.patch(model, objective="dft")
    head.register_forward_pre_hook(pre_hook)
    head.register_forward_hook(post_hook)
    head.weight.register_post_accumulate_grad_hook(lambda p: events.append(("weight-grad",)))
    out = model(input_ids=input_ids, labels=labels)
    assert events == [("pre-forward", 0), ("post-forward", 1, (*input_ids.shape, 0), True)]
    out.loss.backward()
    assert events[2:] == [("output-grad",), ("weight-grad",)]
    assert head_forward_calls.get(id(head), 0) == 0  # the head's own matmul never ran: no logits


def test_accelerate_hooks_on_the_head_keep_running():
    """accelerate's add_hook_to_module (device_map, offload) moves the forward to _old_forward: its hook still runs."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = build("llama")
    input_ids, labels = make_batch()
    reference = model(input_ids=input_ids, labels=labels).loss

    class Counting(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    hooks.add_hook_to_module(model.lm_head, Counting())
    dft_ops.patch(model, objective="ce")
    Counting.calls = 0
    out = model(input_ids=input_ids, labels=labels)
    assert Counting.calls == 1 and out.logits is None
    assert rel_err(out.loss.detach(), reference.detach()) < 1e-5


def test_patch_unwraps_a_data_parallel_wrapper():
    model = build("llama")
    wrapper = nn.DataParallel(model)  # CPU: calls the module directly; DDP and DeepSpeed engines alike
    assert dft_ops.patch(wrapper, objective="ce") is wrapper
    assert dft_ops.patching.is_patched(model) and "forward" in model.__dict__
    input_ids, labels = make_batch()
    assert wrapper(input_ids=input_ids, labels=labels).logits is None
    dft_ops.unpatch(wrapper)
    assert not dft_ops.patching.is_patched(model)


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    model = build("llama")
    dft_ops.patch(model, objective="ce")
    twin = copy.deepcopy(model)
    assert twin.forward.model is twin and dft_ops.patching.is_patched(twin)
    guards = [h for h in twin.base_model._forward_pre_hooks.values() if type(h).__name__ == "_BypassGuard"]
    assert len(guards) == 1 and guards[0].causal_lm is twin
    input_ids, labels = make_batch()
    assert rel_err(twin(input_ids=input_ids, labels=labels).loss.detach(),
                   model(input_ids=input_ids, labels=labels).loss.detach()) < 1e-6
    assert patch_state(twin).calls == 1 and patch_state(model).calls == 1


# ------------------------------------------------------------------------------------------------ PEFT


def test_peft_adapters_on_other_layers_work():
    peft = pytest.importorskip("peft")
    model = build("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a gradient path that matters
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    input_ids, labels = make_batch()
    reference = lora(input_ids=input_ids, labels=labels)
    ref_grads = grads_of(lora, reference.loss)
    assert dft_ops.patch(lora, objective="ce") is lora
    out = lora(input_ids=input_ids, labels=labels)
    assert out.logits is None and rel_err(out.loss.detach(), reference.loss.detach()) < 1e-5
    got = grads_of(lora, out.loss)
    assert any("lora_A" in n for n in got)
    assert_same_grads(got, ref_grads)


def test_refuses_adapters_on_the_output_head():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(PatchError, match="PEFT"):
        dft_ops.patch(lora)
    # an adapter added to the head after patching is refused at the next training step
    model = build("llama")
    dft_ops.patch(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(PatchError, match="PEFT"):
        lora(*make_batch()[:1], labels=make_batch()[1])
    mts = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                             modules_to_save=["lm_head"]))
    with pytest.raises(PatchError, match="PEFT"):
        dft_ops.patch(mts)


# -------------------------------------------------------------------------------------------- refusals


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_head_hooks_changed_after_patching_are_measured_again():
    """A hook added (or removed) on the head after patch() changes the logits: the fused loss follows it."""
    model = build("llama")
    input_ids, labels = make_batch()

    def own_loss():
        dft_ops.unpatch(model)
        try:
            return model(input_ids=input_ids, labels=labels).loss
        finally:
            dft_ops.patch(model, objective="ce")

    dft_ops.patch(model, objective="ce")
    model.train()
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out * 3)
    assert rel_err(model(input_ids=input_ids, labels=labels).loss, own_loss()) < 1e-5
    assert patch_state(model).transform.scale == pytest.approx(3.0)
    handle.remove()
    assert rel_err(model(input_ids=input_ids, labels=labels).loss, own_loss()) < 1e-5
    assert patch_state(model).transform.scale == 1.0
    model.lm_head.register_forward_hook(lambda module, args, out: out[..., :-1])  # a vocabulary slice: refused
    with pytest.raises(dft_ops.PatchError, match="slices or masks the vocabulary"):
        model(input_ids=input_ids, labels=labels)


def test_refuses_a_head_that_is_not_a_plain_linear():
    model = build("llama")
    old = model.lm_head
    model.lm_head = ScaledLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(PatchError, match="not a plain torch.nn.Linear"):
        dft_ops.patch(model)


def test_refuses_an_unknown_transform_after_the_head():
    model = build("llama")
    offset = torch.randn(V)
    model.lm_head.register_forward_hook(lambda module, args, out: out + offset.to(out.dtype))
    with pytest.raises(PatchError, match="unknown head transform"):
        dft_ops.patch(model)


def test_refuses_a_head_fed_something_else():
    model = build("llama")
    model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with pytest.raises(PatchError, match="does not feed the backbone's final hidden states"):
        dft_ops.patch(model)


@pytest.mark.parametrize("change, fragment", [
    # as Inkling does with its padded vocabulary: logits[..., :unpadded_vocab_size]
    (lambda out: out[..., : V - 3], "slices or masks the vocabulary"),
    (lambda out: out.masked_fill(torch.arange(out.shape[-1]) % 7 == 0, float("-inf")), "unknown head transform"),
])
def test_refuses_a_vocabulary_slice_or_mask(change, fragment):
    model = build("llama")
    model.lm_head.register_forward_hook(lambda module, args, out: change(out))
    with pytest.raises(PatchError, match=fragment):
        dft_ops.patch(model)


class OwnLossLlama(transformers.LlamaForCausalLM):
    """A causal LM computing its loss with F.cross_entropy, not self.loss_function."""

    def forward(self, input_ids=None, labels=None, return_dict=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


def test_refuses_a_forward_without_loss_function():
    with pytest.raises(PatchError, match="loss_function"):
        dft_ops.patch(OwnLossLlama(build("llama").config))
    # Bart's decoder-only forward reaches into the backbone (self.model.decoder) and computes its own loss
    config = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16, max_position_embeddings=32, **TOKEN_IDS)
    with pytest.raises(PatchError, match="not the usual causal-LM forward"):
        dft_ops.patch(transformers.BartForCausalLM(config))


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(softcap=30.0), ValueError, "softcap"),
    (dict(shift=False), ValueError, "shift"),
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(objective="nope"), ValueError, "objective"),
    (dict(bogus=1), TypeError, "bogus"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_options_name_the_argument(kwargs, error, fragment):
    model = build("llama")
    with pytest.raises(error, match=f"^{fragment}"):
        dft_ops.patch(model, **kwargs)
    assert not dft_ops.patching.is_patched(model)


def test_not_a_model():
    with pytest.raises(TypeError, match="^model"):
        dft_ops.patch("llama")
    with pytest.raises(TypeError, match="^model"):
        dft_ops.patch(nn.Linear(3, 4))


def test_per_token_objective_inputs_come_through_the_forward():
    """PSFT() at patch time; each batch's old_logprobs arrive as a forward keyword."""
    model = build("llama")
    input_ids, labels = make_batch()
    reference = model(input_ids=input_ids, labels=labels)
    logits, targets = reference.logits[:, :-1].double(), labels[:, 1:]
    valid = targets != -100
    old = torch.randn(targets.shape) * 0.3 - 4.0  # ratios on both sides of the trust region
    logp = F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    psft = dft_ops.objectives.PSFT()
    per_token = dft_ops.naive.naive_loss(psft, old_logprobs=old)(logp, valid, torch.zeros_like(targets))
    want = torch.where(valid, per_token, 0.0).sum() / valid.sum()
    want_grads = grads_of(model, want)

    dft_ops.patch(model, objective=psft)
    out = model(input_ids=input_ids, labels=labels, old_logprobs=old)
    assert rel_err(out.loss.detach(), want.detach()) < 1e-5
    assert_same_grads(grads_of(model, out.loss), want_grads)
    assert psft == dft_ops.objectives.PSFT() and not psft._batch_inputs  # the patch-time objective holds no tensor
    with pytest.raises(ValueError, match="^old_logprobs: objective PSFT needs this batch"):
        model(input_ids=input_ids, labels=labels)
    # eval / generation: the keyword is dropped, the original forward runs
    model.eval()
    assert model(input_ids=input_ids, old_logprobs=old).logits is not None


@pytest.mark.parametrize("sharded", [False, True])
def test_auto_runs_two_passes_where_an_engine_shards_the_head(monkeypatch, sharded):
    """A head whose parameters an engine shards between forwards (here: ZeRO-3's ds_id mark) gets two passes under
    "auto": the one-pass head would hold an unsharded fp32 d(weight) from forward to backward on every rank."""
    from dft_ops.patching import fused_call

    seen = []
    real = fused_call.linear_cross_entropy

    def spy(*args, options, **kwargs):
        seen.append(options.backward_mode)
        return real(*args, options=options, **kwargs)

    monkeypatch.setattr(fused_call, "linear_cross_entropy", spy)
    model = dft_ops.patch(build("qwen2"), objective="dft")
    if sharded:
        model.lm_head.weight.ds_id = 0
    input_ids, labels = make_batch()
    model(input_ids=input_ids, labels=labels).loss.backward()
    assert seen == ["gemm" if sharded else "auto"]
