"""ASFT (a base objective plus a KL to a frozen reference model's head, the call's second head) against
the float64 oracle.

dft_ops.naive materializes both heads' logits and writes the KL out
(``sum q (log q - log p)`` or ``sum p (log p - log q)``), differentiated by
autograd; the fused paths never see it. Second heads differ from the
model's (another hidden size, their own soft-cap, bias and dtype) unless a
test says otherwise.
"""

import pytest
import torch

import dft_ops
from dft_ops import objectives as o
from dft_ops import SecondHead
from dft_ops.backends import torch_backend
from helpers import check_against_reference, loss_and_grads, rel_err
from test_objectives import CASES, V, case_inputs, make_case, peaked_inputs

DIRECTIONS = ["forward", "reverse"]
# backend name -> linear_cross_entropy keywords (Triton on the interpreter without a GPU)
BACKENDS = {"torch": dict(backend="torch"), "triton-gemm": dict(backend="triton", backward_mode="gemm"),
            "triton-fused": dict(backend="triton", backward_mode="fused")}


def make_reference(hidden, weight, *, D_ref=None, bias=False, dtype=None, near=0.5):
    """A reference model's head (hidden, weight, bias): the model's head perturbed (KL of order 0.1-1),
    or with D_ref a head of its own size whose logits are of the model's order."""
    dtype = dtype or hidden.dtype
    if D_ref is None:
        ref_hidden = hidden.float() + near * torch.randn_like(hidden, dtype=torch.float32)
        ref_weight = weight.float() + near * weight.float().std() * torch.randn_like(weight, dtype=torch.float32)
    else:
        ref_hidden = torch.randn(*hidden.shape[:-1], D_ref, device=hidden.device)
        ref_weight = torch.randn(weight.shape[0], D_ref, device=hidden.device) * 4.0 / D_ref**0.5
    ref_bias = 0.5 * torch.randn(weight.shape[0], device=hidden.device) if bias else None
    return ref_hidden.to(dtype), ref_weight.to(dtype), None if ref_bias is None else ref_bias.to(dtype)


def asft_case(config, base_case, direction, device):
    """Inputs, objective and options of one configuration: (hidden, weight, labels, bias, objective, opts);
    opts holds the call's second head and the base's per-token inputs."""
    config = dict(config)
    ref = {k: config.pop(k) for k in ("D_ref", "ref_bias", "ref_softcap", "ref_dtype") if k in config}
    hidden, weight, labels, bias, opts, logp, valid = case_inputs(config, device)
    ref_hidden, ref_weight, ref_bias = make_reference(hidden, weight, D_ref=ref.get("D_ref"),
                                                      bias=ref.get("ref_bias", False), dtype=ref.get("ref_dtype"))
    base, batch = make_case(base_case, logp, valid)
    objective = o.ASFT(0.7, direction, base)
    opts.update(batch, second_head=SecondHead(ref_hidden, ref_weight, ref_bias, ref.get("ref_softcap")))
    return hidden, weight, labels, bias, objective, opts


def check_case(config, base_case, direction, backend, device):
    hidden, weight, labels, bias, objective, opts = asft_case(config, base_case, direction, device)
    upstream = None
    if opts.get("reduction") == "none":
        upstream = torch.randn(labels[..., 1:].shape if opts.get("shift") else labels.shape, device=device)
    how = dict(BACKENDS[backend])
    ours, ref = check_against_reference(hidden, weight, labels, bias, upstream=upstream, objective=objective,
                                        backend=how.pop("backend"), backend_options=how, **opts)
    if opts.get("return_stats"):
        kl, ref_kl = ours[1].kl, ref[1]["kl"]
        assert kl.shape == ref_kl.shape and kl.dtype == torch.float32
        assert (ref_kl[ours[1].mask] > 1e-2).all()  # a real KL at every token
        assert rel_err(kl, ref_kl) < 1e-5, rel_err(kl, ref_kl)
        assert (kl[~ours[1].mask] == 0).all()
    return ours, ref


# every option, spread over configurations (a cross product would cost interpreter time for nothing)
CONFIGS = {
    "fp32-mean-shift-bias-softcaps-stats": dict(dtype=torch.float32, shape=(2, 9), shift=True, bias=True,
                                                ref_bias=True, softcap=3.0, ref_softcap=2.0, return_stats=True),
    "bf16-none-temperature-Dref": dict(dtype=torch.bfloat16, shape=(2, 9), reduction="none", temperature=1.6,
                                       D_ref=40, ref_bias=True, return_stats=True),
    "fp32-sum-smoothing-classweight-zloss": dict(dtype=torch.float32, shape=(3, 7), reduction="sum",
                                                 label_smoothing=0.1, class_weight=True, z_loss=1e-3,
                                                 ref_softcap=4.0, ref_dtype=torch.bfloat16),
    "bf16-items-ignore5-fp32ref": dict(dtype=torch.bfloat16, shape=(2, 9), shift=True, ignore_index=5,
                                       num_items_in_batch=23, D_ref=16, ref_dtype=torch.float32),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_options_match_reference(backend, direction, config, device):
    base = {"fp32-sum-smoothing-classweight-zloss": "chord", "bf16-items-ignore5-fp32ref": "ce"}.get(config, "dft")
    check_case(CONFIGS[config], base, direction, backend, device)


@pytest.mark.parametrize("base", list(CASES))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_base_matches_reference(direction, base, device):
    config = dict(dtype=torch.float32, shape=(2, 9), shift=True, bias=True, ref_bias=True, ref_softcap=3.0,
                  return_stats=True)
    check_case(config, base, direction, "torch", device)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_reference_equal_to_model_is_the_base(backend, direction, device):
    """KL(p || p) = 0 exactly (both heads' tiles are the same numbers) and the gradient is the base's."""
    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    asft = o.ASFT(0.9, direction, "dft")
    opts = dict(labels=labels, shift=True, softcap=2.5, temperature=1.3, **BACKENDS[backend])
    (loss, stats), grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, objective=asft,
                                          return_stats=True, second_head=SecondHead(hidden, weight, bias, 2.5), **opts)
    base, base_grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, objective="dft", **opts)
    assert (stats.kl == 0).all()
    assert torch.equal(loss, base)
    # the KL's own terms (kl_coef * s, about 1/p times the base's) cancel to rounding
    for g, b in zip(grads, base_grads):
        assert rel_err(g, b) < 1e-5


def test_torch_backend_vocabulary_chunks(monkeypatch, device):
    """Both heads' partials merge across vocabulary chunks (one, several, and a ragged last one)."""
    config = dict(CONFIGS["fp32-mean-shift-bias-softcaps-stats"])
    for chunk in (16, 50):
        monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", chunk)
        for direction in DIRECTIONS:
            check_case(config, "dft", direction, "torch", device)


def test_kl_scales_with_the_mean_divisor(device):
    """loss = base + kl_coef * KL per token, the mean over the base's count (num_items_in_batch)."""
    hidden, weight, labels, bias, asft, opts = asft_case(dict(dtype=torch.float32, shape=(2, 9)), "dft", "forward",
                                                         device)
    kw = dict(bias=bias, backend="torch", num_items_in_batch=40)
    loss, stats = dft_ops.linear_cross_entropy(hidden, weight, labels, objective=asft, return_stats=True,
                                               second_head=opts["second_head"], **kw)
    base = dft_ops.linear_cross_entropy(hidden, weight, labels, objective=asft.base, **kw)
    assert torch.allclose(loss, base + asft.kl_coef * stats.kl.sum() / 40, rtol=1e-6)


def test_objective_parameters_and_copies():
    asft = o.ASFT(0.1)
    assert asft.direction == "forward" and asft.base == o.DFT() and not asft.has_reference
    assert o.ASFT(0.1, "reverse", "ce") == o.ASFT(0.1, "reverse", o.CE())
    assert o.ASFT(0.1) != o.ASFT(0.2) and hash(o.ASFT(0.1, "reverse")) == hash(o.ASFT(0.1, "reverse"))
    assert repr(asft) == "ASFT(kl_coef=0.1, direction='forward', base=DFT())"
    # the deprecated form holds the batch's head in a copy, which the call reads as its second head
    h, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    with pytest.warns(DeprecationWarning, match="with_reference"):
        held = asft.with_reference(h, w, ref_softcap=30)
    assert not asft.has_reference and held.has_reference and held == asft  # a copy, equal as a setting
    clean, _, second = o.batch_tensors(held)
    assert clean == asft and not clean.has_reference and second.softcap == 30.0 and second.hidden is h
    # a base with per-token inputs: they are the ASFT's
    psft = o.ASFT(0.1, base=o.PSFT())
    assert psft.token_inputs == ("old_logprobs",)
    old = torch.zeros(3)
    with pytest.warns(DeprecationWarning):
        assert o.batch_tensors(psft.with_token_tensors(old_logprobs=old))[1]["old_logprobs"] is old
    assert o.ASFT(0.1, base=o.SequenceDFT("product")).needs_segments


def test_deprecated_reference_gives_the_same_loss(device):
    hidden, weight, labels, bias, asft, opts = asft_case(dict(dtype=torch.float32, shape=(2, 9)), "dft", "reverse",
                                                         device)
    second = opts.pop("second_head")
    want = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, objective=asft, second_head=second, **opts)
    with pytest.warns(DeprecationWarning):
        held = asft.with_reference(second.hidden, second.weight, second.bias, second.softcap)
    assert torch.equal(dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, objective=held, **opts), want)


@pytest.mark.parametrize("args, error, message", [
    ((-0.1,), ValueError, "kl_coef:"),
    (("0.1",), TypeError, "kl_coef:"),
    ((0.1, "sideways"), ValueError, "direction:"),
    ((0.1, "forward", "nope"), ValueError, "base:"),
    ((0.1, "forward", o.ASFT(0.1)), ValueError, "base:"),
    ((0.1, "forward", "power"), ValueError, "base:"),
])
def test_objective_checks(args, error, message):
    with pytest.raises(error, match=f"^{message}"):
        o.ASFT(*args)


def test_call_checks(device):
    hidden, weight, labels, _ = peaked_inputs((2, 5), torch.float32, device, shift=False)
    asft = o.ASFT(0.1)

    def call(objective=asft, **kw):
        return dft_ops.linear_cross_entropy(hidden, weight, labels, objective=objective, backend="torch", **kw)

    with pytest.raises(ValueError, match="^second_head: objective ASFT compares with a frozen second head"):
        call()
    rh, rw = torch.randn(2, 5, 6, device=device), torch.randn(V, 6, device=device)
    with pytest.raises(ValueError, match="^second_head: objective DFT takes no second head"):
        call("dft", second_head=SecondHead(rh, rw))
    with pytest.raises(TypeError, match="^second_head: expected a dft_ops.SecondHead"):
        call(second_head=(rh, rw))
    with pytest.raises(ValueError, match="^second_head.hidden:"):
        call(second_head=SecondHead(rh[:, :4], rw))
    with pytest.raises(ValueError, match="^second_head.weight:"):
        call(second_head=SecondHead(rh, rw[:-1]))
    with pytest.raises(ValueError, match="^second_head.weight:"):
        call(second_head=SecondHead(rh, rw[:, :5]))
    with pytest.raises(ValueError, match="^second_head.bias:"):
        call(second_head=SecondHead(rh, rw, torch.zeros(V + 1, device=device)))
    with pytest.raises(TypeError, match="^second_head.hidden:"):
        call(second_head=SecondHead(rh.double(), rw))
    with pytest.raises(TypeError, match="^second_head.hidden:"):
        call(second_head=SecondHead(rh.long(), rw))
    with pytest.raises(ValueError, match="^second_head.softcap:"):
        call(second_head=SecondHead(rh, rw, softcap=0.0))
    # one rule for both heads: bf16 hidden states with an fp16 head have no common precision
    with pytest.raises(TypeError, match="^second_head.weight: dtype torch.float16 cannot be combined"):
        call(second_head=SecondHead(rh.bfloat16(), rw.half()))
    with pytest.raises(TypeError, match="^weight: dtype torch.float16 cannot be combined"):
        dft_ops.linear_cross_entropy(hidden.bfloat16(), weight.half(), labels, objective=asft,
                                     second_head=SecondHead(rh, rw), backend="torch")
    # refused by the options, before any collective (a two-rank job would only repeat this check)
    with pytest.raises(ValueError, match="^vocab_parallel: ASFT is not supported"):
        dft_ops.LossOptions(objective=asft, vocab_parallel=dft_ops.VocabParallel(start=0, stop=V, vocab_size=V))


@pytest.mark.parametrize("terms", ["reference", "gap", "both"])
def test_kernels_match_torch_backend_across_splits(terms, device):
    """The contract with a reference head: every forward split count, several GEMM splits and
    fused vocabulary chunks agree with the PyTorch backend (rows, strides, both heads' features)."""
    from dft_ops import kernels
    from helpers import Coef, backward, forward

    N, D_, V_, D_ref = 40, 24, 150, 40
    hidden = torch.randn(N, D_, device=device)
    weight = torch.randn(V_, D_, device=device) * 4.0 / D_**0.5
    bias = torch.randn(V_, device=device)
    ref_hidden = torch.randn(D_ref, N, device=device).T  # strided rows
    reference = SecondHead(ref_hidden, torch.randn(V_, D_ref, device=device) * 4.0 / D_ref**0.5,
                              torch.randn(V_, device=device), softcap=3.0)
    rows = torch.randperm(N, device=device)[:33]
    targets = torch.randint(0, V_, (33,), device=device)
    opts = dict(softcap=4.0, temperature=1.3, second=reference)
    want = forward(torch_backend.lse_forward, hidden, weight, bias, targets, rows, vocab_chunk=33, **opts)
    for splits in (1, 3):
        got = forward(kernels.lse_forward, hidden, weight, bias, targets, rows, splits=splits, **opts)
        for name in ("lse", "second_lse", "reverse_kl", "forward_kl"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item()), (name, splits)
    M = targets.numel()
    coef = Coef(torch.randn(M, device=device), torch.randn(M, device=device), None,
                            torch.randn(M, device=device) if terms in ("reference", "both") else None,
                            torch.randn(M, device=device) if terms in ("gap", "both") else None)
    grad_opts = dict(opts, second_lse=want.second_lse, need_bias=True)
    expected = backward(torch_backend.grad_backward, hidden, weight, bias, targets, rows, want.lse, coef, vocab_chunk=40,
                                           **grad_opts)
    runs = {
        "gemm, 3 splits x 3 token chunks": backward(kernels.gemm_backward, hidden, weight, bias, targets, rows, want.lse, coef,
                                                workspace_bytes=33 * 64 * 4, **grad_opts),
        "fused, 3 chunks": backward(kernels.fused_backward, hidden, weight, bias, targets, rows, want.lse, coef,
                                                 vocab_chunk=64, **grad_opts),
    }
    for run, grads in runs.items():
        for name, a, b in zip(("hidden", "weight", "bias"), grads, expected):
            assert rel_err(a, b) < 1e-5, (run, name, rel_err(a, b))
    # the reference's terms are really there: without them the gradients differ
    plain = backward(torch_backend.grad_backward, hidden, weight, bias, targets, rows, want.lse,
                                        coef._replace(second=None, gap=None), **grad_opts)
    assert rel_err(plain[0], expected[0]) > 1e-2


# the interpreter evaluates -inf - -inf (NumPy warns) where the kernels then select 0
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_masked_vocabulary_and_all_ignored(backend, device):
    """Classes masked (-inf bias) in both heads add nothing to the KL or its gradient (no 0 * inf),
    and a batch with every label ignored gives loss 0, KL 0 and zero gradients."""
    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=False, bias=True)
    bias[::5] = float("-inf")
    labels[(labels >= 0) & (labels % 5 == 0)] = -100  # never a masked label (its log-prob would be -inf)
    ref_hidden, ref_weight, ref_bias = make_reference(hidden, weight, bias=True)
    ref_bias[::5] = float("-inf")
    how = dict(BACKENDS[backend])
    name = how.pop("backend")
    for direction in DIRECTIONS:
        asft, second = o.ASFT(0.7, direction), SecondHead(ref_hidden, ref_weight, ref_bias)
        ours, ref = check_against_reference(hidden, weight, labels, bias, objective=asft, return_stats=True,
                                            backend=name, backend_options=how, second_head=second)
        assert torch.isfinite(ours[1].kl).all() and rel_err(ours[1].kl, ref[1]["kl"]) < 1e-5
        ignored = torch.full_like(labels, -100)
        (loss, stats), grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, labels=ignored,
                                              objective=asft, return_stats=True, second_head=second,
                                              **BACKENDS[backend])
        assert loss.item() == 0 and (stats.kl == 0).all()
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradient_filtering_keeps_the_kl_terms(direction, device):
    """The fused backward's tile skip measures the KL's coefficients too: a tiny filter_eps is still exact."""
    config = dict(dtype=torch.float32, shape=(2, 9), shift=True, bias=True, ref_bias=True, return_stats=True)
    hidden, weight, labels, bias, objective, opts = asft_case(config, "dft", direction, device)
    check_against_reference(hidden, weight, labels, bias, objective=objective, backend="triton",
                            backend_options=dict(backward_mode="fused"), filter_eps=1e-12, **opts)


# the interpreter evaluates q = exp(r - 0) in padding rows of a tile (r ~ 300: inf, then 0 * inf),
# which the kernels then replace by 0
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_offset_between_the_heads_cancels(backend, direction, device):
    """Reference logits 300 above the model's plus a perturbation: the KL keeps fp32 accuracy token by
    token (so it is >= 0) and the gradient too. KLs formed from the heads' raw gaps z - r lose about
    1e-7 x 300 absolute to rounding (1e-2 relative here, and KLs that read negative)."""
    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    ref_hidden, ref_weight, _ = make_reference(hidden, weight, near=0.3)
    asft, second = o.ASFT(0.7, direction), SecondHead(ref_hidden, ref_weight, bias + 300.0)
    how = dict(BACKENDS[backend])
    # gradients to 5e-5: the logits r ~ 300 themselves carry 1.5e-5 of fp32 rounding
    ours, ref = check_against_reference(hidden, weight, labels, bias, objective=asft, return_stats=True, shift=True,
                                        backend=how.pop("backend"), backend_options=how, tol=5e-5, second_head=second)
    mask = ours[1].mask
    kl, want = ours[1].kl[mask].double(), ref[1]["kl"][mask]
    assert want.min() > 1e-4
    assert ((kl - want).abs() <= 1e-4 * want + 1e-6).all(), (kl - want).abs().max()
