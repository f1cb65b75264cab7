"""dft_ops.linear_cross_entropy against the float64 reference, both backends.

On a CPU machine the "triton" backend runs the real kernels under
TRITON_INTERPRET=1 (see conftest.py); shapes are small and deliberately not
multiples of any block size (tiles are 16 tokens x 32 vocab x 16 hidden there).
"""

import pytest
import torch

import dft_ops
from helpers import TOL, OutputsSeen, check_against_reference, loss_and_grads, make_inputs, rel_err, small_chunks

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, D, V): token counts, hidden sizes and vocabularies no block divides
SHAPES = [((2, 19), 40, 101), ((37,), 24, 67)]
OPTION_SETS = [
    dict(),
    dict(shift=True),
    dict(softcap=3.0, bias=True),
    dict(shift=True, softcap=2.5, bias=True, ignore_index=7),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective", ["ce", "dft"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", range(len(OPTION_SETS)))
def test_matches_reference(backend, dtype, objective, reduction, options, device):
    opts = dict(OPTION_SETS[options])
    shape, D, V = SHAPES[0] if opts.get("shift") or options % 2 == 0 else SHAPES[1]
    ignore_index = opts.pop("ignore_index", -100)
    hidden, weight, labels, bias = make_inputs(shape, D, V, dtype, device, bias=opts.pop("bias", False),
                                               scale=4.0, ignore_index=ignore_index)
    upstream = None
    if reduction == "none":
        loss_shape = (*shape[:-1], shape[-1] - 1) if opts.get("shift") else shape
        upstream = torch.randn(loss_shape, device=device)  # per-token upstream gradient
    check_against_reference(hidden, weight, labels, bias, backend=backend, upstream=upstream,
                            objective=objective, reduction=reduction, ignore_index=ignore_index, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stats_match_reference(backend, dtype, device):
    hidden, weight, labels, bias = make_inputs((3, 13), 40, 90, dtype, device, bias=True, scale=6.0)
    # make some labels the argmax so is_top1 has both values
    with torch.no_grad():
        z = dft_ops.naive.logits(hidden, weight, bias)
        top = z.argmax(-1)[..., :-1]  # with shift, position t predicts labels[..., t + 1]
        pick = torch.rand(top.shape, device=device) < 0.5
        labels[..., 1:] = torch.where(pick, top, labels[..., 1:])
    loss, stats = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, shift=True, return_stats=True,
                                               backend=backend)
    _, ref = dft_ops.naive.linear_cross_entropy(hidden, weight, labels, bias=bias, shift=True, return_stats=True)
    assert set(stats.keys()) == {"logprob", "entropy", "is_top1", "mask", "lse", "predicted", "z_loss",
                                 "reduced_z_loss", "kl"}
    assert stats.z_loss is None and stats.reduced_z_loss is None  # z_loss option off
    assert stats.kl is None  # not an ASFT objective
    assert stats.mask.dtype == torch.bool and torch.equal(stats["mask"], labels[..., 1:] != -100)
    for key in ("logprob", "entropy"):
        assert stats[key].shape == (3, 12) and stats[key].dtype == torch.float32
        assert not stats[key].requires_grad
        assert (stats[key].double() - ref[key]).abs().max() < 1e-4, key
    assert stats.is_top1.dtype == torch.bool
    assert torch.equal(stats.is_top1, ref["is_top1"])
    assert stats.is_top1.any() and not stats.is_top1.all()
    ignored = labels[..., 1:] == -100
    assert (stats.logprob[ignored] == 0).all() and (stats.entropy[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_editing_returned_stats_leaves_backward_alone(backend, device):
    """No ignored token and no shift: every returned statistic must still be the caller's own tensor."""
    hidden, weight, labels, _ = make_inputs((29,), 24, 67, torch.float32, device, scale=4.0)
    labels = torch.randint(0, 67, (29,), device=device)
    grads = []
    for edit in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = dft_ops.linear_cross_entropy(h, w, labels, objective="dft", return_stats=True, backend=backend)
        if edit:
            for key in ("logprob", "entropy", "lse"):
                stats[key].add_(torch.rand_like(stats[key]))
        loss.backward()
        grads.append((h.grad, w.grad))
    for ours, want in zip(grads[1], grads[0]):
        assert torch.equal(ours, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradients(backend, reduction, device):
    hidden, weight, labels, bias = make_inputs((2, 5), 16, 33, torch.float32, device, bias=True)
    labels[:] = -100
    out, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias,
                                torch.ones(2, 5, device=device), labels=labels, reduction=reduction, backend=backend)
    assert torch.isfinite(out).all() and (out == 0).all()
    for g in grads:
        assert g is not None and torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["ce", "dft"])
def test_single_token(backend, objective, device):
    hidden, weight, labels, bias = make_inputs((1,), 20, 45, torch.float32, device, ignore_frac=0)
    check_against_reference(hidden, weight, labels, bias, backend=backend, objective=objective)


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_large_logits(backend, device):
    # logits of order 1e4: exp() overflows fp32 past 88, so this checks the online max.
    # fp32 logits that large carry ~|z| * 2**-24 * sqrt(D) ~ 1e-2 absolute error each,
    # which bounds how well any fp32 implementation can match float64: tolerance 5e-3.
    hidden, weight, labels, bias = make_inputs((2, 9), 32, 70, torch.float32, device, scale=2e4)
    for objective in ("ce", "dft"):
        check_against_reference(hidden, weight, labels, bias, backend=backend, objective=objective, tol=5e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch(backend, device):
    hidden, weight, labels, _ = make_inputs((2, 11), 24, 50, torch.float32, device)
    for n in (7, torch.tensor(31, device=device)):
        check_against_reference(hidden, weight, labels, None, backend=backend, num_items_in_batch=n, shift=True)
    # gradient accumulation: two halves with the full batch's count == the full batch
    n_items = int((labels[:, 1:] != -100).sum())
    full, g_full = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels, shift=True,
                                  backend=backend)
    parts = [loss_and_grads(dft_ops.linear_cross_entropy, hidden[i:i + 1], weight, None, labels=labels[i:i + 1],
                            shift=True, num_items_in_batch=n_items, backend=backend) for i in range(2)]
    assert torch.allclose(parts[0][0] + parts[1][0], full, rtol=1e-5)
    assert torch.allclose(parts[0][1][1] + parts[1][1][1], g_full[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_frozen_weight(backend, device):
    hidden, weight, labels, bias = make_inputs((2, 10), 24, 40, torch.float32, device, bias=True)
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # (2, 10, 24) non-contiguous view
    weight_t = weight.T.contiguous().T  # column-major (V, D)
    assert not hidden_t.is_contiguous() and not weight_t.is_contiguous()
    check_against_reference(hidden_t, weight_t, labels, bias, backend=backend)
    # only hidden needs a gradient (a frozen head)
    h = hidden.clone().requires_grad_()
    dft_ops.linear_cross_entropy(h, weight, labels, bias=bias, backend=backend).backward()
    h_ref = hidden.double().requires_grad_()
    dft_ops.naive.linear_cross_entropy(h_ref, weight.double(), labels, bias=bias.double()).backward()
    assert rel_err(h.grad, h_ref.grad) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_equals_functional(dtype, device):
    hidden, weight, labels, bias = make_inputs((2, 8), 16, 30, dtype, device, bias=True)
    module = dft_ops.LinearCrossEntropy("ce", shift=True, softcap=5.0, reduction="sum")
    assert "objective" in repr(module)
    a = module(hidden, weight, labels, bias)
    b = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, objective="ce", shift=True, softcap=5.0,
                                     reduction="sum")
    assert torch.equal(a, b)


def test_gradient_filtering_is_exact_when_off_and_active_when_on(device):
    hidden, weight, labels, _ = make_inputs((4, 16), 32, 96, torch.float32, device, scale=8.0, ignore_frac=0)
    exact, g_exact = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels,
                                    backend="triton")
    tiny, g_tiny = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels,
                                  backend="triton", filter_eps=1e-30)
    assert rel_err(g_tiny[1], g_exact[1]) < 1e-6
    # a huge threshold skips every tile: the gradient vanishes, proving the filter is wired in
    _, g_all = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels,
                              backend="triton", filter_eps=0.99)
    assert g_all[1].abs().max() < g_exact[1].abs().max()


@pytest.mark.parametrize("backend, backward_mode", [("torch", "gemm"), ("torch", "onepass"), ("triton", "gemm"),
                                                    ("triton", "fused"), ("triton", "onepass")])
def test_never_builds_tokens_by_vocab(backend, backward_mode, device, monkeypatch):
    """No torch op in forward or backward produces a tensor with tokens x vocab elements.

    The gemm backward's workspace holds a (token chunk x vocabulary split) block of G, bounded by
    workspace_mb: here 6 KiB, a fraction of tokens x vocab. The one-pass head's holds a chunk of 16 tokens'
    logits (the chunk floor, made small for the test).
    """
    small_chunks(monkeypatch, tokens=16, vocab=64)
    workspace = {} if backward_mode == "onepass" else dict(workspace_mb=6 / 1024)
    N, D, V = 96, 8, 400
    hidden, weight, labels, bias = make_inputs((N,), D, V, torch.float32, device, bias=True)
    hidden.requires_grad_()
    weight.requires_grad_()

    with OutputsSeen() as watch:
        loss = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend, return_stats=True,
                                            backward_mode=backward_mode, **workspace)[0]
        loss.backward()
    # not the interpreter's own byte copies of what a kernel reads (uint8: 4 elements per fp32 element); the
    # weight and its gradient (V * D) are the largest legitimate tensors, a logits block would be N * V
    largest = [numel for numel, dtype in watch.seen if dtype != torch.uint8]
    assert max(largest) < N * V / 2, max(largest)
    assert max(largest) >= V * D  # the watch saw the weight gradient


def test_dft_facts(device):
    """Uniform logits: DFT/CE = 1/V; p = 1/2 everywhere: DFT = CE/2; DFT grad = p * CE grad per token."""
    for V, ratio in ((37, 1 / 37), (2, 0.5)):
        hidden = torch.randn(9, 12, device=device)
        weight = torch.randn(1, 12, device=device).expand(V, 12).contiguous()  # identical rows: p = 1/V
        labels = torch.randint(0, V, (9,), device=device)
        for backend in BACKENDS:
            ce = dft_ops.linear_cross_entropy(hidden, weight, labels, objective="ce", backend=backend)
            dft = dft_ops.linear_cross_entropy(hidden, weight, labels, objective="dft", backend=backend)
            assert torch.allclose(dft / ce, torch.tensor(ratio, device=device), rtol=1e-5)
    hidden, weight, labels, _ = make_inputs((20,), 16, 60, torch.float32, device, scale=5.0, ignore_frac=0)
    upstream = torch.randn(20, device=device)
    for backend in BACKENDS:
        grads = {}
        for objective in ("ce", "dft"):
            _, (gh, _) = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, upstream, labels=labels,
                                        objective=objective, reduction="none", backend=backend)
            grads[objective] = gh
        _, stats = dft_ops.linear_cross_entropy(hidden, weight, labels, return_stats=True, backend=backend)
        p = stats.logprob.exp()
        assert rel_err(grads["dft"], p[:, None] * grads["ce"]) < 1e-5


def test_auto_backend_is_torch_on_cpu_and_tolerances_are_meaningful():
    hidden, weight, labels, _ = make_inputs((6,), 8, 20, torch.float32, "cpu")
    a = dft_ops.linear_cross_entropy(hidden, weight, labels, backend="auto")
    b = dft_ops.linear_cross_entropy(hidden, weight, labels, backend="torch")
    assert torch.equal(a, b)
    # the comparison would catch a wrong objective: CE and DFT differ far beyond the tolerance
    dft = dft_ops.linear_cross_entropy(hidden, weight, labels, objective="dft")
    assert rel_err(a, dft) > 100 * TOL[torch.float32]


@pytest.mark.parametrize("num_items", [0, 0.0, torch.tensor(0), torch.tensor(0.0)], ids=["int", "float", "long", "t"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_num_items_with_every_token_ignored(backend, num_items, device):
    """transformers.Trainer passes num_items_in_batch=0 for a step whose labels are all -100."""
    hidden, weight, labels, bias = make_inputs((2, 6), 16, 40, torch.float32, device, bias=True)
    ignored = torch.full_like(labels, -100)
    num = num_items.to(device) if isinstance(num_items, torch.Tensor) else num_items
    loss, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, labels=ignored,
                                 num_items_in_batch=num, backend=backend, shift=True)
    assert loss.item() == 0 and all((g == 0).all() for g in grads)
    with pytest.raises(ValueError, match="^num_items_in_batch: must be a positive finite number, got 0.0 with"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num, backend=backend)
    for bad in (-1, float("nan"), torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="^num_items_in_batch"):
            dft_ops.linear_cross_entropy(hidden, weight, ignored, num_items_in_batch=bad, backend=backend)


def test_the_default_objective_is_cross_entropy():
    """A function named cross-entropy computes cross-entropy unless told otherwise (a Cut Cross-Entropy or Liger
    user who swaps the import trains what they trained before): F.cross_entropy of the logits, and the module
    and the options agree."""
    hidden, weight, labels, _ = make_inputs((3, 11), 16, 37, torch.float32, "cpu")
    expected = torch.nn.functional.cross_entropy((hidden.double() @ weight.double().T).flatten(0, 1),
                                                 labels.flatten())
    assert rel_err(dft_ops.linear_cross_entropy(hidden, weight, labels), expected) < TOL[torch.float32]
    assert rel_err(dft_ops.LinearCrossEntropy()(hidden, weight, labels), expected) < TOL[torch.float32]
    assert type(dft_ops.LossOptions().objective).__name__ == "CE"


def test_patch_says_which_objective_it_trains(capsys):
    """patch() keeps DFT as its default (the package's purpose) and says so once, on stderr."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = dft_ops.patch(transformers.Qwen2ForCausalLM(config))
    dft_ops.patch(model)  # the same objective again: nothing more to say
    err = capsys.readouterr().err
    assert err.count("[dft_ops]") == 1 and "Qwen2ForCausalLM trains DFT()" in err and "objective='ce'" in err
    dft_ops.patch(model, objective="ce")
    assert "trains CE()" in capsys.readouterr().err
