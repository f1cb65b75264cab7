"""The one-pass head (dft_ops.backends.one_pass): gradients formed in the forward, every product in BLAS.

Against the float64 oracle on both backends (the PyTorch row passes, fp32 G; the Triton row passes on
the interpreter, 16-bit G in place), with several chunks per call (the chunk floor lowered here so that
test shapes take several), chunk boundaries inside sequences, every objective it covers, the options,
dtypes and reductions; and where "auto" must not choose it.
"""

from __future__ import annotations

import pytest
import torch

import dft_ops
import dft_ops.kernels  # noqa: F401 (the spy patches TritonBackend)
from dft_ops import objectives as o
from dft_ops.backends import Needs, backward_mode, one_pass
from dft_ops.backends.protocol import GradTerms, Head, Tokens
from helpers import TOL, check_against_reference, loss_and_grads, make_inputs, rel_err
from test_objectives import CASES, make_case, peaked_inputs

BACKENDS = {"torch": dict(backend="torch", backward_mode="onepass"),
            "triton": dict(backend="triton", backward_mode="onepass")}
ONE_PASS_CASES = [c for c in CASES if not c.startswith("sequence")]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 8 tokens: every test shape spans several, and a chunk ends inside a sequence."""
    monkeypatch.setattr(one_pass, "MIN_CHUNK", 8)
    monkeypatch.setattr(one_pass, "CUDA_MIN_CHUNK", 8)
    monkeypatch.setattr(one_pass, "GRANULE", 8)


def spy_backend(monkeypatch):
    """Records which passes ran: ("loss_and_grads", needs) or ("lse_forward",) / ("grad_backward",)."""
    calls = []
    real = one_pass.OnePass

    def loss_and_grads(self, *args, **kwargs):
        calls.append(("loss_and_grads", args[4]))
        return real_loss_and_grads(self, *args, **kwargs)

    real_loss_and_grads = real.loss_and_grads
    monkeypatch.setattr(real, "loss_and_grads", loss_and_grads)
    for name in ("lse_forward", "grad_backward"):
        for cls in (dft_ops.backends.TorchBackend, dft_ops.kernels.TritonBackend):
            original = getattr(cls, name)
            monkeypatch.setattr(cls, name, lambda self, *a, _o=original, _n=name, **k: (calls.append((_n,)),
                                                                                       _o(self, *a, **k))[1])
    return calls


# --- against float64 -----------------------------------------------------------------------------------------

CONFIGS = {
    "fp32-mean-shift-bias-stats": dict(dtype=torch.float32, shape=(2, 13), shift=True, bias=True,
                                       reduction="mean", return_stats=True),
    "bf16-sum-softcap-temp-ignore5": dict(dtype=torch.bfloat16, shape=(3, 7), softcap=3.0, temperature=1.3,
                                          ignore_index=5, reduction="sum"),
    "fp32-mean-items-smooth-cw-zloss": dict(dtype=torch.float32, shape=(2, 11), shift=True, reduction="mean",
                                            num_items_in_batch=29, label_smoothing=0.1, class_weight=True,
                                            z_loss=1e-3),
    # no statistics, soft-cap or smoothing sum: the torch row passes' in-place form
    "fp32-mean-shift-bias-temp-ignore5": dict(dtype=torch.float32, shape=(3, 9), shift=True, bias=True,
                                              temperature=0.7, ignore_index=5, reduction="mean"),
    "bf16-sum-items": dict(dtype=torch.bfloat16, shape=(2, 13), reduction="sum", num_items_in_batch=17),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", ONE_PASS_CASES)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matches_float64(backend, case, config, device, monkeypatch):
    from test_objectives import assert_tokens_on_both_sides, case_inputs

    hidden, weight, labels, bias, opts, logp, valid = case_inputs(CONFIGS[config], device)
    objective, batch = make_case(case, logp, valid)
    assert_tokens_on_both_sides(objective, batch, logp, valid)
    calls = spy_backend(monkeypatch)
    how = dict(BACKENDS[backend])
    ours, _ = check_against_reference(hidden, weight, labels, bias, backend=how.pop("backend"), backend_options=how,
                                      objective=objective, **batch, **opts)
    assert [c[0] for c in calls] == ["loss_and_grads"], calls  # one pass, nothing recomputed in backward


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_asft_second_head_in_the_same_pass(backend, direction, device):
    from test_asft import asft_case

    config = dict(dtype=torch.float32, shape=(2, 11), shift=True, bias=True, ref_bias=True, ref_softcap=3.0,
                  D_ref=40, return_stats=True)
    hidden, weight, labels, bias, objective, opts = asft_case(config, "dft", direction, device)
    how = dict(BACKENDS[backend])
    ours, ref = check_against_reference(hidden, weight, labels, bias, objective=objective, backend=how.pop("backend"),
                                        backend_options=how, **opts)
    assert rel_err(ours[1].kl, ref[1]["kl"]) < 1e-5


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_odd_vocabulary_and_rows_of_a_packed_batch(backend, device):
    """V = 1001 (workspace rows padded to 1008), ignored tokens spread over the chunks, packed rows."""
    hidden, weight, labels, bias = make_inputs((3, 10), 24, 1001, torch.float32, device, bias=True, scale=4.0,
                                               ignore_frac=0.3)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]] * 3, device=device)
    how = dict(BACKENDS[backend])
    check_against_reference(hidden, weight, labels, bias, backend=how.pop("backend"), backend_options=how,
                            shift=True, position_ids=position_ids, objective="dft")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_token_ignored(backend, device):
    hidden, weight, labels, bias = make_inputs((2, 9), 16, 50, torch.float32, device, bias=True)
    loss, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias,
                                 labels=torch.full_like(labels, -100), num_items_in_batch=0, **BACKENDS[backend])
    assert loss.item() == 0 and all((g == 0).all() for g in grads)


# --- what is computed, and when ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_frozen_head_and_no_grad(backend, device, monkeypatch):
    """A frozen head (LoRA) never forms d(weight); no_grad and inference_mode run the forward's statistics only."""
    hidden, weight, labels, _ = make_inputs((2, 9), 16, 50, torch.float32, device)
    calls = spy_backend(monkeypatch)
    h = hidden.clone().requires_grad_()
    dft_ops.linear_cross_entropy(h, weight, labels, **BACKENDS[backend]).backward()
    assert calls == [("loss_and_grads", Needs(True, False, False))] and h.grad is not None
    want = dft_ops.naive.linear_cross_entropy(hidden.double().requires_grad_(), weight.double(), labels)
    for context in (torch.no_grad, torch.inference_mode):
        calls.clear()
        with context():
            got = dft_ops.linear_cross_entropy(h, weight.clone().requires_grad_(), labels, **BACKENDS[backend])
        assert [c[0] for c in calls] == ["lse_forward"], calls  # 2NDV: no gradient formed
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backward_twice_and_scaled_upstream(backend, device):
    """The kept gradients are scaled out of place: retain_graph twice gives the same; an upstream of 3 triples."""
    hidden, weight, labels, bias = make_inputs((2, 9), 16, 50, torch.bfloat16, device, bias=True)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = dft_ops.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], **BACKENDS[backend])
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, leaves, retain_graph=True)
    assert all(a.dtype == t.dtype for a, t in zip(first, leaves))
    for a, b in zip(first, second):
        assert rel_err(b.float(), 3.0 * a.float()) < 1e-2  # each rounded to bf16 once
    again = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="double backward"):
        loss = dft_ops.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], **BACKENDS[backend])
        torch.autograd.grad(loss, leaves, create_graph=True)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gradient_accumulation(backend, device):
    """Two micro-batches with num_items_in_batch over both: the summed gradients of one batch's mean."""
    hidden, weight, labels, _ = make_inputs((4, 9), 16, 50, torch.float32, device)
    n = int((labels[:, 1:] != -100).sum())
    w = weight.clone().requires_grad_()
    for part in (slice(0, 2), slice(2, 4)):
        dft_ops.linear_cross_entropy(hidden[part], w, labels[part], shift=True, num_items_in_batch=n,
                                     **BACKENDS[backend]).backward()
    ref_w = weight.double().requires_grad_()
    dft_ops.naive.linear_cross_entropy(hidden.double(), ref_w, labels, shift=True).backward()
    assert rel_err(w.grad, ref_w.grad) < 1e-5


def test_auto_picks_one_pass_only_where_it_applies(device, monkeypatch):
    opts = dft_ops.LossOptions()
    cpu = torch.device("cpu")
    plan = dict(device=cpu, vocab_size=1000, hidden_size=64, compute_dtype=torch.float32, needs=Needs(True, True),
                second_head=False)
    assert backward_mode(opts, **plan).mode == "onepass"
    for changed, fragment in ((dict(opts=opts.replace(reduction="none")), "reduction='none'"),
                              (dict(opts=opts.replace(objective=o.SequenceDFT("product"))), "whole sequences"),
                              (dict(compute_dtype=torch.float16), "fp16"),
                              (dict(opts=opts.replace(filter_eps=1e-3)), "filtering"),
                              (dict(needs=Needs(False, False)), "no gradient"),
                              (dict(opts=opts.replace(backward_mode="gemm")), "gemm"),
                              (dict(opts=opts.replace(workspace_mb=0.01)), "workspace_mb=0.01")):
        args = {**plan, **changed}
        got = backward_mode(args.pop("opts", opts), **args)
        assert got.mode == "two-pass" and fragment in got.reason, (changed, got)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        got = backward_mode(opts, **plan)
        assert got.mode == "two-pass" and "saved-tensor hooks" in got.reason
    # explicit: one-pass wherever the options allow it (a too small budget does not stop it)
    assert backward_mode(opts.replace(backward_mode="onepass", workspace_mb=0.01), **plan).mode == "onepass"
    for bad, fragment in ((dict(reduction="none"), "reduction='none'"), (dict(objective=o.SequenceDFT("product")),
                          "whole sequences"), (dict(filter_eps=1e-3), "^filter_eps")):
        with pytest.raises(ValueError, match=fragment):
            dft_ops.LossOptions(backward_mode="onepass", **bad)
    # the chunk: from global shapes only, whole granules, the CUDA floor max(1024, 2^22 / D)
    monkeypatch.undo()
    assert one_pass.chunk_tokens(128256, 4096, device_type="cuda", workspace_bytes=None, second_head=False) == (1024, True)
    assert one_pass.chunk_tokens(128256, 1024, device_type="cuda", workspace_bytes=None, second_head=False)[0] == 4096
    assert one_pass.chunk_tokens(32000, 1024, device_type="cpu", workspace_bytes=256 * 2**20,
                                 second_head=False) == (2048, True)


def test_checkpointing_without_reentry_runs_two_passes(monkeypatch):
    """Non-reentrant activation checkpointing packs the forward's saved tensors: the two passes keep nothing
    of size V x D across the step, so "auto" leaves one-pass aside there."""
    from torch.utils.checkpoint import checkpoint

    hidden, weight, labels, _ = make_inputs((2, 9), 16, 50, torch.float32, "cpu")
    calls = spy_backend(monkeypatch)
    w = weight.clone().requires_grad_()
    checkpoint(lambda h: dft_ops.linear_cross_entropy(h, w, labels, backend="torch"), hidden.requires_grad_(),
               use_reentrant=False).backward()
    assert "loss_and_grads" not in [c[0] for c in calls] and w.grad is not None


# --- memory and precision ------------------------------------------------------------------------------------


def test_never_builds_tokens_by_vocab(device):
    """Several chunks: no tensor of N x V elements (the workspace is C x V, C = 8 < N)."""
    from helpers import OutputsSeen

    hidden, weight, labels, _ = make_inputs((4, 16), 32, 500, torch.float32, device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with OutputsSeen() as seen:
        dft_ops.linear_cross_entropy(h, w, labels, backend="torch", backward_mode="onepass").backward()
    assert max(n for n, _ in seen.seen) < 64 * 500


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_peaked_rows_keep_the_label_entry_accurate(backend, device):
    """Median p 0.9996: d(hidden) is dominated by the label's entry a (p - 1); formed as a expm1(log p) + a - b
    from a log p free of lse's rounding it stays within fp32 of float64 (6e-7 measured; the two-pass backends,
    a s - b from z_y - lse: 1.6e-5), and within bf16's rounding with bf16 inputs (1.4e-3 / 2.0e-3)."""
    torch.manual_seed(0)
    n, d, v = 48, 64, 700
    weight = torch.randn(v, d, device=device) / d**0.5
    labels = torch.randint(0, v, (n,), device=device)
    hidden = 2.0 * weight[labels] * d**0.5 + 0.3 * torch.randn(n, d, device=device)
    p = dft_ops.naive.linear_cross_entropy(hidden, weight, labels, return_stats=True, objective="ce")[1]["logprob"].exp()
    assert p.median() > 0.999
    for dtype, tol in ((torch.float32, 3e-6), (torch.bfloat16, 3e-3)):
        h, w = hidden.to(dtype), weight.to(dtype)
        _, grads = loss_and_grads(dft_ops.linear_cross_entropy, h, w, None, labels=labels, objective="ce",
                                  **BACKENDS[backend])
        _, want = loss_and_grads(dft_ops.naive.linear_cross_entropy, h.double(), w.double(), None, labels=labels,
                                 objective="ce")
        assert rel_err(grads[0], want[0]) < tol, (dtype, rel_err(grads[0], want[0]))


@pytest.mark.parametrize("temperature", [None, 0.6])
def test_torch_row_passes_in_place_form_equals_the_general_one(temperature):
    """The in-place form (workspace rewritten as exp(z - m), G scaled per row) against the general form on the
    same chunk: peaked and flat rows, a row of -inf logits but its label's, a label outside the shard."""
    torch.manual_seed(3)
    C, V = 37, 211
    u = torch.randn(C, V) * 3.0
    targets = torch.randint(0, V, (C,))
    u[:5] += 40.0 * torch.nn.functional.one_hot(targets[:5], V)  # p of the label ~1
    u[5] = float("-inf")
    u[5, targets[5]] = 1.0
    targets[6] = V + 3  # another shard's label (vocabulary parallelism): no entry here
    head = Head(torch.empty(V, 1), None, None, temperature, torch.float32, None, None)
    rows = one_pass.TorchRowPasses()
    general = rows.row_stats(u.clone(), targets, head, with_stats=True, smoothing=False, second_logits=None)
    terms = GradTerms(lse=general.lse, softmax=torch.rand(C) + 0.5, target=torch.rand(C) + 0.5,
                      logprob=general.target_logprob)
    want = rows.logit_grad(u.clone(), targets, head, terms, second_logits=None, out_dtype=torch.float32)
    ws = u.clone()
    plain = rows.row_stats(ws, targets, head, with_stats=False, smoothing=False, second_logits=None)
    for name in ("lse", "target_logit", "target_logprob"):
        assert torch.allclose(getattr(plain, name), getattr(general, name), rtol=1e-6, atol=1e-6), name
    got = rows.logit_grad(ws, targets, head, terms, second_logits=None, out_dtype=torch.float32)
    assert got.data_ptr() == ws.data_ptr()  # in place
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (got - want).abs().max()
    # the in-place form's G is only for the workspace its statistics pass rewrote
    rows.row_stats(u.clone(), targets, head, with_stats=False, smoothing=False, second_logits=None)
    with pytest.raises(RuntimeError, match="not the one its row_stats rewrote"):
        rows.logit_grad(u.clone(), targets, head, terms, second_logits=None, out_dtype=torch.float32)
