"""The backend contract (dft_ops.backends.protocol) on both backends, against float64 written out here.

Calls ``lse_forward`` / ``grad_backward`` of each backend directly (the Triton
kernels under TRITON_INTERPRET=1 on CPU). The float64 reference builds the
logits with dft_ops.naive.logits and gets every gradient from autograd of
``sum_t a_t lse_t - b_t z_ty - c_t sum_j u_j z_tj``, whose logit gradient is the
contract's ``a softmax - b onehot - c u``: no formula of the backends is reused.
"""

import pytest
import torch
import triton
import triton.language as tl

import dft_ops
from dft_ops import LossOptions, TokenLayout, kernels, loss_terms, naive
from dft_ops.backends import torch_backend
from dft_ops.backends.protocol import Needs, product_dtype
from dft_ops.loss_call import LossCall
from dft_ops.kernels.tile import round_to, tanh
from hardware import SOFTCAP_LOSS_REL, TANH_ULP, assert_same_sums
from helpers import TOL, Coef, backward, contract, forward, make_inputs, rel_err

# the Backend objects (dft_ops.backends.protocol.Backend); the GEMM backward with a workspace of 4 KiB,
# so that every test shape takes several vocabulary splits and token chunks
BACKENDS = {"torch": torch_backend.TorchBackend(),
            "triton-gemm": kernels.TritonBackend("gemm", workspace_bytes=4096),
            "triton-fused": kernels.TritonBackend("fused")}
# the same through the public API's options
PUBLIC = {"torch": dict(backend="torch"), "triton-gemm": dict(backend="triton", backward_mode="gemm", workspace_mb=0.004),
          "triton-fused": dict(backend="triton", backward_mode="fused")}
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (hidden dtype, weight dtype, requested compute dtype): equal, the two mixes autocast produces, and
# fp32 inputs computed in bf16 (autocast's dtype for an fp32 head and fp32 hidden states)
DTYPE_PAIRS = {"fp32": (F32, F32, None), "bf16": (BF16, BF16, None), "fp16": (F16, F16, None),
               "fp32-hidden-bf16-head": (F32, BF16, None), "bf16-hidden-fp32-head": (BF16, F32, None),
               "fp32-as-bf16": (F32, F32, BF16)}
OPTIONS = {
    "plain": dict(),
    "bias-softcap": dict(bias=True, softcap=3.0),
    "temperature-smoothing-rows": dict(temperature=0.7, smoothing=True, class_weight=True, rows=True),
    "all": dict(bias=True, softcap=2.0, temperature=1.9, smoothing=True, class_weight=True, rows=True),
}
N, D, V = 37, 24, 101  # no block size divides any of them


def out_of_range_targets(targets, V):
    """Targets a vocabulary shard does not own (or ignored ones): each must add nothing."""
    targets = targets.clone()
    targets[:4] = torch.tensor([-100, V, V + 7, 2**33 + 3])  # 2**33 + 3 reads as 3 after an int32 cast
    return targets


def backend_inputs(hidden_dtype, weight_dtype, opts, device, *, scale=4.0):
    hidden = torch.randn(N, D, device=device).to(hidden_dtype)
    weight = (torch.randn(V, D, device=device) * scale / D**0.5).to(weight_dtype)
    bias = (torch.randn(V, device=device) * 0.5).to(weight_dtype) if opts.get("bias") else None
    rows = None
    M = N
    if opts.get("rows"):
        rows = torch.randperm(N, device=device)[:29].sort().values
        M = rows.numel()
    targets = out_of_range_targets(torch.randint(0, V, (M,), device=device), V)
    class_weight = torch.rand(V, device=device) + 0.25 if opts.get("class_weight") else None
    return hidden, weight, bias, targets, rows, class_weight


def rounded(t, dtype):
    """float64 copy of t as the products see it (rounded to the compute dtype)."""
    return t.to(dtype).double()


def reference(hidden, weight, bias, targets, rows, coef=None, *, softcap=None, temperature=None, class_weight=None,
              compute_dtype=None):
    """float64 (stats dict, (d_hidden, d_weight, d_bias)) of the contract, from materialized logits."""
    cd = product_dtype(hidden.dtype, weight.dtype, compute_dtype)
    h = rounded(hidden, cd).requires_grad_()
    w = rounded(weight, cd).requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    z = naive.logits(h if rows is None else h[rows], w, b, softcap, temperature)
    V = w.shape[0]
    inside = (targets >= 0) & (targets < V)
    label = torch.where(inside, targets, 0).clamp(max=V - 1)
    zy = torch.where(inside, z.gather(1, label[:, None]).squeeze(1), 0.0)
    lse = torch.logsumexp(z, dim=1)
    p = torch.softmax(z, dim=1)
    u = class_weight.double() if class_weight is not None else torch.ones(V, dtype=torch.float64, device=z.device)
    # u_j * z_j with 0 * -inf = 0 (a class without weight, a masked logit)
    uz = (u * torch.where(u != 0, z, 0.0)).sum(1)
    stats = dict(lse=lse, target_logit=zy, entropy=-(p * torch.where(p > 0, torch.log(p), 0.0)).sum(1),
                 max_logit=z.max(1).values, argmax=z.argmax(1), smooth_sum=uz, logits=z)
    stats = {k: v.detach() for k, v in stats.items()}
    if coef is None:
        return stats, None
    a, bb, c = (t.double() if t is not None else torch.zeros_like(lse) for t in coef[:3])
    uz_grad = (u * z).sum(1) if coef.uniform is not None else 0.0
    (a * lse - bb * torch.where(inside, zy, 0.0) - c * uz_grad).sum().backward()
    return stats, (h.grad, w.grad, b.grad if b is not None else None)


def random_coefficients(M, device, *, uniform=True):
    return Coef(torch.randn(M, device=device), torch.randn(M, device=device),
                            torch.rand(M, device=device) * 0.3 if uniform else None)


def assert_stats(got, want, *, fields, tol=2e-5):
    for name in fields:
        a, b = getattr(got, name), want[name]
        assert a is not None, name
        if name == "argmax":
            # the first index of the max, or a logit tied with it to fp32 resolution (a saturated softcap)
            assert a.dtype == torch.int64, name
            z_max = want["max_logit"]
            tied = want["logits"].gather(1, a[:, None]).squeeze(1) >= z_max - 2**-22 * z_max.abs().clamp(min=1)
            assert torch.equal(a, b) or (tied.all() and (a <= b).all()), name
            continue
        assert a.dtype == torch.float32, name
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), name
        scale = b[finite].abs().max().clamp(min=1.0)
        assert ((a.double() - b)[finite].abs().max() / scale) < tol, (name, (a.double() - b).abs().max())


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtypes", list(DTYPE_PAIRS))
@pytest.mark.parametrize("options", list(OPTIONS))
def test_forward_and_backward_match_float64(backend, dtypes, options, device):
    opts = OPTIONS[options]
    hidden_dtype, weight_dtype, requested = DTYPE_PAIRS[dtypes]
    hidden, weight, bias, targets, rows, class_weight = backend_inputs(hidden_dtype, weight_dtype, opts, device)
    cap = dict(softcap=opts.get("softcap"), temperature=opts.get("temperature"), compute_dtype=requested)
    impl = BACKENDS[backend]
    stats = forward(impl, hidden, weight, bias, targets, rows, with_stats=True, smoothing=opts.get("smoothing", False),
                             class_weight=class_weight, **cap)
    coef = random_coefficients(targets.numel(), device, uniform=opts.get("smoothing", False))
    want, grads_want = reference(hidden, weight, bias, targets, rows, coef, class_weight=class_weight, **cap)
    # products of inputs rounded to the compute dtype are exact in fp32: the forward is fp32-accurate
    fields = ["lse", "target_logit", "entropy", "max_logit", "argmax"] + (["smooth_sum"] if opts.get("smoothing") else [])
    assert_stats(stats, want, fields=fields)
    assert (stats.target_logit[:4] == 0).all()
    if not opts.get("smoothing"):
        assert stats.smooth_sum is None

    grads = backward(impl, hidden, weight, bias, targets, rows, stats.lse, coef, class_weight=class_weight,
                               need_bias=bias is not None, **cap)
    tol = max(TOL[product_dtype(hidden_dtype, weight_dtype, requested)], TOL[hidden_dtype], TOL[weight_dtype])
    for name, like, got, ref in zip(("hidden", "weight", "bias"), (hidden, weight, bias), grads, grads_want):
        if like is None:
            assert got is None
            continue
        assert got.dtype == like.dtype and got.shape == like.shape, name
        assert rel_err(got, ref) < tol, (name, rel_err(got, ref))
    if rows is not None:
        skipped = torch.ones(N, dtype=torch.bool, device=device)
        skipped[rows] = False
        assert (grads[0][skipped] == 0).all()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_targets_outside_the_vocabulary_add_no_label_term(backend, device):
    """A vocabulary shard's view: the same tokens with labels inside and outside its range."""
    hidden, weight, bias, targets, rows, _ = backend_inputs(F32, F32, dict(bias=True), device)
    impl = BACKENDS[backend]
    inside = targets.clone()
    inside[:4] = torch.tensor([3, 5, 8, 13])
    stats_in = forward(impl, hidden, weight, bias, inside)
    stats_out = forward(impl, hidden, weight, bias, targets)
    assert torch.equal(stats_in.lse, stats_out.lse)
    assert (stats_out.target_logit[:4] == 0).all() and (stats_in.target_logit[:4] != 0).all()
    coef = random_coefficients(N, device, uniform=False)
    g_in = backward(impl, hidden, weight, bias, inside, None, stats_in.lse, coef, need_bias=True)
    g_out = backward(impl, hidden, weight, bias, targets, None, stats_out.lse, coef, need_bias=True)
    # only the one-hot terms of the four tokens differ: b_t at (t, y_t) of d(bias)
    expected_db = g_in[2].clone()
    for t, y in enumerate([3, 5, 8, 13]):
        expected_db[y] += coef.target[t]
    assert (g_out[2] - expected_db).abs().max() < 1e-5
    assert (g_out[0][4:] - g_in[0][4:]).abs().max() < 1e-6 and (g_out[0][:4] - g_in[0][:4]).abs().max() > 1e-3


def test_backends_agree_on_chunking_and_splits(device):
    """Several token / vocabulary chunks (torch) and vocabulary splits / chunks (triton) give the same result."""
    hidden, weight, labels, bias = make_inputs((50,), 36, 150, torch.float32, device, bias=True, scale=3.0)
    valid = labels != -100
    rows, targets = valid.nonzero().squeeze(1), labels[valid]
    class_weight = torch.rand(150, device=device)
    opts = dict(softcap=4.0, temperature=1.3, with_stats=True, smoothing=True, class_weight=class_weight)
    ref = forward(torch_backend.lse_forward, hidden, weight, bias, targets, rows, token_chunk=7, vocab_chunk=33, **opts)
    for splits in (1, 3, 5):
        got = forward(kernels.lse_forward, hidden, weight, bias, targets, rows, splits=splits, **opts)
        for name, a, b in zip(got._fields, got, ref):
            if b is None:  # reference statistics: no reference head here
                assert a is None, name
                continue
            assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item()), (name, splits)
    coef = random_coefficients(targets.numel(), device)
    cap = dict(softcap=4.0, temperature=1.3, class_weight=class_weight, need_bias=True)
    g_ref = backward(torch_backend.grad_backward, hidden, weight, bias, targets, rows, ref.lse, coef, token_chunk=9,
                                        vocab_chunk=40, **cap)
    for chunk in (None, 48, 64):
        got = backward(kernels.fused_backward, hidden, weight, bias, targets, rows, ref.lse, coef, vocab_chunk=chunk, **cap)
        for a, b in zip(got, g_ref):
            assert rel_err(a, b) < 1e-5
    # rows not computed get exactly zero gradient
    assert (g_ref[0][~valid] == 0).all()


# --- non-contiguous small tensors --------------------------------------------------------------------


def strided(t):
    """The same values as a view with stride 2 (every other element of a buffer twice as long)."""
    buf = torch.empty(t.shape[0] * 2, dtype=t.dtype, device=t.device)
    buf[::2] = t
    view = buf[::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_any_strides_of_per_token_and_per_class_tensors(backend, device):
    hidden, weight, bias, targets, rows, class_weight = backend_inputs(F32, F32, OPTIONS["all"], device)
    impl = BACKENDS[backend]
    cap = dict(softcap=2.0, temperature=1.9, class_weight=class_weight)
    stats = forward(impl, hidden, weight, bias, targets, rows, with_stats=True, smoothing=True, **cap)
    coef = random_coefficients(targets.numel(), device)
    grads = backward(impl, hidden, weight, bias, targets, rows, stats.lse, coef, need_bias=True, **cap)
    # the same values through strided views of every small tensor
    cap_s = dict(cap, class_weight=strided(class_weight))
    stats_s = forward(impl, hidden, weight, strided(bias), strided(targets), strided(rows), with_stats=True,
                               smoothing=True, **cap_s)
    for a, b in zip(stats, stats_s):
        assert (a is None and b is None) or torch.equal(a, b)
    coef_s = Coef(*(strided(t) if t is not None else None for t in coef))
    grads_s = backward(impl, hidden, weight, strided(bias), strided(targets), strided(rows), strided(stats.lse),
                                 coef_s, need_bias=True, **cap_s)
    for a, b in zip(grads, grads_s):
        assert_same_sums(a, b)
    # an expanded (stride 0) bias: one value for every class
    flat = bias[:1].expand(V)
    assert flat.stride() == (0,)
    got = forward(impl, hidden, weight, flat, targets, rows, **cap).lse
    want = forward(impl, hidden, weight, flat.contiguous(), targets, rows, **cap).lse
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_public_api_with_column_labels_and_expanded_bias(backend, device):
    """The issue's cases: labels pairs[:, 0] and tok[:, ::2], an expanded bias (loss 6.518 / 1.9e25 before)."""
    hidden, weight, _, _ = make_inputs((12,), 20, 60, torch.float32, device, ignore_frac=0, scale=3.0)
    pairs = torch.randint(0, 60, (12, 2), device=device)
    bias = torch.tensor([0.3], device=device).expand(60)
    for labels, b in ((pairs[:, 0], None), (pairs[:, 0], bias), (torch.randint(0, 60, (12, 2), device=device)[:, 0],
                                                                    torch.randn(120, device=device)[::2])):
        assert not labels.is_contiguous()
        got = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=b, objective="ce", **PUBLIC[backend])
        want = naive.linear_cross_entropy(hidden, weight, labels, bias=b, objective="ce")
        assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
    tok = torch.randint(0, 60, (2, 12), device=device)
    h2 = torch.randn(2, 6, 20, device=device)
    got = dft_ops.linear_cross_entropy(h2, weight, tok[:, ::2], objective="ce", **PUBLIC[backend])
    want = naive.linear_cross_entropy(h2, weight, tok[:, ::2], objective="ce")
    assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())


# --- extremes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_minus_inf_logits_mask_the_vocabulary(backend, softcap, device, monkeypatch):
    """A bias of -inf on a block of classes (all of Triton's first split, torch's first chunk)."""
    monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", 32)
    hidden, weight, bias, targets, rows, class_weight = backend_inputs(F32, F32, dict(bias=True), device)
    bias[:64] = float("-inf")  # the interpreter's first split is [0, 64), torch's first chunks [0, 32), [32, 64)
    bias[80] = float("-inf")
    class_weight = torch.rand(V, device=device) + 0.25
    class_weight[:64] = 0.0  # smoothing over the masked classes would be infinite; weight 0 removes them
    class_weight[80] = 0.0
    targets = torch.randint(64, 80, (N,), device=device)
    impl = BACKENDS[backend]
    stats = forward(impl, hidden, weight, bias, targets, with_stats=True, smoothing=True,
                             class_weight=class_weight, softcap=softcap)
    coef = random_coefficients(N, device)
    want, grads_want = reference(hidden, weight, bias, targets, None, coef, class_weight=class_weight, softcap=softcap)
    assert_stats(stats, want, fields=["lse", "target_logit", "entropy", "max_logit", "argmax", "smooth_sum"])
    assert torch.isfinite(stats.entropy).all() and torch.isfinite(stats.smooth_sum).all()
    grads = backward(impl, hidden, weight, bias, targets, None, stats.lse, coef, class_weight=class_weight,
                               softcap=softcap, need_bias=True)
    for got, ref in zip(grads, grads_want):
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) < 1e-5
    if softcap is None:  # masked rows of the head get exactly no gradient
        assert (grads[1][:64] == 0).all() and (grads[2][:64] == 0).all()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_logit_below_minus_1e30(backend, device):
    """Logits of -1e31 .. -2e31: the running max must start below any finite sentinel."""
    hidden, weight, bias, targets, rows, _ = backend_inputs(F32, F32, dict(bias=True), device)
    bias = -1e31 * (1 + torch.rand(V, device=device))
    targets[::2] = bias.argmax()  # half the labels are the argmax: logp 0, the rest -1e30-ish
    impl = BACKENDS[backend]
    stats = forward(impl, hidden, weight, bias, targets, with_stats=True)
    want, grads_want = reference(hidden, weight, bias, targets, None, random_coefficients(N, device, uniform=False))
    assert torch.isfinite(stats.lse).all()
    assert (stats.lse.double() - want["lse"]).abs().max() < 1e-6 * want["lse"].abs().max()
    assert (stats.entropy == 0).all() and torch.equal(stats.argmax, want["argmax"])
    assert (stats.target_logit[::2] - stats.lse[::2] == 0).all()


@pytest.mark.parametrize("backend", list(PUBLIC))
def test_public_api_with_masked_vocabulary(backend, device):
    hidden, weight, labels, _ = make_inputs((2, 11), 16, 70, torch.float32, device, scale=4.0)
    bias = torch.zeros(70, device=device)
    bias[:40] = float("-inf")
    labels = torch.where(labels == -100, labels, 40 + labels % 30)
    loss, stats = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, return_stats=True, **PUBLIC[backend])
    ref, ref_stats = naive.linear_cross_entropy(hidden, weight, labels, bias=bias, return_stats=True)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert torch.isfinite(stats.entropy).all()
    assert (stats.entropy.double() - ref_stats["entropy"]).abs().max() < 1e-5


# --- tanh ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh_kernel(x_ptr, t_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(t_ptr + offs, tanh(x), mask=offs < n)


@triton.jit
def _round_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, round_to(tl.load(x_ptr + offs), tl.bfloat16))


def test_tanh_is_accurate_at_every_magnitude(device):
    mags = torch.logspace(-8, 3, 3000, dtype=torch.float64)
    x = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64),
                   torch.tensor([float("inf"), float("-inf")], dtype=torch.float64)]).float().to(device)
    t = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, t, x.numel(), BLOCK=1024)
    want = torch.tanh(x.double())
    nonzero = want != 0
    assert ((t.double() - want)[nonzero].abs() / want[nonzero].abs()).max() < TANH_ULP * 2.0**-24
    assert (t[~nonzero] == 0).all()
    assert torch.equal(t[-2:], torch.tensor([1.0, -1.0], device=device))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_softcap_precision(backend, device):
    """softcap 1e6 is no cap (2.0839 for 2.0923 before); fp32 softcap 30 keeps the loss to fp32 accuracy."""
    hidden, weight, labels, _ = make_inputs((40,), 32, 90, torch.float32, device, scale=8.0, ignore_frac=0)
    for softcap in (1e6, 30.0):
        got = dft_ops.linear_cross_entropy(hidden, weight, labels, objective="ce", softcap=softcap, **PUBLIC[backend])
        want = naive.linear_cross_entropy(hidden, weight, labels, objective="ce", softcap=softcap)
        assert abs(got.item() - want.item()) < SOFTCAP_LOSS_REL * abs(want.item()), (softcap, got.item(), want.item())


# --- below the door: validated inputs, shapes asserted -------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backends_assert_the_shapes_they_are_given(backend):
    """Bad input is the door's to refuse (tests/test_inputs.py, test_errors.py): a backend only asserts shapes."""
    hidden, weight = torch.randn(6, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (6,))
    with pytest.raises(AssertionError):
        forward(BACKENDS[backend], hidden, weight, torch.zeros(21), targets)
    with pytest.raises(AssertionError):
        forward(BACKENDS[backend], hidden, weight, None, targets[:4])  # 4 targets, no rows, 6 hidden rows
    with pytest.raises(AssertionError):
        backward(BACKENDS[backend], hidden, weight, None, targets, None, torch.zeros(3), Coef(torch.ones(6),
                                                                                          torch.ones(6)))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_objective_of_the_wrong_shape_is_refused(backend, device):
    class Broken(dft_ops.objectives.CE):
        def weight(self, t):
            return torch.ones(t.logp.numel() + 1)

    hidden, weight, labels, _ = make_inputs((9,), 12, 30, torch.float32, device)
    with pytest.raises(ValueError, match=r"^objective: Broken.weight returned shape \(\d+,\); expected"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, objective=Broken(), **PUBLIC[backend])


# --- gradient filtering with the three coefficients ------------------------------------------------------


def test_filtering_keeps_the_uniform_term_exact(device):
    """Filtering skips only softmax / one-hot entries: the smoothing term (c_t u_j) is exact whatever eps."""
    hidden, weight, bias, targets, _, class_weight = backend_inputs(F32, F32, dict(bias=True, class_weight=True),
                                                                    device, scale=12.0)
    targets = targets.clamp(0, V - 1)
    lse = forward(kernels.lse_forward, hidden, weight, bias, targets).lse
    coef = random_coefficients(N, device)
    no_uniform = coef._replace(uniform=None)

    def run(c, eps, softcap=None):
        return backward(kernels.fused_backward, hidden, weight, bias, targets, None, lse, c, class_weight=class_weight,
                                     need_bias=True, filter_eps=eps, softcap=softcap)

    exact, exact_plain = run(coef, None), run(no_uniform, None)
    # a tiny threshold skips nothing: the rank-one path equals the in-kernel one
    for a, b in zip(run(coef, 1e-30), exact):
        assert rel_err(a, b) < 1e-6
    # a large one skips most tiles (the same ones with and without c), yet c's contribution stays exact
    filtered, filtered_plain = run(coef, 0.3), run(no_uniform, 0.3)
    assert rel_err(filtered_plain[1], exact_plain[1]) > 1e-3  # tiles were skipped
    for f, fp, e, ep in zip(filtered, filtered_plain, exact, exact_plain):
        assert rel_err(f - fp, e - ep) < 1e-5
    # under a softcap the uniform term is not rank one: filtering is off, the result exact
    lse_c = forward(kernels.lse_forward, hidden, weight, bias, targets, softcap=5.0).lse
    for a, b in zip(backward(kernels.fused_backward, hidden, weight, bias, targets, None, lse_c, coef, class_weight=class_weight,
                                          need_bias=True, filter_eps=0.3, softcap=5.0),
                    backward(kernels.fused_backward, hidden, weight, bias, targets, None, lse_c, coef, class_weight=class_weight,
                                          need_bias=True, softcap=5.0)):
        assert torch.equal(a, b)


# --- precise mode -------------------------------------------------------------------------------------------


def elementwise_errors(d_hidden, want):
    """Elementwise relative error of d(hidden) against float64, over elements larger than 1e-3 of the largest."""
    big = want.abs() > 1e-3 * want.abs().max()
    return ((d_hidden.double() - want).abs() / want.abs())[big]


def cancellation_errors(hidden, weight, targets, lse, coef, want, precise):
    d_hidden = backward(kernels.fused_backward, hidden, weight, None, targets, None, lse, coef, need_weight=False,
                                     precise=precise)[0]
    return elementwise_errors(d_hidden, want)


def peaked_case(n, d, v, peak, device):
    """A bf16 head and hidden states that lean towards their label's row by ``peak``: p(label) spans (0, 1).

    hidden holds bf16 values in an fp32 tensor, so d(hidden) comes back in fp32
    and what is measured is G's rounding (to bf16: the compute dtype), not the
    output's.
    """
    weight = (torch.randn(v, d, device=device) / d**0.5).to(BF16)
    targets = torch.randint(0, v, (n,), device=device)
    hidden = (peak * weight[targets].float() * d**0.5 + torch.randn(n, d, device=device)).to(BF16).float()
    lse = forward(kernels.lse_forward, hidden, weight, None, targets).lse
    coef = Coef(torch.ones(n, device=device), torch.ones(n, device=device))
    _, (want, _, _) = reference(hidden, weight, None, targets, None, coef)
    return hidden, weight, targets, lse, coef, want


def test_precise_mode_is_elementwise_accurate_where_terms_cancel(device):
    case = peaked_case(N, D, V, 1.0, device)
    default = cancellation_errors(*case, precise=False)
    precise = cancellation_errors(*case, precise=True)
    # G rounded to bf16 (8 bits) vs G as bf16 high + low parts (16 bits): docs/math.md has the numbers
    assert default.max() > 1e-2
    assert precise.max() < 1e-3 and precise.max() < default.max() / 50
    # fp32 inputs have nothing to split: precise changes nothing
    h, w, y, lse, coef, _ = case
    w = w.float()
    a = backward(kernels.fused_backward, h, w, None, y, None, lse, coef, precise=True)
    b = backward(kernels.fused_backward, h, w, None, y, None, lse, coef)
    assert_same_sums(a[0], b[0])
    assert_same_sums(a[1], b[1])


@pytest.mark.parametrize("dtype", [F32, F16])
def test_interpreter_rounds_bf16_to_nearest_even(dtype, device):
    # fp16 sources too: fp16 hidden states under bf16 autocast are rounded this way
    big = 3e38 if dtype == F32 else 6e4
    x = torch.cat([torch.randn(1000), torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), big, 0.0])])
    x = torch.cat([x, torch.randn(1024 - x.numel())]).to(dtype).to(device)  # a GPU rounds in hardware
    assert not torch.equal(x.to(BF16).to(dtype), x)  # some entries need rounding
    y = torch.empty(1024, dtype=BF16, device=device)
    _round_kernel[(1,)](x, y, BLOCK=1024)
    assert torch.equal(y, x.to(BF16))


# --- loss_terms: every objective with every option, through both backends ------------------------------------


def fused_token_loss(impl, hidden, weight, labels, bias, objective, upstream, *, label_smoothing=0.0,
                     class_weight=None, z_loss=0.0, softcap=None, temperature=None, ignore_index=-100, batch=None):
    """What the autograd Function does with the options, by hand: per-token values and gradients."""
    layout = TokenLayout(labels, ignore_index=ignore_index)
    layout.compact(weight.shape[0])
    options = LossOptions(objective=objective, label_smoothing=label_smoothing, class_weight=class_weight,
                          z_loss=z_loss, softcap=softcap, temperature=temperature, ignore_index=ignore_index)
    head, tokens = contract(hidden, weight, bias, layout.row_targets, layout.rows, softcap=softcap,
                            temperature=temperature, class_weight=class_weight)
    call = LossCall(layout, options, head, impl, weight.shape[0],
                    token_inputs={name: layout.align(t) for name, t in (batch or {}).items()},
                    segments=torch.zeros_like(layout.row_targets) if options.objective.needs_segments else None)
    stats = impl.lse_forward(hidden, head, tokens, with_stats=True, smoothing=label_smoothing > 0)
    terms = loss_terms.token_loss(stats, call)
    grads = impl.grad_backward(hidden, head, tokens, terms.terms.scaled(layout.pick(upstream.reshape(-1))),
                               Needs(True, True, bias is not None))
    valid = labels != ignore_index
    value = torch.zeros(labels.shape, device=labels.device).masked_scatter(valid, terms.value)
    return value, terms, grads


LOSS_CONFIGS = {
    "fp32-smooth-cw-zloss-temp-bias": dict(dtype=F32, label_smoothing=0.1, class_weight=True, z_loss=1e-2,
                                           temperature=0.8, bias=True),
    "bf16-smooth-softcap-temp": dict(dtype=BF16, label_smoothing=0.2, softcap=3.0, temperature=1.5),
    "fp16-cw-zloss-ignore5": dict(dtype=F16, class_weight=True, z_loss=1e-3, ignore_index=5, bias=True),
}


@pytest.mark.parametrize("config", list(LOSS_CONFIGS))
@pytest.mark.parametrize("case", ["ce", "dft", "power-0.5", "chord", "focal-2", "threshold-dft-band", "psft",
                                  "importance-weighted", "sequence-product"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_loss_terms_match_float64_for_every_objective(backend, case, config, device):
    from test_objectives import make_case, peaked_inputs

    opts = dict(LOSS_CONFIGS[config])
    dtype = opts.pop("dtype")
    ignore_index = opts.pop("ignore_index", -100)
    hidden, weight, labels, bias = peaked_inputs((23,), dtype, device, shift=False, bias=opts.pop("bias", False),
                                                 ignore_index=ignore_index)
    Vn = weight.shape[0]
    if opts.pop("class_weight", False):
        opts["class_weight"] = torch.rand(Vn, device=device) * 1.5 + 0.1
    cap = {k: opts[k] for k in ("softcap", "temperature") if k in opts}
    _, ref_stats = naive.linear_cross_entropy(hidden, weight, labels, bias=bias, return_stats=True,
                                              ignore_index=ignore_index, **cap)
    valid = labels != ignore_index
    objective, batch = make_case(case, ref_stats["logprob"].float(), valid)
    objective = dft_ops.objectives.resolve(objective)
    upstream = torch.randn(labels.shape, device=device)
    value, terms, grads = fused_token_loss(BACKENDS[backend], hidden, weight, labels, bias, objective, upstream,
                                           ignore_index=ignore_index, batch=batch, **opts)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    want = naive.linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], objective=objective, reduction="none",
                                      ignore_index=ignore_index, **batch, **opts)
    want.backward(upstream.double())
    assert (value.double() - want.detach()).abs().max() < 1e-4 * want.detach().abs().max().clamp(min=1)
    tol = TOL[dtype]
    for name, got, leaf in zip(("hidden", "weight", "bias"), grads, leaves):
        if leaf is None:
            continue
        assert got.dtype == dtype
        assert rel_err(got, leaf.grad) < tol, (name, rel_err(got, leaf.grad))
    if "class_weight" in opts:
        assert torch.equal(terms.target_weight, opts["class_weight"][labels[valid]])
    assert (terms.z_loss is None) == ("z_loss" not in opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_pytorch_cross_entropy(reduction, device):
    """naive's CE with label smoothing and class weights is torch.nn.functional.cross_entropy's."""
    hidden, weight, labels, bias = make_inputs((3, 7), 10, 23, torch.float64, device, bias=True, ignore_index=4)
    class_weight = torch.rand(23, dtype=torch.float64, device=device) + 0.1
    got = naive.linear_cross_entropy(hidden, weight, labels, bias=bias, objective="ce", reduction=reduction,
                                     label_smoothing=0.15, class_weight=class_weight, ignore_index=4)
    z = naive.logits(hidden, weight, bias)
    want = torch.nn.functional.cross_entropy(z.reshape(-1, 23), labels.reshape(-1), weight=class_weight,
                                             label_smoothing=0.15, ignore_index=4, reduction=reduction)
    assert torch.allclose(got.reshape(-1), want.reshape(-1), rtol=1e-12, atol=1e-12)


def test_loss_terms_without_options_are_the_objective():
    """No option: value is the objective's value and a = b = its weight, bit for bit."""
    M = 11
    stats = dft_ops.backends.ForwardStats(lse=torch.randn(M) + 5, target_logit=torch.randn(M))
    batch = dft_ops.objectives.TokenBatch(logp=stats.target_logit - stats.lse)
    layout = TokenLayout(torch.zeros(M, dtype=torch.long))
    layout.compact(30)
    for obj in (dft_ops.objectives.DFT(), dft_ops.objectives.Focal(2.0)):
        call = LossCall(layout, LossOptions(objective=obj), None, None, 30)
        terms = loss_terms.token_loss(stats, call)
        assert torch.equal(terms.value, obj.value(batch)) and terms.terms.uniform is None
        assert torch.equal(terms.terms.softmax, obj.weight(batch)) and torch.equal(terms.terms.target, obj.weight(batch))
        assert terms.z_loss is None and terms.target_weight is None


def test_kernels_directory_imports_as_a_top_level_package():
    """transformers imports a `kernels` it finds on sys.path (the repository root, e.g. in tests/test_bench.py)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    code = "import sys; sys.path.insert(0, sys.argv[1]); import kernels; assert kernels.lse_forward"
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
