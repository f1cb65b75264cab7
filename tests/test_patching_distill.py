"""dft_ops.patch with objective Distill: a frozen teacher of another family and hidden size (tiny, CPU).

The expected loss and gradients are written out here in float64 from both models' materialized logits
(the unpatched student's own forward, and the teacher's forward in eval mode under no_grad): per
distilled token ``alpha`` times the label loss plus ``1 - alpha`` times the divergence of the two
softmaxes (TRL's generalized JSD through logsumexp), the mean over the distilled tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import dft_ops  # noqa: E402
from dft_ops.objectives import Distill  # noqa: E402
from dft_ops.patching import patch_state  # noqa: E402

from helpers import rel_err  # noqa: E402
from test_patching import SMALL, V, assert_same_grads, build, grads_of, make_batch  # noqa: E402
from test_patching_asft import head_calls, reference_logits  # noqa: E402


def teacher_model(seed: int = 7):
    """A Qwen2 teacher with hidden size 48 (the llama student's is 32) and the student's vocabulary."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**{**SMALL, "hidden_size": 48, "intermediate_size": 64})
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 3.0 / 48**0.5)
    return model.train()


def divergence(z, r, kind, beta):
    """(...) float64 per-position divergence of the student's logits z and the teacher's r, written out."""
    log_p, log_q = F.log_softmax(z, -1), F.log_softmax(r, -1)
    if kind == "forward_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "reverse_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(1 - beta), log_q + math.log(beta)]), dim=0)
    return beta * (log_q.exp() * (log_q - log_m)).sum(-1) + (1 - beta) * (log_p.exp() * (log_p - log_m)).sum(-1)


def distill_from_logits(logits, teacher_logits, labels, *, kind, beta, alpha, distilled):
    """The mean over ``distilled`` loss positions (causal shift) of alpha CE + (1 - alpha) D, in float64."""
    z, r, targets = logits[:, :-1].double(), teacher_logits[:, :-1].double(), labels[:, 1:]
    valid = targets != -100
    ce = -F.log_softmax(z, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = torch.where(valid, alpha * ce, 0.0) + (1 - alpha) * divergence(z, r, kind, beta)
    return per_token[distilled].sum() / distilled.sum()


@pytest.mark.parametrize("kind, beta, unlabeled", [("jsd", 0.4, False), ("forward_kl", None, True),
                                                   ("reverse_kl", None, False), ("jsd", 0.7, True)])
def test_teacher_of_another_size(kind, beta, unlabeled, monkeypatch, backend_options=None):
    """Loss and gradients of a patched student against the materialized formula; the teacher (hidden size
    48, the student's 32) builds no logits and gets no gradient. With distill_unlabeled, the prompt's
    tokens are distilled too and the padding (attention mask 0) is not."""
    model, teacher = build("llama"), teacher_model()
    input_ids, labels = make_batch()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -3:] = 0  # make_batch's padding
    teacher_logits = reference_logits(teacher, input_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    valid = labels[:, 1:] != -100
    distilled = (valid | (attention_mask[:, :-1] != 0)) if unlabeled else valid
    assert not unlabeled or ((distilled & ~valid).any() and (~distilled).any())  # the prompt in, the padding out
    want = distill_from_logits(logits, teacher_logits, labels, kind=kind, beta=beta, alpha=0.3, distilled=distilled)
    want_grads = grads_of(model, want)

    objective = Distill(kind, beta, alpha=0.3, distill_unlabeled=unlabeled)
    dft_ops.patch(model, objective=objective, reference=teacher, return_stats=True, **(backend_options or {}))
    assert patch_state(model).reference is not None
    calls = head_calls(monkeypatch, model.get_output_embeddings(), teacher.get_output_embeddings())
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits is None and set(calls.values()) == {0}, "a head ran: logits were built"
    assert rel_err(out.loss.detach(), want.detach()) < 1e-5
    assert_same_grads(grads_of(model, out.loss), want_grads)
    assert all(p.grad is None for p in teacher.parameters())
    kl = out.token_stats.kl
    assert bool((kl[~distilled] == 0).all()) and bool((kl[distilled] > 0).all())
    with torch.no_grad():
        want_kl = divergence(logits[:, :-1].double(), teacher_logits[:, :-1].double(), kind, beta)
    assert rel_err(kl[distilled], want_kl[distilled]) < 1e-4


@pytest.mark.parametrize("backward_mode", ["auto", "fused"])
def test_teacher_on_the_triton_backend(backward_mode, monkeypatch):
    """The same through the Triton kernels (the interpreter without a GPU): one pass, and the fused backward."""
    test_teacher_of_another_size("jsd", 0.4, True, monkeypatch,
                                 backend_options=dict(backend="triton", backward_mode=backward_mode))


def test_patch_checks():
    model = build("llama")
    with pytest.raises(ValueError, match="^reference: objective Distill needs a reference model"):
        dft_ops.patch(model, objective=Distill())
    with pytest.raises(ValueError, match="^reference: only ASFT and Distill compare"):
        dft_ops.patch(model, objective="dft", reference=teacher_model())
    with pytest.raises(ValueError, match="^temperature: 2.0 divides the whole head's logits"):
        dft_ops.patch(model, objective=Distill(), reference=teacher_model(), temperature=2.0)
    small = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**SMALL, "vocab_size": V + 1}))
    with pytest.raises(dft_ops.PatchError, match="^reference: its output head has"):
        dft_ops.patch(model, objective=Distill(), reference=small)
