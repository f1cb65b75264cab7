"""``dft_ops.integrations.verl.linear_cross_entropy``: verl's fused kernel, as a drop-in.

In dft-ops' own venv (no verl): the signature pinned by tests/integrations/test_verl_probe.py, verl's
conventions (flat outputs, the "sum" / "mean" of log-probs over all tokens, every label a class, the
entropy per token whatever the reduction), against the float64 oracle with upstream gradients of both
outputs at once, on both backends. With verl installed (``make test-verl``): against verl's own torch
path (``FusedLinearForPPO``, which runs on CPU) value for value and gradient for gradient;
``install()`` rebinding verl's module attribute; verl's Hugging Face forward
(``forward_with_triton_backend``) running through it on a tiny Llama; and, on a CUDA GPU, against
verl's Triton kernel itself. Two ranks (``dist_process_group``): tests/test_token_logprobs_vocab_parallel.py.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from dft_ops import naive
from dft_ops.integrations import verl as dropin
from helpers import TOL, make_inputs, rel_err


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def test_signature_is_verls():
    # verl 0.9.1's LinearCrossEntropy.forward, ctx dropped (pinned against verl in test_verl_probe.py)
    params = list(inspect.signature(dropin.linear_cross_entropy).parameters.values())
    assert [(p.name, p.default) for p in params] == [
        ("hidden", inspect.Parameter.empty), ("weight", inspect.Parameter.empty), ("labels", inspect.Parameter.empty),
        ("temperature", 1.0), ("reduction", "none"), ("dist_process_group", None)]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "MEAN"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_float64(backend, reduction, dtype, device, monkeypatch):
    """3-D hidden and 2-D labels as verl passes them, read flat; both upstream gradients at once."""
    if backend == "triton" and dtype == torch.bfloat16 and reduction == "MEAN":
        pytest.skip("covered by the other bf16 cases")
    # the module (dft_ops.token_logprobs the attribute is the function)
    module = importlib.import_module("dft_ops.token_logprobs")
    monkeypatch.setattr(module, "select_backend", _forcing(backend))
    hidden, weight, labels, _ = make_inputs((2, 9), 48, 131, dtype, device, ignore_frac=0, scale=3.0)
    h, w = _leaves(hidden, weight)
    logp, entropy = dropin.linear_cross_entropy(h, w, labels, 0.8, reduction)
    assert logp.dtype == entropy.dtype == torch.float32
    assert entropy.shape == (18,) and logp.shape == ((18,) if reduction == "none" else ())
    g = torch.Generator().manual_seed(3)
    g_logp = torch.randn(logp.shape, generator=g).to(device)
    g_ent = torch.randn(18, generator=g).to(device)
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    hr, wr = _leaves(hidden.double(), weight.double())
    rlp, rent = naive.token_logprobs(hr.reshape(18, -1), wr, labels.reshape(-1), temperature=0.8, ignore_index=None)
    rlp = {"none": rlp, "sum": rlp.sum(), "mean": rlp.mean()}[reduction.lower()]
    ((rlp * g_logp.double()).sum() + (rent * g_ent.double()).sum()).backward()
    assert rel_err(logp, rlp) < 1e-5 and rel_err(entropy, rent) < 1e-5
    assert h.grad.shape == hidden.shape and h.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(h.grad, hr.grad) < TOL[dtype] and rel_err(w.grad, wr.grad) < TOL[dtype]


def _forcing(backend):
    from dft_ops.backends import select_backend

    def select(options, device, plan=None):
        return select_backend(options.replace(backend=backend), device, plan)

    return select


def test_per_token_temperature_beyond_verl(device):
    hidden, weight, labels, _ = make_inputs((3, 5), 16, 40, torch.float32, device, ignore_frac=0)
    t = torch.tensor([[0.5], [1.0], [2.0]], device=device)
    logp, entropy = dropin.linear_cross_entropy(hidden, weight, labels, t)
    rlp, rent = naive.token_logprobs(hidden, weight, labels, temperature=t, ignore_index=None)
    assert rel_err(logp, rlp.reshape(-1)) < 1e-5 and rel_err(entropy, rent.reshape(-1)) < 1e-5


def test_refusals(device):
    hidden, weight, labels, _ = make_inputs((2, 5), 16, 40, torch.float32, device, ignore_frac=0)
    with pytest.raises(ValueError, match="^reduction: expected one of"):
        dropin.linear_cross_entropy(hidden, weight, labels, 1.0, "batchmean")
    with pytest.raises(ValueError, match="^labels: 9 labels for 10 rows"):
        dropin.linear_cross_entropy(hidden, weight, labels.reshape(-1)[:9])
    with pytest.raises(TypeError, match="^temperature: expected a positive float"):
        dropin.linear_cross_entropy(hidden, weight, labels, "1")
    with pytest.raises(ValueError, match="^temperature: must be a positive finite number"):
        dropin.linear_cross_entropy(hidden, weight, labels, 0.0)
    with pytest.raises(ValueError, match=r"^temperature: shape \(3,\) does not broadcast"):
        dropin.linear_cross_entropy(hidden, weight, labels, torch.ones(3))
    with pytest.raises(TypeError, match="^dist_process_group: expected a torch.distributed.ProcessGroup"):
        dropin.linear_cross_entropy(hidden, weight, labels, 1.0, "none", "tp")
    labels[1, 2] = -100  # verl has no ignore index: its kernel would return -lse here
    with pytest.raises(ValueError, match=r"^labels: 1 value\(s\) outside \[0, 40\).*ignore_index=None"):
        dropin.linear_cross_entropy(hidden, weight, labels)


# ------------------------------------------------------------------------------------------- with verl itself


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_against_verls_torch_path(temperature):
    """verl's own FusedLinearForPPO (its torch backend of use_fused_kernels): the same values and gradients."""
    pytest.importorskip("verl", reason="verl is not installed here (make test-verl runs this file in its venv)")
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    hidden, weight, labels, _ = make_inputs((2, 37), 24, 300, torch.float32, "cpu", ignore_frac=0, scale=4.0)
    g = torch.Generator().manual_seed(5)
    g_logp, g_ent = torch.randn(2, 37, generator=g), torch.randn(2, 37, generator=g)
    results = []
    for fn in (lambda h, w: FusedLinearForPPO()(h, w, labels, temperature=temperature),
               lambda h, w: [t.reshape(2, 37) for t in dropin.linear_cross_entropy(h, w, labels, temperature)]):
        h, w = _leaves(hidden, weight)
        logp, entropy = fn(h, w)
        ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
        results.append((logp.detach(), entropy.detach(), h.grad, w.grad))
    for name, theirs, ours in zip(("logprobs", "entropy", "d hidden", "d weight"), *results):
        assert rel_err(ours, theirs) < 1e-5, (name, rel_err(ours, theirs))


def test_install_rebinds_verls_module_attribute():
    pytest.importorskip("verl", reason="verl is not installed here")
    import verl.utils.kernel.linear_cross_entropy as kernel

    original = kernel.linear_cross_entropy
    previous = dropin.install()
    try:
        assert kernel.linear_cross_entropy is dropin.linear_cross_entropy
        assert previous[dropin._KERNEL_MODULE] is original
        assert dropin.install() == {}  # installing twice changes nothing
    finally:
        dropin.uninstall(previous)
    assert kernel.linear_cross_entropy is original


def test_verls_hugging_face_forward_runs_through_it():
    """verl's forward_with_triton_backend (use_fused_kernels, impl_backend=triton) on a tiny Llama, on CPU: the
    log-probs and entropies equal those of verl's forward_with_torch_backend, and their gradients too."""
    pytest.importorskip("verl", reason="verl is not installed here")
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers.dense_common import forward_with_torch_backend, forward_with_triton_backend

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    input_ids = torch.randint(0, 257, (2, 13))
    previous = dropin.install()
    try:
        outputs = []
        for forward in (forward_with_torch_backend, forward_with_triton_backend):
            model.zero_grad()
            out = forward(model, input_ids=input_ids, return_dict=True, temperature=0.7)
            logp, entropy = out.log_probs.reshape(2, 13), out.entropy.reshape(2, 13)
            (logp.sum() - 0.3 * entropy.sum()).backward()
            outputs.append((logp.detach(), entropy.detach(), model.lm_head.weight.grad.clone(),
                            model.model.embed_tokens.weight.grad.clone()))
    finally:
        dropin.uninstall(previous)
    for name, theirs, ours in zip(("logprobs", "entropy", "d lm_head", "d embed"), *outputs):
        assert rel_err(ours, theirs) < 1e-5, (name, rel_err(ours, theirs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="verl's Triton kernel runs on CUDA only (GPU window)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_against_verls_triton_kernel_on_gpu(dtype):
    pytest.importorskip("verl", reason="verl is not installed here")
    from verl.utils.kernel.linear_cross_entropy import LinearCrossEntropy

    hidden, weight, labels, _ = make_inputs((4, 512), 256, 32000, dtype, "cuda", ignore_frac=0, scale=4.0)
    g = torch.Generator(device="cuda").manual_seed(5)
    g_logp = torch.randn(2048, generator=g, device="cuda")
    g_ent = torch.randn(2048, generator=g, device="cuda")
    results = []
    for fn in (LinearCrossEntropy.apply, dropin.linear_cross_entropy):
        h, w = _leaves(hidden, weight)
        logp, entropy = fn(h, w, labels, 0.9, "none")
        ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
        results.append((logp.detach(), entropy.detach(), h.grad, w.grad))
    hr, wr = _leaves(hidden.double(), weight.double())
    rlp, rent = naive.token_logprobs(hr.reshape(2048, -1), wr, labels.reshape(-1), temperature=0.9, ignore_index=None)
    ((rlp * g_logp.double()).sum() + (rent * g_ent.double()).sum()).backward()
    reference = (rlp, rent, hr.grad, wr.grad)
    for name, theirs, ours, exact in zip(("logprobs", "entropy", "d hidden", "d weight"), *results, reference):
        tol = 1e-5 if name in ("logprobs", "entropy") else TOL[dtype]
        assert rel_err(ours, exact) < tol, (name, rel_err(ours, exact), rel_err(theirs, exact))
