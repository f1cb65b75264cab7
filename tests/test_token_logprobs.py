"""dft_ops.token_logprobs: per-token log-probs and entropies, both differentiable, against the float64 oracle.

Every case draws fresh inputs (shapes no block size divides), arbitrary upstream gradients for both
outputs at once, and compares both outputs and the gradients of hidden, weight and bias with
``dft_ops.naive.token_logprobs`` (materialized float64 logits, autograd). Both backends (Triton on the
interpreter here), both Triton backward modes, fp32 and bf16; temperature per token and per sequence,
soft-cap, bias, shift, packed documents, ignored and all-ignored tokens, masked (-inf) vocabulary, one
output unused; bad input refused naming the argument. Two-rank vocabulary parallelism:
tests/test_token_logprobs_vocab_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

import dft_ops
from dft_ops import naive
from helpers import TOL, make_inputs, rel_err

BACKENDS = [("torch", "auto"), ("triton", "gemm"), ("triton", "fused")]
SHAPE, D, V = (3, 11), 40, 157


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run_both(hidden, weight, labels, bias=None, *, grads=("logprob", "entropy"), backend="torch",
             backward_mode="auto", seed=0, **options):
    """(ours, reference): each (logprob, entropy, [d hidden, d weight, d bias]) for the same random upstream
    gradients of the outputs named in ``grads``."""
    h, w, b = _leaves(hidden, weight, bias)
    out = dft_ops.token_logprobs(h, w, labels, bias=b, backend=backend, backward_mode=backward_mode, **options)
    hr, wr, br = _leaves(hidden.double(), weight.double(), None if bias is None else bias.double())
    temperature = options.get("temperature", 1.0)
    ref = naive.token_logprobs(hr, wr, labels, bias=br, temperature=temperature, softcap=options.get("softcap"),
                               shift=options.get("shift", False), ignore_index=options.get("ignore_index", -100),
                               position_ids=options.get("position_ids"))
    gen = torch.Generator().manual_seed(seed)
    upstream = {name: torch.randn(out.logprob.shape, generator=gen).to(out.logprob.device)
                for name in ("logprob", "entropy")}
    total = sum((getattr(out, name) * upstream[name]).sum() for name in grads)
    ref_total = sum((r * upstream[name].double()).sum() for name, r in zip(("logprob", "entropy"), ref)
                    if name in grads)
    total.backward()
    ref_total.backward()
    return ((out.logprob, out.entropy, [h.grad, w.grad, None if b is None else b.grad]),
            (ref[0], ref[1], [hr.grad, wr.grad, None if br is None else br.grad]))


def assert_close(ours, ref, dtype, *, grad_tol=None):
    (lp, ent, grads), (rlp, rent, rgrads) = ours, ref
    for name, a, r in (("logprob", lp, rlp), ("entropy", ent, rent)):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        assert torch.isfinite(a).all(), name
        # computed in fp32 from the given inputs, whatever their dtype
        assert rel_err(a, r) < 1e-5 or (a.double() - r).abs().max() < 1e-6, (name, rel_err(a, r))
    tol = grad_tol or TOL[dtype]
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, rgrads):
        if rg is None:
            assert g is None
            continue
        assert g is not None and torch.isfinite(g).all(), name
        err = rel_err(g, rg)
        assert err < tol or (g.double() - rg).norm() < 1e-20, f"grad {name}: {err:.2e} > {tol}"


@pytest.mark.parametrize("backend,mode", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_option_against_float64(backend, mode, dtype, device):
    """Per-token temperature, soft-cap, bias, shift, ignored tokens; upstream gradients of both outputs."""
    hidden, weight, labels, bias = make_inputs(SHAPE, D, V, dtype, device, bias=True, scale=4.0)
    temperature = torch.rand(SHAPE[0], SHAPE[1] - 1, device=device) * 1.5 + 0.4
    ours, ref = run_both(hidden, weight, labels, bias, backend=backend, backward_mode=mode, temperature=temperature,
                         softcap=6.0, shift=True)
    assert_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_across_chunks(dtype, device, monkeypatch):
    """The PyTorch backend with blocks of 8 tokens x 48 classes: the (32 x 157) loss positions span several of
    each (the entropy's partial sums merged across vocabulary chunks, the per-token temperature and the
    entropy's gradient term per block), every option on, against float64."""
    from helpers import small_chunks

    small_chunks(monkeypatch, 8, 48)
    hidden, weight, labels, bias = make_inputs((2, 17), D, V, dtype, device, bias=True, scale=4.0)
    temperature = torch.rand(2, 16, device=device) * 1.5 + 0.4
    ours, ref = run_both(hidden, weight, labels, bias, temperature=temperature, softcap=6.0, shift=True)
    assert_close(ours, ref, dtype)


@pytest.mark.parametrize("backend,mode", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "float-temperature", "per-sequence-temperature", "bias-only",
                                  "softcap-only", "logprob-only", "entropy-only", "no-entropy"])
def test_each_option_alone(backend, mode, case, device):
    dtype = torch.float32
    hidden, weight, labels, bias = make_inputs(SHAPE, D, V, dtype, device, bias=case == "bias-only", scale=3.0)
    options, grads = {}, ("logprob", "entropy")
    if case == "float-temperature":
        options["temperature"] = 0.7
    elif case == "per-sequence-temperature":
        options["temperature"] = torch.tensor([[0.6], [1.0], [1.7]], device=device)
    elif case == "softcap-only":
        options["softcap"] = 2.5
    elif case in ("logprob-only", "entropy-only"):
        grads = (case.split("-")[0],)
    elif case == "no-entropy":
        options["return_entropy"] = False
        grads = ("logprob",)
    if case == "no-entropy":
        h, w = _leaves(hidden, weight)
        out = dft_ops.token_logprobs(h, w, labels, backend=backend, backward_mode=mode, **options)
        assert out.entropy is None
        up = torch.randn_like(out.logprob)
        (out.logprob * up).sum().backward()
        hr, wr = _leaves(hidden.double(), weight.double())
        rlp, _ = naive.token_logprobs(hr, wr, labels)
        (rlp * up.double()).sum().backward()
        assert rel_err(out.logprob, rlp) < 1e-5
        assert rel_err(h.grad, hr.grad) < 1e-4 and rel_err(w.grad, wr.grad) < 1e-4
        return
    ours, ref = run_both(hidden, weight, labels, bias, grads=grads, backend=backend, backward_mode=mode, **options)
    assert_close(ours, ref, dtype)


@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_masked_vocabulary_entropy_is_finite(backend, mode, device):
    """-inf logits (a masked vocabulary through a -inf bias): 0 * -inf gives 0 in the entropy and its gradient,
    never NaN (TRL #7251)."""
    hidden, weight, labels, bias = make_inputs(SHAPE, D, V, torch.float32, device, bias=True, scale=3.0)
    bias[100:] = float("-inf")
    labels = labels.where((labels < 0) | (labels < 100), labels % 100)
    ours, ref = run_both(hidden, weight, labels, bias, backend=backend, backward_mode=mode, shift=1,
                         temperature=torch.rand(SHAPE[0], SHAPE[1] - 1, device=device) + 0.5)
    # the reference's bias gradient at -inf entries is 0 (softmax 0 there): compare it where finite
    assert_close(ours, ref, torch.float32)
    assert (ours[2][2][100:] == 0).all()


@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_packed_documents(backend, mode, device):
    """position_ids restarting at 0 inside a row: with shift, the last position of a document (whose target is
    the next document's first token) is ignored; shift=2 spans two positions."""
    hidden, weight, labels, _ = make_inputs((2, 12), D, V, torch.float32, device, ignore_frac=0.1)
    position_ids = torch.arange(12, device=device).repeat(2, 1)
    position_ids[0, 5:] -= 5
    position_ids[1, 3:] -= 3
    position_ids[1, 9:] -= 6
    for shift in (1, 2):
        ours, ref = run_both(hidden, weight, labels, backend=backend, backward_mode=mode, shift=shift,
                             position_ids=position_ids)
        assert_close(ours, ref, torch.float32)
        assert ours[0][0, 4] == 0 and ours[1][0, 4] == 0  # predicts the next document's first token


@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_all_tokens_ignored(backend, mode, device):
    hidden, weight, labels, bias = make_inputs(SHAPE, D, V, torch.float32, device, bias=True)
    labels.fill_(-100)
    h, w, b = _leaves(hidden, weight, bias)
    lp, ent = dft_ops.token_logprobs(h, w, labels, bias=b, backend=backend, backward_mode=mode,
                                     temperature=torch.full(SHAPE, -1.0, device=device))  # never read
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all()
    for g in (h.grad, w.grad, b.grad):
        assert g is not None and (g == 0).all()


def test_peaked_logprob_never_above_zero(device):
    """Labels of probability ~1 at large logits: z_y - lse rounds above 0 in fp32 (verl #2656's symptom)."""
    hidden = torch.randn(64, 32, device=device)
    weight = torch.randn(300, 32, device=device) * 0.1
    labels = torch.randint(0, 300, (64,), device=device)
    weight[labels] = hidden * 3.0  # the label's logit ~ 3 |h|^2, far above every other
    lp, _ = dft_ops.token_logprobs(hidden, weight, labels)
    ref, _ = naive.token_logprobs(hidden, weight, labels)
    assert (lp <= 0).all()
    assert (lp.double() - ref).abs().max() < 1e-5


def test_matches_log_softmax_gather_bitwise_shape(device):
    """The materialized PyTorch recipe (log_softmax + gather + entropy) that RL trainers use, on fp32."""
    hidden, weight, labels, _ = make_inputs((4, 9), 24, 70, torch.float32, device, ignore_frac=0)
    lp, ent = dft_ops.token_logprobs(hidden, weight, labels)
    logits = hidden @ weight.T
    logp_all = torch.log_softmax(logits, -1)
    assert torch.allclose(lp, logp_all.gather(-1, labels[..., None])[..., 0], atol=2e-6)
    assert torch.allclose(ent, -(logp_all.exp() * logp_all).sum(-1), atol=2e-6)


def test_ignore_index_none_every_label_is_a_class(device):
    hidden, weight, labels, _ = make_inputs((2, 7), 16, 30, torch.float32, device, ignore_frac=0)
    ours, ref = run_both(hidden, weight, labels, ignore_index=None)
    assert_close(ours, ref, torch.float32)
    labels[0, 3] = -100
    with pytest.raises(ValueError, match=r"^labels: 1 value\(s\) outside \[0, 30\).*ignore_index=None"):
        dft_ops.token_logprobs(hidden, weight, labels, ignore_index=None)
    labels[0, 3] = -(2**63)
    with pytest.raises(ValueError, match=r"^labels: 1 value\(s\) outside \[0, 30\)"):
        dft_ops.token_logprobs(hidden, weight, labels, ignore_index=None)


def test_autocast_and_mixed_dtypes(device):
    """bf16 hidden states with an fp32 head (autocast's pair): products in bf16, gradients in each dtype."""
    hidden, weight, labels, _ = make_inputs(SHAPE, D, V, torch.float32, device)
    h, w = _leaves(hidden.to(torch.bfloat16), weight)
    lp, ent = dft_ops.token_logprobs(h, w, labels)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref_lp, ref_ent = naive.token_logprobs(h.detach().double(), w.detach().to(torch.bfloat16).double(), labels)
    assert rel_err(lp, ref_lp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5


def test_no_grad_and_frozen_head(device):
    hidden, weight, labels, _ = make_inputs(SHAPE, D, V, torch.float32, device)
    with torch.no_grad():
        lp, ent = dft_ops.token_logprobs(hidden, weight, labels)
    assert not lp.requires_grad and not ent.requires_grad
    h = hidden.clone().requires_grad_()
    lp, ent = dft_ops.token_logprobs(h, weight, labels)  # a frozen head (LoRA elsewhere): d(hidden) only
    (lp - 0.1 * ent).sum().backward()
    assert h.grad is not None and weight.grad is None


def test_double_backward_refused(device):
    hidden, weight, labels, _ = make_inputs(SHAPE, D, V, torch.float32, device)
    h = hidden.clone().requires_grad_()
    lp, _ = dft_ops.token_logprobs(h, weight, labels)
    (g,) = torch.autograd.grad(lp.sum(), h, create_graph=False)
    lp, _ = dft_ops.token_logprobs(h, weight, labels)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum(), h, create_graph=True)


def test_never_builds_tokens_by_vocabulary(device):
    """No op of the forward or backward produces a tensor of N x V elements (or more)."""
    from helpers import OutputsSeen

    from dft_ops.backends import torch_backend

    hidden, weight, labels, bias = make_inputs((4, 64), 32, 500, torch.float32, device, bias=True)
    h, w, b = _leaves(hidden, weight, bias)
    with OutputsSeen() as seen, pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_backend, "TOKEN_CHUNK", 32)
        mp.setattr(torch_backend, "VOCAB_CHUNK", 128)
        lp, ent = dft_ops.token_logprobs(h, w, labels, bias=b, temperature=torch.rand(4, 1) + 0.5)
        (lp.sum() - ent.sum()).backward()
    assert max(n for n, _ in seen.seen) < 256 * 500


@pytest.mark.parametrize("bad,exc,pattern", [
    (torch.ones(3, 5), ValueError, r"^temperature: shape \(3, 5\) does not broadcast"),
    (torch.ones(2, 1), ValueError, r"^temperature: shape \(2, 1\) does not broadcast"),
    (torch.ones(3, 11, dtype=torch.int64), TypeError, r"^temperature: expected a floating-point tensor"),
    ("hot", TypeError, r"^temperature: expected a positive float or a floating tensor"),
    (True, TypeError, r"^temperature: expected a positive float or a floating tensor"),
    (0.0, ValueError, r"^temperature: must be a positive finite number"),
    (float("nan"), ValueError, r"^temperature: must be a positive finite number"),
    (-1.0, ValueError, r"^temperature: must be a positive finite number"),
])
def test_bad_temperature(bad, exc, pattern, device):
    hidden, weight, labels, _ = make_inputs(SHAPE, D, V, torch.float32, device)
    if isinstance(bad, torch.Tensor):
        bad = bad.to(device)
    with pytest.raises(exc, match=pattern):
        dft_ops.token_logprobs(hidden, weight, labels, temperature=bad)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_temperature_values(value, device):
    hidden, weight, labels, _ = make_inputs(SHAPE, D, V, torch.float32, device, ignore_frac=0)
    t = torch.rand(SHAPE, device=device) + 0.5
    t[1, 4] = value
    with pytest.raises(ValueError, match=r"^temperature: 1 value\(s\) <= 0 or not finite"):
        dft_ops.token_logprobs(hidden, weight, labels, temperature=t)
    labels[1, 4] = -100  # only where a label is computed
    dft_ops.token_logprobs(hidden, weight, labels, temperature=t)


def test_other_bad_input(device):
    hidden, weight, labels, _ = make_inputs(SHAPE, D, V, torch.float32, device)
    for kwargs, exc, pattern in [
        (dict(return_entropy=1), TypeError, "^return_entropy: expected a bool"),
        (dict(backward_mode="onepass"), ValueError, "^backward_mode: 'onepass'"),
        (dict(backward_mode="fast"), ValueError, "^backward_mode: expected one of"),
        (dict(softcap=-1.0), ValueError, "^softcap: must be a positive finite number"),
        (dict(shift=-1), ValueError, "^shift: must be >= 0"),
        (dict(ignore_index=1.5), TypeError, "^ignore_index: expected an int"),
        (dict(position_ids=torch.zeros(3, 4, dtype=torch.long)), ValueError, "^position_ids: shape"),
        (dict(temperature=torch.ones(SHAPE, device="meta")), ValueError, "^temperature: is a meta tensor"),
    ]:
        with pytest.raises(exc, match=pattern):
            dft_ops.token_logprobs(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="^labels: shape"):
        dft_ops.token_logprobs(hidden, weight, labels[:, :3])
    bad = labels.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"^labels: 1 value\(s\) outside \[0, 157\)"):
        dft_ops.token_logprobs(hidden, weight, bad)
