"""Distill (a label objective mixed with a divergence to a frozen teacher head, the call's second head)
against the float64 oracle, Liger's distillation loss, and the kernels against each other.

dft_ops.naive materializes both heads' logits and writes each divergence out (TRL's / Liger's
generalized JSD through ``logsumexp`` of the two log-softmaxes), differentiated by autograd; the fused
paths never see it. Teachers differ from the student (their own hidden size, soft-cap, bias and dtype)
unless a test says otherwise.
"""

import pytest
import torch

import dft_ops
from dft_ops import SecondHead
from dft_ops import objectives as o
from dft_ops.backends import torch_backend
from helpers import check_against_reference, loss_and_grads, rel_err
from test_asft import make_reference
from test_objectives import V, case_inputs, make_case, peaked_inputs

KINDS = {"jsd": ("jsd", 0.3), "forward_kl": ("forward_kl", None), "reverse_kl": ("reverse_kl", None)}
# backend name -> linear_cross_entropy keywords (Triton on the interpreter without a GPU); "auto" runs the
# one-pass head wherever it applies (not for reduction="none" nor fp16 products: two passes there)
BACKENDS = {"torch-onepass": dict(backend="torch"), "torch-two-pass": dict(backend="torch", backward_mode="gemm"),
            "triton-onepass": dict(backend="triton"), "triton-gemm": dict(backend="triton", backward_mode="gemm"),
            "triton-fused": dict(backend="triton", backward_mode="fused")}

# every option, spread over configurations: the distillation's own (alpha, base, t_squared, temperature,
# unlabeled tokens and their mask) beside the call's; a temperature only with alpha = 0 (refused otherwise)
CONFIGS = {
    "fp32-mean-shift-bias-softcaps-stats": dict(dtype=torch.float32, shape=(2, 9), shift=True, bias=True,
                                                ref_bias=True, softcap=3.0, ref_softcap=2.0, return_stats=True,
                                                alpha=0.3, base="dft"),
    "bf16-none-temperature-D2-stats": dict(dtype=torch.bfloat16, shape=(2, 9), reduction="none", temperature=1.6,
                                           D_ref=40, ref_bias=True, return_stats=True, alpha=0.0),
    "fp32-sum-smoothing-classweight-zloss": dict(dtype=torch.float32, shape=(3, 7), reduction="sum",
                                                 label_smoothing=0.1, class_weight=True, z_loss=1e-3,
                                                 ref_softcap=4.0, ref_dtype=torch.bfloat16, alpha=0.6,
                                                 base="chord"),
    "bf16-items-ignore5-unlabeled-mask-stats": dict(dtype=torch.bfloat16, shape=(2, 9), shift=True, ignore_index=5,
                                                    num_items_in_batch=23, D_ref=16, ref_dtype=torch.float32,
                                                    alpha=0.5, base="ce", unlabeled="mask", return_stats=True),
    "fp16-mean-unlabeled-temperature": dict(dtype=torch.float16, shape=(2, 9), shift=True, temperature=0.8,
                                            D_ref=32, alpha=0.0, t_squared=False, unlabeled="all"),
}


def distill_case(config, kind, device):
    """(hidden, weight, labels, bias, objective, call options): the teacher as the call's second head, a
    distill_mask that drops some positions without a label (``unlabeled="mask"``)."""
    config = dict(config)
    ref = {k: config.pop(k) for k in ("D_ref", "ref_bias", "ref_softcap", "ref_dtype") if k in config}
    own = {k: config.pop(k) for k in ("alpha", "base", "t_squared") if k in config}
    unlabeled = config.pop("unlabeled", None)
    hidden, weight, labels, bias, opts, logp, valid = case_inputs(config, device)
    if unlabeled is not None:  # tokens without a label, whatever the draw
        labels[0, 1:4] = opts.get("ignore_index", -100)
        valid = (labels[..., 1:] if opts.get("shift") else labels) != opts.get("ignore_index", -100)
    ref_hidden, ref_weight, ref_bias = make_reference(hidden, weight, D_ref=ref.get("D_ref"),
                                                      bias=ref.get("ref_bias", False), dtype=ref.get("ref_dtype"))
    base, batch = make_case(own.pop("base", "ce"), logp, valid)
    objective = o.Distill(*KINDS[kind], base=base, distill_unlabeled=unlabeled is not None, **own)
    opts.update(batch, second_head=SecondHead(ref_hidden, ref_weight, ref_bias, ref.get("ref_softcap")))
    if unlabeled == "mask":
        # every other token without a label distilled (the labeled ones are, whatever the mask says)
        mask = torch.rand(valid.shape, device=device) < 0.5
        unlabeled_at = (~valid).reshape(-1).nonzero().squeeze(1)
        assert unlabeled_at.numel() >= 2
        mask.view(-1)[unlabeled_at] = torch.arange(unlabeled_at.numel(), device=device) % 2 == 0
        opts["distill_mask"] = mask
    return hidden, weight, labels, bias, objective, opts


def check_case(config, kind, backend, device, tol=None):
    hidden, weight, labels, bias, objective, opts = distill_case(config, kind, device)
    upstream = None
    if opts.get("reduction") == "none":
        upstream = torch.randn(labels[..., 1:].shape if opts.get("shift") else labels.shape, device=device)
    how = dict(BACKENDS[backend])
    ours, ref = check_against_reference(hidden, weight, labels, bias, upstream=upstream, objective=objective,
                                        backend=how.pop("backend"), backend_options=how, tol=tol, **opts)
    if opts.get("return_stats"):
        stats, want = ours[1], ref[1]
        distilled = stats.mask if "distill_mask" not in opts else stats.mask | opts["distill_mask"]
        assert stats.kl.shape == want["kl"].shape and stats.kl.dtype == torch.float32
        assert (want["kl"][distilled] > 1e-3).all()  # a real divergence at every distilled token
        assert rel_err(stats.kl, want["kl"]) < 1e-5, rel_err(stats.kl, want["kl"])
        assert (stats.kl[~distilled] == 0).all()
        # the label statistics are an ignored token's where there is no label, distilled or not
        for key in ("logprob", "entropy"):
            assert (stats[key].double() - want[key]).abs().max() < 1e-4, key
        assert torch.equal(stats.is_top1, want["is_top1"]) and (stats.predicted[~stats.mask] == -1).all()
    return ours, ref


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_options_match_reference(backend, kind, config, device):
    check_case(CONFIGS[config], kind, backend, device)


@pytest.mark.parametrize("beta", [0.05, 0.5, 0.95])
def test_jsd_across_beta(beta, device):
    config = dict(dtype=torch.float32, shape=(2, 9), shift=True, bias=True, ref_bias=True, return_stats=True)
    hidden, weight, labels, bias, _, opts = distill_case(config, "jsd", device)
    for backend in ("torch-onepass", "triton-onepass", "triton-gemm"):
        how = dict(BACKENDS[backend])
        check_against_reference(hidden, weight, labels, bias, objective=o.Distill("jsd", beta, alpha=0.25),
                                backend=how.pop("backend"), backend_options=how, **opts)


@pytest.mark.parametrize("backend", ["torch-onepass", "triton-onepass", "triton-fused"])
def test_beta_zero_and_one_are_the_kls(backend, device):
    """Liger's and TRL's edge cases: beta 0 is KL(q || p), beta 1 is KL(p || q), the same numbers."""
    config = dict(dtype=torch.float32, shape=(2, 9), shift=True, bias=True, ref_softcap=3.0, return_stats=True)
    hidden, weight, labels, bias, _, opts = distill_case(config, "jsd", device)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        (loss, stats), grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, labels=labels,
                                              objective=o.Distill("jsd", beta), **opts, **BACKENDS[backend])
        (want, want_stats), want_grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias,
                                                        labels=labels, objective=o.Distill(kind), **opts,
                                                        **BACKENDS[backend])
        assert torch.equal(loss, want) and torch.equal(stats.kl, want_stats.kl)
        assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))


def test_matches_liger_chunked_jsd(device):
    """Liger's LigerFusedLinearJSDLoss (its chunked PyTorch form, which runs on a CPU): hard loss weighted
    alpha, soft loss 1 - alpha, no T^2; its hard loss is at T = 1, so with a temperature alpha is 0 here."""
    jsd_loss = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss")
    N, D, D2 = 37, 24, 40
    hidden = torch.randn(N, D, device=device)
    weight = torch.randn(V, D, device=device) * 4.0 / D**0.5
    teacher = SecondHead(torch.randn(N, D2, device=device), torch.randn(V, D2, device=device) * 4.0 / D2**0.5)
    labels = torch.randint(0, V, (N,), device=device)
    labels[:6] = -100
    for beta, alpha, temperature in ((0.3, 0.5, 1.0), (0.0, 0.5, 1.0), (1.0, 0.2, 1.0), (0.7, 0.0, 2.0)):
        def liger(h, w, bias=None):
            return jsd_loss.LigerFusedLinearJSDFunction.apply(h, w, teacher.hidden, teacher.weight, labels, None, None,
                                                              alpha, 1 - alpha, beta, -100, temperature, False, 16,
                                                              False)
        want, want_grads = loss_and_grads(liger, hidden, weight, None)
        for backend in ("torch-onepass", "triton-onepass", "triton-gemm"):
            got, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels,
                                        objective=o.Distill("jsd", beta, alpha=alpha, t_squared=False),
                                        second_head=teacher, temperature=temperature, **BACKENDS[backend])
            assert rel_err(got, want) < 1e-5, (beta, alpha, backend)
            assert all(rel_err(g, w) < 1e-5 for g, w in zip(grads, want_grads)), (beta, alpha, backend)


def test_t_squared_is_the_temperature_factor(device):
    config = dict(dtype=torch.float32, shape=(2, 9), shift=True, D_ref=40)
    hidden, weight, labels, bias, _, opts = distill_case(config, "jsd", device)
    plain, plain_grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels,
                                        objective=o.Distill(alpha=0.0, t_squared=False), temperature=2.5,
                                        backend="torch", **opts)
    scaled, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels,
                                   objective=o.Distill(alpha=0.0), temperature=2.5, backend="torch", **opts)
    assert torch.allclose(scaled, 6.25 * plain, rtol=1e-6)
    assert all(rel_err(g, 6.25 * p) < 1e-6 for g, p in zip(grads, plain_grads))


@pytest.mark.parametrize("backend", ["torch-onepass", "triton-onepass", "triton-gemm"])
def test_pure_distillation_of_every_position(backend, device):
    """No label at all (labels all ignored) with distill_unlabeled: the mean over every loss position of
    D, as Liger's fused JSD without labels; the stats are an ignored token's but for the divergence."""
    config = dict(dtype=torch.float32, shape=(3, 7), shift=True, bias=True, ref_bias=True, D_ref=40,
                  return_stats=True)
    hidden, weight, labels, bias, _, opts = distill_case(config, "jsd", device)
    labels = torch.full_like(labels, -100)
    how = dict(BACKENDS[backend])
    ours, ref = check_against_reference(hidden, weight, labels, bias, objective=o.Distill(distill_unlabeled=True),
                                        backend=how.pop("backend"), backend_options=how, **opts)
    stats = ours[1]
    assert (stats.kl > 1e-3).all() and not stats.mask.any()
    assert (stats.logprob == 0).all() and (stats.entropy == 0).all() and not stats.is_top1.any()
    assert (stats.predicted == -1).all() and (stats.lse == 0).all()
    assert rel_err(ours[0], 0.5 * stats.kl.double().mean()) < 1e-6  # alpha = 0.5 of nothing, 0.5 of D


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_all_ignored(backend, device):
    """Every label ignored and nothing asked for without one: loss 0, divergence 0, zero gradients."""
    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    ref_hidden, ref_weight, ref_bias = make_reference(hidden, weight, D_ref=40, bias=True)
    for kind in KINDS:
        (loss, stats), grads = loss_and_grads(
            dft_ops.linear_cross_entropy, hidden, weight, bias, labels=torch.full_like(labels, -100), shift=True,
            objective=o.Distill(*KINDS[kind]), return_stats=True,
            second_head=SecondHead(ref_hidden, ref_weight, ref_bias), **BACKENDS[backend])
        assert loss.item() == 0 and (stats.kl == 0).all()
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", ["torch-onepass", "triton-onepass", "triton-gemm"])
def test_alpha_one_is_the_label_objective(backend, device):
    """alpha = 1: the base objective's loss and gradients exactly; the divergence is still reported."""
    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    ref_hidden, ref_weight, _ = make_reference(hidden, weight, D_ref=40)
    opts = dict(labels=labels, shift=True, label_smoothing=0.1, **BACKENDS[backend])
    (loss, stats), grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, return_stats=True,
                                          objective=o.Distill(alpha=1.0, base="dft"),
                                          second_head=SecondHead(ref_hidden, ref_weight), **opts)
    want, want_grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, objective="dft", **opts)
    assert torch.equal(loss, want) and all(torch.equal(g, w) for g, w in zip(grads, want_grads))
    assert (stats.kl[stats.mask] > 1e-3).all()


@pytest.mark.parametrize("backend", ["torch-onepass", "triton-onepass", "triton-fused"])
def test_teacher_equal_to_student(backend, device):
    """The student's own head as the teacher: every divergence is 0 to rounding, the gradient alpha times
    the base's (the divergence's own terms cancel)."""
    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    opts = dict(labels=labels, shift=True, softcap=2.5, **BACKENDS[backend])
    base, base_grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, objective="dft", **opts)
    for kind in KINDS:
        (loss, stats), grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias,
                                              objective=o.Distill(*KINDS[kind], alpha=0.4, base="dft"),
                                              return_stats=True, second_head=SecondHead(hidden, weight, bias, 2.5),
                                              **opts)
        assert stats.kl.abs().max() < 1e-6, kind
        assert torch.allclose(loss, 0.4 * base, rtol=1e-5, atol=1e-6)
        for g, b in zip(grads, base_grads):
            # k (p - q) and its kin cancel to fp32 rounding of O(1) numbers, beside a small peaked DFT gradient
            assert rel_err(g, 0.4 * b) < 1e-4, kind


# the interpreter evaluates -inf - -inf (NumPy warns) where the kernels then select 0
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_masked_vocabulary(backend, device):
    """Classes masked (-inf bias) in both heads, and some in the teacher's only, add nothing to the
    divergences or their gradients (no 0 * inf): finite, and the oracle's."""
    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=False, bias=True)
    bias[::5] = float("-inf")
    labels[(labels >= 0) & (labels % 5 == 0)] = -100  # never a masked label (its log-prob would be -inf)
    ref_hidden, ref_weight, ref_bias = make_reference(hidden, weight, bias=True)
    ref_bias[::5] = float("-inf")
    ref_bias[1::7] = float("-inf")  # q = 0 where p > 0: fine for KL(q || p) and the JSD
    how = dict(BACKENDS[backend])
    name = how.pop("backend")
    for kind in ("jsd", "forward_kl"):
        ours, ref = check_against_reference(hidden, weight, labels, bias, objective=o.Distill(*KINDS[kind]),
                                            return_stats=True, backend=name, backend_options=how,
                                            second_head=SecondHead(ref_hidden, ref_weight, ref_bias))
        assert torch.isfinite(ours[1].kl).all() and rel_err(ours[1].kl, ref[1]["kl"]) < 1e-5


# the interpreter evaluates exp(r - 0) in padding rows of a tile (r ~ 300: inf, then 0 * inf), which the
# kernels then replace by 0
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch-onepass", "triton-onepass", "triton-gemm"])
def test_offset_between_the_heads_cancels(backend, device):
    """Teacher logits 300 above the student's plus a perturbation: the JSD (formed from each head's
    log-probabilities, never from z - r) keeps fp32 accuracy token by token."""
    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    ref_hidden, ref_weight, _ = make_reference(hidden, weight, near=1.0)
    how = dict(BACKENDS[backend])
    ours, ref = check_against_reference(hidden, weight, labels, bias, objective=o.Distill("jsd", 0.3),
                                        return_stats=True, shift=True, backend=how.pop("backend"),
                                        backend_options=how, tol=5e-5,
                                        second_head=SecondHead(ref_hidden, ref_weight, bias + 300.0))
    mask = ours[1].mask
    kl, want = ours[1].kl[mask].double(), ref[1]["kl"][mask]
    assert (want > 1e-2).double().mean() > 0.5  # real divergences (peaked rows that agree have tiny ones)
    assert ((kl - want).abs() <= 1e-4 * want + 1e-6).all(), (kl - want).abs().max()


def test_no_tokens_x_vocabulary_tensor(monkeypatch, device):
    """The one-pass torch head and the two-pass torch backend hold chunks of either head's logits only."""
    from helpers import OutputsSeen, small_chunks

    small_chunks(monkeypatch, tokens=16, vocab=32)
    hidden, weight, labels, bias = peaked_inputs((8, 12), torch.float32, device, shift=True)
    ref_hidden, ref_weight, _ = make_reference(hidden, weight, D_ref=16)  # its (N, D2) input: under N V / 2
    N = labels.numel()
    for mode in ("auto", "gemm"):
        with OutputsSeen() as watch:
            _, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels, shift=True,
                                      objective=o.Distill(distill_unlabeled=True), backend="torch",
                                      backward_mode=mode, second_head=SecondHead(ref_hidden, ref_weight))
        assert max(numel for numel, _ in watch.seen) < N * V / 2, mode


def test_auto_runs_the_jsd_in_one_pass(device):
    """The generalized JSD's two reads of the logits cost the one-pass head a memory sweep, the two-pass
    forward a second product: auto picks one pass for it as for every objective it applies to."""
    from dft_ops.backends import backward_mode

    hidden, weight, labels, bias = peaked_inputs((2, 9), torch.float32, device, shift=True)
    plan = backward_mode(dft_ops.LossOptions(objective=o.Distill()), device=device, vocab_size=V, hidden_size=24,
                         compute_dtype=torch.float32, needs=dft_ops.backends.Needs(), second_head=True)
    assert plan.mode == "onepass", plan


def test_torch_backend_vocabulary_chunks(monkeypatch, device):
    """The mixture sweep and both heads' partials across vocabulary chunks (several, a ragged last one)."""
    config = dict(CONFIGS["fp32-mean-shift-bias-softcaps-stats"])
    for chunk in (16, 50):
        monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", chunk)
        check_case(config, "jsd", "torch-two-pass", device)


def test_kernels_match_torch_backend_across_splits(device):
    """The contract with a mixture weight: the mixture pass over every split count, the g term over GEMM
    splits and fused vocabulary chunks, against the PyTorch backend (rows, strides, soft-caps, bias)."""
    from dft_ops import kernels
    from helpers import Coef, backward, forward

    N, D_, V_, D_ref = 40, 24, 150, 40
    hidden = torch.randn(N, D_, device=device)
    weight = torch.randn(V_, D_, device=device) * 4.0 / D_**0.5
    bias = torch.randn(V_, device=device)
    teacher = SecondHead(torch.randn(D_ref, N, device=device).T,  # strided rows
                         torch.randn(V_, D_ref, device=device) * 4.0 / D_ref**0.5, torch.randn(V_, device=device),
                         softcap=3.0)
    rows = torch.randperm(N, device=device)[:33]
    targets = torch.randint(0, V_, (33,), device=device)
    opts = dict(softcap=4.0, temperature=1.3, second=teacher)

    def with_mix(fn, beta):
        def run(hidden, head, *args, **kw):
            return fn(hidden, head._replace(mix_weight=beta), *args, **kw)
        return run

    want = forward(with_mix(torch_backend.lse_forward, 0.3), hidden, weight, bias, targets, rows, vocab_chunk=33,
                   **opts)
    assert want.model_mix_kl.min() > 1e-3 and want.second_mix_kl.min() > 1e-3
    for splits in (1, 3):
        got = forward(with_mix(kernels.lse_forward, 0.3), hidden, weight, bias, targets, rows, splits=splits, **opts)
        for name in ("lse", "second_lse", "model_mix_kl", "second_mix_kl"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item()), (name, splits)
    M = targets.numel()
    coef = Coef(torch.randn(M, device=device), torch.randn(M, device=device))
    mix = torch.randn(M, device=device)
    grad_opts = dict(opts, second_lse=want.second_lse, need_bias=True)

    def with_g(fn):
        def run(hidden, head, tokens, terms, needs, **kw):
            return fn(hidden, head._replace(mix_weight=0.3), tokens, terms._replace(mix_gap=mix), needs, **kw)
        return run

    expected = backward(with_g(torch_backend.grad_backward), hidden, weight, bias, targets, rows, want.lse, coef,
                        vocab_chunk=40, **grad_opts)
    runs = {
        "gemm, 3 splits x 3 token chunks": backward(with_g(kernels.gemm_backward), hidden, weight, bias, targets,
                                                    rows, want.lse, coef, workspace_bytes=33 * 64 * 4, **grad_opts),
        "fused, 3 chunks": backward(with_g(kernels.fused_backward), hidden, weight, bias, targets, rows, want.lse,
                                    coef, vocab_chunk=64, **grad_opts),
    }
    for run, grads in runs.items():
        for name, a, b in zip(("hidden", "weight", "bias"), grads, expected):
            assert rel_err(a, b) < 1e-5, (run, name, rel_err(a, b))
    # the g term is really there: without it the gradients differ
    plain = backward(torch_backend.grad_backward, hidden, weight, bias, targets, rows, want.lse, coef, **grad_opts)
    assert rel_err(plain[0], expected[0]) > 1e-2


def _float64_row_terms(u, r, softcap, r_softcap, temperature, beta):
    """KL(p || m), KL(q || m) and p (log p - log m) per row of raw logits, in float64."""
    def dist(x, cap):
        x = x.double()
        if cap is not None:
            x = cap * torch.tanh(x / cap)
        return torch.log_softmax(x / temperature, dim=-1)

    log_p, log_q = dist(u, softcap), dist(r, r_softcap)
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(1 - beta, dtype=torch.float64)),
                            log_q + torch.log(torch.tensor(beta, dtype=torch.float64)))
    return ((log_p.exp() * (log_p - log_m)).sum(-1), (log_q.exp() * (log_q - log_m)).sum(-1),
            log_p.exp() * (log_p - log_m))


@pytest.mark.parametrize("caps", [(None, None), (20.0, 5.0)])
def test_row_passes_with_a_mixture(caps, device):
    """The one-pass head's row passes (kernels/row_pass.py, and their PyTorch reference) with a mixture
    weight: row_stats' KLs to the mixture (a second read of each row) against float64, and G's g term
    against the PyTorch row passes, in fp32 in place and bf16 packed, rows and columns past any block."""
    from dft_ops.backends.one_pass import TorchRowPasses
    from dft_ops.backends.protocol import GradTerms, Head
    from dft_ops.kernels import row_pass

    C, V_, ld = 19, 777, 784  # V past the interpreter's 256-wide tiles with a ragged tail
    softcap, r_softcap = caps
    u = (torch.randn(C, ld, device=device) * 3.0)[:, :V_]
    r = (torch.randn(C, ld + 16, device=device) * 3.0 + 0.5 * u.sum(dim=1, keepdim=True) / V_ ** 0.5)[:, :V_]
    targets = torch.randint(0, V_, (C,), device=device)
    targets[3] = -1
    head = Head(torch.empty(V_, 1, device=device), None, softcap, 1.3, torch.float32,
                second=SecondHead(torch.empty(C, 1), torch.empty(V_, 1), None, r_softcap, torch.float32),
                mix_weight=0.35)
    want_model, want_second, want_term = _float64_row_terms(u, r, softcap, r_softcap, 1.3, 0.35)
    for rows in (TorchRowPasses(), row_pass.TritonRowPasses()):
        stats = rows.row_stats(u.clone(), targets, head, with_stats=False, smoothing=False, second_logits=r.clone())
        assert rel_err(stats.model_mix_kl, want_model) < 1e-5 and rel_err(stats.second_mix_kl, want_second) < 1e-5
    terms = GradTerms(stats.lse, torch.randn(C, device=device), torch.randn(C, device=device),
                      second_lse=stats.second_lse, logprob=stats.target_logprob,
                      mix_gap=torch.randn(C, device=device))
    want = TorchRowPasses().logit_grad(u.clone(), targets, head, terms, second_logits=r, out_dtype=torch.float32)
    for out_dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
        got = row_pass.TritonRowPasses().logit_grad(u.clone(), targets, head, terms, second_logits=r,
                                                    out_dtype=out_dtype)
        assert got.dtype == out_dtype and rel_err(got.float(), want) < tol, (out_dtype, rel_err(got.float(), want))
    # the g term is there: G without it differs, and it is the float64 term where a, b are 0
    only_g = terms._replace(softmax=torch.zeros(C, device=device), target=torch.zeros(C, device=device))
    g = row_pass.TritonRowPasses().logit_grad(u.clone(), targets, head, only_g, second_logits=r,
                                              out_dtype=torch.float32)
    slope = 1.0 / 1.3 if softcap is None else torch.cosh(u.double() / softcap).pow(-2) / 1.3
    assert rel_err(g, only_g.mix_gap[:, None].double() * want_term * slope) < 1e-5


@pytest.mark.parametrize("args, error, message", [
    (dict(kind="kl"), ValueError, "kind:"),
    (dict(kind="forward_kl", beta=0.5), ValueError, "beta:"),
    (dict(beta=1.5), ValueError, "beta:"),
    (dict(beta="0.5"), TypeError, "beta:"),
    (dict(alpha=-0.1), ValueError, "alpha:"),
    (dict(alpha=1.1), ValueError, "alpha:"),
    (dict(alpha=None), TypeError, "alpha:"),
    (dict(t_squared=1), TypeError, "t_squared:"),
    (dict(distill_unlabeled="yes"), TypeError, "distill_unlabeled:"),
    (dict(base="nope"), ValueError, "base:"),
    (dict(base="power"), ValueError, "base:"),
    (dict(base=o.ASFT(0.1)), ValueError, "base:"),
    (dict(base=o.Distill()), ValueError, "base:"),
    (dict(base=o.SequenceDFT("product"), distill_unlabeled=True), ValueError, "base:"),
])
def test_objective_checks(args, error, message):
    with pytest.raises(error, match=f"^{message}"):
        o.Distill(**args)


def test_objective_parameters():
    d = o.Distill()
    assert (d.kind, d.beta, d.alpha, d.base, d.t_squared, d.distill_unlabeled) == ("jsd", 0.5, 0.5, o.CE(), True, False)
    assert d.divergence == "jsd" and d.mix_weight == 0.5
    assert o.Distill("jsd", 0.0).divergence == "forward_kl" and o.Distill("jsd", 1).mix_weight is None
    assert o.Distill("reverse_kl").beta is None and o.Distill("reverse_kl").mix_weight is None
    assert o.Distill(base="dft") == o.Distill(base=o.DFT()) and hash(o.Distill()) == hash(o.Distill("jsd", 0.5))
    assert o.Distill() != o.Distill(alpha=0.2)
    assert repr(d) == "Distill(kind='jsd', beta=0.5, alpha=0.5, base=CE(), t_squared=True, distill_unlabeled=False)"
    assert o.Distill(base=o.PSFT()).token_inputs == ("old_logprobs",)
    assert d.distill_coef(None) == 0.5 and d.distill_coef(2.0) == 2.0
    assert o.Distill(t_squared=False, alpha=0.0).distill_coef(3.0) == 1.0
    with pytest.raises(ValueError, match="^objective: 'distill' takes parameters"):
        o.resolve("distill")


def test_call_checks(device):
    hidden, weight, labels, _ = peaked_inputs((2, 5), torch.float32, device, shift=False)
    teacher = SecondHead(torch.randn(2, 5, 6, device=device), torch.randn(V, 6, device=device))

    def call(objective=o.Distill(distill_unlabeled=True), **kw):
        kw.setdefault("second_head", teacher)
        return dft_ops.linear_cross_entropy(hidden, weight, labels, objective=objective, backend="torch", **kw)

    with pytest.raises(ValueError, match="^second_head: objective Distill compares with a frozen second head"):
        call(second_head=None)
    with pytest.raises(ValueError, match="^distill_mask: says which tokens without a label are distilled"):
        call(o.Distill(), distill_mask=labels == -100)
    with pytest.raises(ValueError, match="^distill_mask: says which"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, distill_mask=labels == -100, backend="torch")
    with pytest.raises(ValueError, match=r"^distill_mask: shape \(2, 4\); expected the loss positions' shape"):
        call(distill_mask=torch.ones(2, 4, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="^distill_mask: expected a bool"):
        call(distill_mask=torch.ones(2, 5, device=device))
    with pytest.raises(TypeError, match="^distill_mask: expected a torch.Tensor"):
        call(distill_mask=[[True] * 5] * 2)
    call(distill_mask=torch.ones(2, 5, dtype=torch.int64, device=device))  # an attention mask as it comes
    with pytest.raises(ValueError, match="^class_weight: Distill\\(distill_unlabeled=True\\)"):
        call(class_weight=torch.ones(V, device=device))
    with pytest.raises(ValueError, match="^temperature: 2.0 divides the whole head's logits"):
        call(o.Distill(alpha=0.5), temperature=2.0)
    call(o.Distill(alpha=0.0), temperature=2.0)
    call(o.Distill(alpha=0.5), temperature=1.0)
    with pytest.raises(ValueError, match="^vocab_parallel: Distill is not supported"):
        dft_ops.LossOptions(objective=o.Distill(), vocab_parallel=dft_ops.VocabParallel(start=0, stop=V, vocab_size=V))
