"""Inputs the issue found mishandled, on both backends, against the float64 reference.

Integer shift, strided / expanded labels and per-token inputs, unsigned labels,
num_items_in_batch of any one-element shape, custom objectives with wrong
outputs, double backward, and mixed dtypes (as autocast produces them).
"""

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import dft_ops
from dft_ops import objectives as o
from dft_ops.inputs import compute_dtype
from helpers import TOL, OutputsSeen, check_against_reference, loss_and_grads, make_inputs, rel_err

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [2, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_integer_shift_matches_reference(backend, shift, reduction, device):
    # position t predicts labels[..., t + shift] (Cut Cross-Entropy's convention)
    shape = (2, 13)
    hidden, weight, labels, bias = make_inputs(shape, 24, 67, torch.float32, device, bias=True, scale=4.0)
    upstream = torch.randn(2, 13 - shift, device=device) if reduction == "none" else None
    ours, ref = check_against_reference(hidden, weight, labels, bias, backend=backend, upstream=upstream,
                                        objective="dft", reduction=reduction, shift=shift, softcap=5.0,
                                        return_stats=True)
    stats, ref_stats = ours[1], ref[1]
    assert stats.logprob.shape == (2, 13 - shift)
    assert torch.equal(stats.mask, labels[..., shift:] != -100)
    for key in ("logprob", "entropy"):
        assert (stats[key].double() - ref_stats[key]).abs().max() < 1e-4, key
    assert torch.equal(stats.is_top1, ref_stats["is_top1"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_shift_with_per_token_inputs_and_segments(backend, device):
    shape, shift = (2, 12), 2
    hidden, weight, labels, _ = make_inputs(shape, 24, 67, torch.float32, device, scale=4.0)
    old = torch.randn(2, 12 - shift, device=device) - 3.0
    check_against_reference(hidden, weight, labels, None, backend=backend, objective=o.PSFT(), old_logprobs=old,
                            shift=shift)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]] * 2, device=device)
    check_against_reference(hidden, weight, labels, None, backend=backend, objective=o.SequenceDFT("geometric"),
                            shift=shift, position_ids=position_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_past_the_sequence_gives_an_empty_loss(backend, device):
    hidden, weight, labels, _ = make_inputs((2, 3), 16, 33, torch.float32, device)
    for reduction in ("mean", "sum", "none"):
        out, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None,
                                    torch.ones(2, 0, device=device), labels=labels, shift=3, reduction=reduction,
                                    backend=backend)
        assert out.shape == ((2, 0) if reduction == "none" else ())
        assert (out == 0).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_labels(backend, device):
    D, V = 20, 53
    pairs = torch.randint(0, V, (11, 2), device=device)
    tokens = torch.randint(0, V, (2, 18), device=device)
    tokens[0, 4] = -100
    cases = [
        (pairs[:, 0], torch.randn(11, D, device=device), {}),                  # a column of a (N, 2) tensor
        (tokens[:, ::2], torch.randn(2, 9, D, device=device), dict(shift=True)),  # every other token
        (torch.tensor([3], device=device).expand(7), torch.randn(7, D, device=device), {}),  # stride 0
    ]
    weight = torch.randn(V, D, device=device) * 0.3
    for labels, hidden, opts in cases:
        assert not labels.is_contiguous()
        ours, ref = check_against_reference(hidden, weight, labels, None, backend=backend, **opts)
        # the same path (gradients needed: one-pass), contiguous labels: the very same numbers
        same = dft_ops.linear_cross_entropy(hidden.requires_grad_(), weight, labels.contiguous(), backend=backend,
                                            **opts)
        assert torch.equal(ours, same)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_position_ids_and_per_token_inputs(backend, device):
    hidden, weight, labels, _ = make_inputs((3, 10), 24, 67, torch.float32, device, scale=4.0)
    ref_logprobs = torch.randn(9, 3, device=device).T - 2.0  # (3, 9), transposed storage
    assert not ref_logprobs.is_contiguous()
    check_against_reference(hidden, weight, labels, None, backend=backend, shift=True,
                            objective=o.ImportanceWeighted(), ref_logprobs=ref_logprobs)
    position_ids = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3, 4] * 6, device=device).reshape(3, 20)[:, ::2]
    assert not position_ids.is_contiguous()
    check_against_reference(hidden, weight, labels, None, backend=backend, shift=True,
                            objective=o.SequenceDFT("product"), position_ids=position_ids)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32], ids=str)
def test_integer_label_dtypes_are_read_exactly(dtype, device):
    V = 200
    hidden, weight, labels, _ = make_inputs((3, 8), 16, V, torch.float32, device, ignore_frac=0.2, ignore_index=250)
    want = dft_ops.linear_cross_entropy(hidden, weight, labels, ignore_index=250, shift=True)
    got = dft_ops.linear_cross_entropy(hidden, weight, labels.to(dtype), ignore_index=250, shift=True)
    assert torch.equal(got, want)
    # an ignore_index no label of this dtype can hold ignores nothing (and is no error)
    full = dft_ops.linear_cross_entropy(hidden, weight, labels.clamp(max=V - 1).to(dtype), ignore_index=-100)
    assert torch.equal(full, dft_ops.linear_cross_entropy(hidden, weight, labels.clamp(max=V - 1)))


def test_ignore_index_anywhere_in_int64(device):
    hidden, weight, labels, _ = make_inputs((2, 9), 16, 40, torch.float32, device, ignore_frac=0)
    for ignore_index in (2**62, -(2**63)):
        marked = labels.clone()
        marked[0, :4] = ignore_index
        got = dft_ops.linear_cross_entropy(hidden, weight, marked, ignore_index=ignore_index)
        want = dft_ops.linear_cross_entropy(hidden, weight, torch.where(marked == ignore_index, -100, marked))
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch_of_any_one_element_shape_gives_a_0d_loss(backend, device):
    hidden, weight, labels, _ = make_inputs((2, 9), 16, 40, torch.float32, device)
    want = dft_ops.linear_cross_entropy(hidden, weight, labels, num_items_in_batch=13, backend=backend)
    for n in (torch.tensor([[13]], device=device), torch.tensor([13.0], device=device), 13.0,
              torch.tensor(13, dtype=torch.int32, device=device)):
        got = dft_ops.linear_cross_entropy(hidden, weight, labels, num_items_in_batch=n, backend=backend)
        assert got.shape == () and torch.equal(got, want)
    # the divisor is num_items_in_batch, not the count of this batch's tokens
    n_valid = int((labels != -100).sum())
    mean = dft_ops.linear_cross_entropy(hidden, weight, labels, backend=backend)
    assert torch.allclose(want * 13, mean * n_valid, rtol=1e-6)


class _Broken(o.Objective):
    """DFT whose value or weight comes back wrong in one way."""

    name = "broken"

    def __init__(self, what, make):
        self.what, self.make = what, make

    def value(self, t):
        return self.make(t) if self.what == "value" else -t.p * t.logp

    def weight(self, t):
        return self.make(t) if self.what == "weight" else t.p


BROKEN = [
    (ValueError, "value", lambda t: -t.logp[:-1], "shape"),
    (ValueError, "weight", lambda t: t.p[:, None], "shape"),
    (ValueError, "weight", lambda t: t.p.repeat(2), "shape"),
    (TypeError, "weight", lambda t: (t.p > 0.5).long(), "dtype"),
    (TypeError, "value", lambda t: 1.0, "float"),
    (TypeError, "weight", lambda t: t.p.to(torch.complex64), "dtype"),
    (ValueError, "weight", lambda t: torch.ones(t.logp.shape, device="meta"), "meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exc, what, make, fragment", BROKEN, ids=[f"{c[1]}-{c[3]}-{i}" for i, c in enumerate(BROKEN)])
def test_custom_objective_with_wrong_output_raises_before_backward(backend, exc, what, make, fragment, device,
                                                                   monkeypatch):
    from dft_ops import kernels
    from dft_ops.backends import torch_backend

    def no_backward(*args, **kwargs):
        raise AssertionError("the backward kernel ran")

    monkeypatch.setattr(kernels.TritonBackend, "grad_backward", no_backward)
    monkeypatch.setattr(torch_backend.TorchBackend, "grad_backward", no_backward)
    hidden, weight, labels, _ = make_inputs((2, 7), 16, 40, torch.float32, device)
    h = hidden.requires_grad_()
    with pytest.raises(exc, match=rf"^objective: _Broken\.{what} returned .*{fragment}"):
        dft_ops.linear_cross_entropy(h, weight, labels, objective=_Broken(what, make), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_clearly(backend, device):
    hidden, weight, labels, bias = make_inputs((2, 6), 16, 40, torch.float32, device, bias=True)
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    loss = dft_ops.linear_cross_entropy(h, w, labels, bias=bias, backend=backend)
    # loss + ||dL/dh||^2 needs a graph through the gradient: refused, never silently plain CE
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        loss.backward(create_graph=True)
    # the ordinary backward still works, also inside enable_grad and activation checkpointing (whose backward
    # runs a nested backward), which must not be mistaken for a double backward
    loss = dft_ops.linear_cross_entropy(h, w, labels, bias=bias, backend=backend)
    (g,) = torch.autograd.grad(loss, h)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    for reentrant in (True, False):
        h.grad = None
        with torch.enable_grad():
            torch.utils.checkpoint.checkpoint(
                lambda x: dft_ops.linear_cross_entropy(x, w, labels, bias=bias, backend=backend), h,
                use_reentrant=reentrant).backward()
        assert torch.allclose(h.grad, g, rtol=1e-6, atol=1e-8)


MIXED = [  # (hidden, weight, bias): autocast-style mixtures; products in the 16-bit dtype, bias added in fp32
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float32, None),
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float16),  # the bias's dtype decides nothing
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t).split(".")[-1] for t in d if t is not None))
def test_mixed_dtypes_match_reference(backend, dtypes, device):
    h_dtype, w_dtype, b_dtype = dtypes
    low = h_dtype if h_dtype != torch.float32 else w_dtype
    hidden, weight, labels, bias = make_inputs((2, 11), 24, 67, torch.float32, device, bias=b_dtype is not None,
                                               scale=4.0)
    hidden, weight = hidden.to(h_dtype), weight.to(w_dtype)
    bias = None if bias is None else bias.to(b_dtype)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    assert compute_dtype("weight", hidden, weight) == low
    ours, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, labels=labels, shift=True,
                                 backend=backend)
    # what is computed: hidden and weight rounded to the 16-bit dtype, the bias as given, in float64
    rounded = [t.to(low).double() for t in leaves[:2]] + [t.double() for t in leaves[2:]]
    ref, ref_grads = loss_and_grads(dft_ops.naive.linear_cross_entropy, rounded[0], rounded[1],
                                    rounded[2] if bias is not None else None, labels=labels, shift=True)
    assert ours.dtype == torch.float32 and rel_err(ours, ref) < 1e-4
    for name, leaf, g, r in zip(("hidden", "weight", "bias"), leaves, grads, ref_grads):
        assert g.dtype == leaf.dtype, name  # each gradient in its own input's dtype
        assert rel_err(g, r) < TOL[low], name
    # and close to the loss of the unrounded inputs, within the 16-bit tolerance
    exact = dft_ops.naive.linear_cross_entropy(*[t.double() for t in leaves[:2]], labels,
                                               bias=None if bias is None else bias.double(), shift=True)
    assert rel_err(ours, exact) < TOL[low]


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_computes_like_nn_linear(backend, device):
    hidden, weight, labels, bias = make_inputs((2, 9), 24, 67, torch.float32, device, bias=True, scale=4.0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert compute_dtype("weight", hidden, weight) == F.linear(hidden, weight, bias).dtype == torch.bfloat16
        auto, auto_grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, labels=labels,
                                          backend=backend)
    # the products see hidden and weight rounded to bf16 (autocast's dtype), as if rounded by hand; autocast
    # does not leak into the backends' fp32 matmuls, and nothing is cast in memory: the fp32 gradients are
    # the fp32 accumulators themselves, which the bf16 inputs' gradients are rounded from
    low, low_grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden.bfloat16(), weight.bfloat16(), bias,
                                    labels=labels, backend=backend)
    assert torch.equal(auto, low)
    for g, g_low in zip(auto_grads, low_grads):
        assert g.dtype == torch.float32 and torch.equal(g.to(g_low.dtype), g_low)
    assert not torch.equal(auto_grads[1], low_grads[1].float())  # fp32 gradients, not bf16 ones widened


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-hidden-fp32-head", "autocast"])
def test_a_fp32_head_is_never_copied_in_16_bit(backend, autocast, device, monkeypatch):
    """The two passes: no V x D bf16 copy of an fp32 head (or (N, D) of fp32 hidden states) exists in forward
    or backward (the kernels round tiles in registers). One-pass: one, made once per call for cuBLAS (as
    nn.Linear under autocast does)."""
    from dft_ops.backends import torch_backend

    monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", 32)
    monkeypatch.setattr(torch_backend, "TOKEN_CHUNK", 16)
    hidden, weight, labels, bias = make_inputs((3, 17), 24, 133, torch.float32, device, bias=True, scale=4.0)
    if not autocast:
        hidden = hidden.bfloat16()
    hidden.requires_grad_()
    weight.requires_grad_()
    # the gemm backward stages 16-bit blocks (the logit gradient, a vocabulary split of the head) in its
    # workspace: bounded by workspace_mb, here 2 KiB (1024 bf16 elements)
    workspace = dict(workspace_mb=2 / 1024) if backend == "triton" else {}
    with OutputsSeen() as watch, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, shift=True, backend=backend,
                                            backward_mode="gemm", **workspace)
        loss.backward()
    made = [numel for numel, dtype in watch.seen if dtype == torch.bfloat16]
    with OutputsSeen() as one_pass, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, shift=True, backend=backend,
                                     backward_mode="onepass").backward()
    # the copy (and the transposed view of it the product reads)
    assert 1 <= len([n for n, dtype in one_pass.seen if dtype == torch.bfloat16 and n == weight.numel()]) <= 2
    assert weight.grad.dtype == torch.float32
    # bf16 hidden states get their bf16 gradient; otherwise only the torch backend's rounded chunks of
    # 16 tokens or 32 vocabulary rows (the kernels round tiles in registers), or the gemm workspace's blocks
    allowed = hidden.numel() if hidden.dtype == torch.bfloat16 else 32 * hidden.shape[-1]
    if workspace:
        allowed = max(allowed, 1024)
    assert max(made, default=0) <= allowed < weight.numel()
