"""The GEMM backward (dft_ops.kernels.gemm_backward), its plan, the tuner and the Backend protocol.

tests/test_backends.py runs the GEMM backward through every option, dtype and
objective of the contract (with a 4 KiB workspace: several splits and chunks);
here: every shape of plan against float64, the public API with its options,
the workspace bound, launches (tuner key, arch filter, forward splits), and
the GPU-only checks (no host sync, memory) that run when a GPU is present.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import dft_ops
from dft_ops import kernels
from dft_ops.backends import Backend, select_backend, torch_backend
from dft_ops.kernels.launch import Config, Launch, Tuner, bucket
from helpers import TOL, Coef, backward, check_against_reference, forward, make_inputs, rel_err
from test_backends import backend_inputs, random_coefficients, reference

gemm = importlib.import_module("dft_ops.kernels.gemm_backward")
forward_module = importlib.import_module("dft_ops.kernels.lse_forward")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
N, D, V = 37, 24, 101


def plan_of(M, V, D, budget, dtype=BF16, *, rows=False, precise=False, weight_dtype=None):
    return gemm.plan_splits(M, V, D, compute=dtype, hidden_dtype=dtype, weight_dtype=weight_dtype or dtype,
                            has_rows=rows, need_hidden=True, need_weight=True, precise=precise,
                            workspace_bytes=budget)


# --- the plan -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("precise", [False, True])
def test_plans_stay_within_the_budget_in_whole_tiles(dtype, rows, precise):
    tile_n, tile_v = gemm.tile_granules()
    for M, Vn, Dn in ((37, 101, 24), (300, 1000, 40), (5, 7, 16)):
        smallest = None
        for budget in (1 << 30, 1 << 16, 9000, 4096, 1000, 1):
            plan = plan_of(M, Vn, Dn, budget, dtype, rows=rows, precise=precise)
            assert plan.split == Vn or plan.split % tile_v == 0, plan
            assert plan.chunk == M or plan.chunk % tile_n == 0, plan
            assert 1 <= plan.split <= Vn and 1 <= plan.chunk <= M
            assert plan.parts == (2 if precise and dtype != F32 else 1)
            assert plan.stage_hidden == rows  # gathered rows only when the layout dropped some
            if smallest is None or plan.workspace_bytes < smallest.workspace_bytes:
                smallest = plan
            if plan.workspace_bytes > budget:
                # only below the smallest plan: one tile of tokens, one tile of vocabulary
                assert plan.chunk == min(M, tile_n) and plan.split == min(Vn, tile_v), (budget, plan)
        # a huge budget: one split, one chunk, d(weight) written once
        big = plan_of(M, Vn, Dn, 1 << 30, dtype, rows=rows, precise=precise)
        assert (big.split, big.chunk, big.weight_scratch) == (Vn, M, precise and dtype != F32)


def test_plans_of_the_goal_heads(monkeypatch):
    """With the GPU's tiles (not the interpreter's): the default 256 MiB at the heads of docs/backward.md."""
    monkeypatch.setattr(gemm, "interpreting", lambda: False)
    tile_n, tile_v = gemm.tile_granules()
    assert (tile_n, tile_v) == (128, 128)
    budget = dft_ops.backends.DEFAULT_WORKSPACE_MB * 2**20  # the "gemm" backward's budget (workspace_mb None)
    llama = plan_of(16384, 128256, 4096, int(budget))
    assert (llama.split, llama.chunk, llama.weight_scratch) == (8192, 16384, False)
    assert llama.workspace_bytes == 256 * 2**20
    gemma = plan_of(8192, 256000, 2304, int(budget))
    assert (gemma.split, gemma.chunk) == (16384, 8192)
    # 128k tokens: splits of MIN_SPLIT_TILES tiles, token chunks, d(weight) rows in an fp32 scratch
    qwen = plan_of(131072, 152064, 3584, int(budget))
    assert qwen.split == gemm.MIN_SPLIT_TILES * tile_v and qwen.chunk < 131072 and qwen.weight_scratch
    assert qwen.workspace_bytes <= budget
    # ignored tokens: the gathered hidden rows of a chunk count against the budget too
    masked = plan_of(16384, 128256, 4096, int(budget), rows=True)
    assert masked.stage_hidden and masked.workspace_bytes <= budget and masked.split < llama.split


# --- correctness against float64 --------------------------------------------------------------------


def grads_of(hidden, weight, bias, targets, rows, lse, coef, budget, **opts):
    return backward(kernels.gemm_backward, hidden, weight, bias, targets, rows, lse, coef, need_bias=bias is not None,
                                 workspace_bytes=budget, **opts)


@pytest.mark.parametrize("dtypes", [(F32, F32, None), (BF16, BF16, None), (F16, F16, None), (F32, BF16, None),
                                    (BF16, F32, None), (F32, F32, BF16)],
                         ids=["fp32", "bf16", "fp16", "fp32-hidden-bf16-head", "bf16-hidden-fp32-head", "fp32-as-bf16"])
def test_every_plan_matches_float64(dtypes, device):
    """One split / several splits one chunk / several of both / a budget below one tile, with every feature."""
    hidden_dtype, weight_dtype, requested = dtypes
    opts = dict(bias=True, softcap=3.0, temperature=1.3, smoothing=True, class_weight=True, rows=True)
    hidden, weight, bias, targets, rows, class_weight = backend_inputs(hidden_dtype, weight_dtype, opts, device)
    cap = dict(softcap=3.0, temperature=1.3, compute_dtype=requested)
    lse = forward(kernels.lse_forward, hidden, weight, bias, targets, rows, **cap).lse
    coef = random_coefficients(targets.numel(), device)
    _, want = reference(hidden, weight, bias, targets, rows, coef, class_weight=class_weight, **cap)
    compute = dft_ops.backends.product_dtype(hidden_dtype, weight_dtype, requested)
    tol = max(TOL[compute], TOL[hidden_dtype], TOL[weight_dtype])
    M = targets.numel()

    def shape(budget):
        plan = plan_of(M, V, D, budget, compute, rows=True, weight_dtype=weight_dtype)
        return -(-V // plan.split), -(-M // plan.chunk)

    # the first budget of each shape: (splits, chunks) = one of each, several splits of one chunk,
    # several of both; then a budget below one tile x one tile
    budgets = {}
    for budget in [1 << 20, *range(20000, 0, -250)]:
        budgets.setdefault(min(shape(budget), (2, 2)), budget)
    shapes = set(budgets)
    for budget in [*budgets.values(), 1]:
        grads = grads_of(hidden, weight, bias, targets, rows, lse, coef, budget, class_weight=class_weight, **cap)
        for name, like, got, ref in zip(("hidden", "weight", "bias"), (hidden, weight, bias), grads, want):
            assert got.dtype == like.dtype and got.shape == like.shape, name
            assert rel_err(got, ref) < tol, (name, budget, rel_err(got, ref))
        skipped = torch.ones(N, dtype=torch.bool, device=device)
        skipped[rows] = False
        assert (grads[0][skipped] == 0).all()
    # (splits, chunks): one of each, several splits of one chunk, several of both
    assert {(1, 1), (2, 1), (2, 2)} <= shapes, shapes


def test_fp32_gradients_are_fp32_accurate(device):
    """fp32 inputs: G in fp32 and fp32 products, about 1e-7 relative (docs/backward.md has the table)."""
    hidden, weight, bias, targets, rows, _ = backend_inputs(F32, F32, dict(bias=True, rows=True), device)
    lse = forward(kernels.lse_forward, hidden, weight, bias, targets, rows).lse
    coef = random_coefficients(targets.numel(), device, uniform=False)
    _, want = reference(hidden, weight, bias, targets, rows, coef)
    for budget in (1 << 20, 3000):
        for got, ref in zip(grads_of(hidden, weight, bias, targets, rows, lse, coef, budget), want):
            assert rel_err(got, ref) < 2e-6


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_strided_hidden_and_weight(dtype, device):
    """Views (a transposed hidden, every other column of a weight) give the contiguous inputs' gradients."""
    hidden, weight, bias, targets, rows, _ = backend_inputs(dtype, dtype, dict(rows=True), device)
    hidden_view = hidden.T.contiguous().T
    weight_view = torch.stack([weight, torch.zeros_like(weight)], dim=2).reshape(V, 2 * D)[:, ::2]
    assert not hidden_view.is_contiguous() and not weight_view.is_contiguous()
    assert torch.equal(hidden_view, hidden) and torch.equal(weight_view, weight)
    lse = forward(kernels.lse_forward, hidden, weight, None, targets, rows).lse
    coef = random_coefficients(targets.numel(), device, uniform=False)
    for budget in (1 << 20, 3000):
        want = grads_of(hidden, weight, None, targets, rows, lse, coef, budget)
        got = grads_of(hidden_view, weight_view, None, targets, rows, lse, coef, budget)
        for g, w in zip(got[:2], want[:2]):
            assert g.is_contiguous() and rel_err(g, w) < (1e-6 if dtype == F32 else 4e-3)


def test_only_the_gradients_asked_for(device):
    hidden, weight, bias, targets, _, _ = backend_inputs(BF16, BF16, dict(bias=True), device)
    lse = forward(kernels.lse_forward, hidden, weight, bias, targets).lse
    coef = random_coefficients(N, device, uniform=False)
    full = grads_of(hidden, weight, bias, targets, None, lse, coef, 3000)
    for need in ((True, False, False), (False, True, False), (False, False, True)):
        got = backward(kernels.gemm_backward, hidden, weight, bias, targets, None, lse, coef, need_hidden=need[0],
                                    need_weight=need[1], need_bias=need[2], workspace_bytes=3000)
        for wanted, g, f in zip(need, got, full):
            assert (g is None) != wanted
            if wanted:
                assert torch.equal(g, f)


def test_no_computed_token_gives_zero_gradients(device):
    hidden, weight, bias, _, _, _ = backend_inputs(BF16, BF16, dict(bias=True), device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    coef = Coef(torch.zeros(0, device=device), torch.zeros(0, device=device))
    grads = backward(kernels.gemm_backward, hidden, weight, bias, empty, empty, torch.zeros(0, device=device), coef,
                                  need_bias=True)
    for g, like in zip(grads, (hidden, weight, bias)):
        assert g.shape == like.shape and g.dtype == like.dtype and (g == 0).all()


@pytest.mark.parametrize("mode", ["gemm", "fused"])
@pytest.mark.parametrize("objective", ["dft", "ce"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_public_api_reduction_none_upstream(mode, objective, dtype, device):
    """A per-token upstream gradient, ignored tokens, a shift and a bias, through LossOptions."""
    hidden, weight, labels, bias = make_inputs((3, 13), 20, 150, dtype, device, bias=True, scale=3.0)
    upstream = torch.randn(3, 12, device=device)
    check_against_reference(hidden, weight, labels, bias, backend="triton", upstream=upstream, objective=objective,
                            reduction="none", shift=True,
                            backend_options=dict(backward_mode=mode, workspace_mb=0.005))


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_default_backward_with_every_objective_option(dtype, device):
    """The default mode (auto: gemm) with softcap, label smoothing, class weights... via the functional API."""
    hidden, weight, labels, bias = make_inputs((2, 17), 24, 130, dtype, device, bias=True, scale=3.0)
    check_against_reference(hidden, weight, labels, bias, backend="triton", softcap=4.0, shift=True,
                            objective="chord", backend_options=dict(workspace_mb=0.003))


def test_precise_gemm_is_elementwise_accurate_where_terms_cancel(device):
    from test_backends import elementwise_errors, peaked_case

    hidden, weight, targets, lse, coef, want = peaked_case(N, D, V, 1.0, device)

    def d_hidden(precise, budget):
        return backward(kernels.gemm_backward, hidden, weight, None, targets, None, lse, coef, need_weight=False,
                                     precise=precise, workspace_bytes=budget)[0]

    default = elementwise_errors(d_hidden(False, 1 << 20), want)
    for budget in (1 << 20, 3000):
        precise = elementwise_errors(d_hidden(True, budget), want)
        assert precise.max() < 1e-3 and precise.max() < default.max() / 50


# --- options, backends, errors -------------------------------------------------------------------------


def test_backends_implement_the_protocol():
    for backend in (torch_backend.TorchBackend(), kernels.TritonBackend("gemm"), kernels.TritonBackend("fused"),
                    kernels.TritonBackend()):
        assert isinstance(backend, Backend)
    assert kernels.TritonBackend("fused").name == "triton-fused"


def test_backend_selection():
    opts = dft_ops.LossOptions()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    chosen = select_backend(opts, cuda)  # a device object only: nothing runs
    assert isinstance(chosen, kernels.TritonBackend) and chosen.backward_mode == "gemm"  # what "auto" means
    assert chosen.workspace_bytes == 256 * 2**20
    assert dft_ops.backends.resolve_backward_mode("auto", None) == "gemm"
    assert dft_ops.backends.resolve_backward_mode("auto", 1e-3) == "fused"
    fused = select_backend(opts.replace(filter_eps=1e-3, precise=True), cuda)
    assert (fused.backward_mode, fused.filter_eps, fused.precise) == ("fused", 1e-3, True)
    assert select_backend(opts.replace(backward_mode="fused", workspace_mb=8), cuda).backward_mode == "fused"
    assert isinstance(select_backend(opts, cpu), torch_backend.TorchBackend)
    assert isinstance(select_backend(opts.replace(backward_mode="fused"), cpu), torch_backend.TorchBackend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemm_with_filtering_is_refused_on_every_backend(backend, device):
    """Judged once, by the options: a configuration developed on CPU fails there, not first on a GPU."""
    with pytest.raises(ValueError, match="^filter_eps: gradient filtering skips tiles"):
        dft_ops.LossOptions(backward_mode="gemm", filter_eps=1e-3)
    hidden, weight, labels, _ = make_inputs((5,), 8, 20, torch.float32, device)
    with pytest.raises(ValueError, match="^filter_eps"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, backend=backend, backward_mode="gemm", filter_eps=1e-3)
    with pytest.raises(ValueError, match="^filter_eps"):
        dft_ops.LinearCrossEntropy(backward_mode="gemm", filter_eps=1e-3)


def test_gemm_mode_refuses_filtering_through_the_api(device):
    hidden, weight, labels, _ = make_inputs((9,), 12, 30, torch.float32, device)
    with pytest.raises(ValueError, match="^filter_eps"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, backend="triton", backward_mode="gemm", filter_eps=1e-3)


# --- launches: tuner, forward splits --------------------------------------------------------------------


def test_token_buckets_tell_64k_from_128k():
    assert bucket(65536) != bucket(131072) and bucket(100_000) == bucket(131072) and bucket(1) == 1


def test_forward_splits_fill_whole_waves():
    config = Config({"BLOCK_N": 128, "BLOCK_V": 128})
    # 8k tokens on 132 SMs: 64 token tiles; two slices make one full wave (today's 5 made 2.4 waves)
    assert forward_module.forward_splits(config, 8192, 256000, 132) == 2
    assert forward_module.forward_splits(config, 16384, 128256, 132) == 1  # 128 tiles: one wave already
    assert forward_module.forward_splits(config, 1024, 128256, 132) == 16
    assert forward_module.forward_splits(config, 1024, 1000, 132) == 1  # at least 8 tiles per slice
    # one token tile: as many slices as allowed, up to the 5% tolerance
    assert forward_module.MAX_SPLITS - 2 <= forward_module.forward_splits(config, 64, 10**7, 132) <= forward_module.MAX_SPLITS


class _AddKernel:
    """Stands in for a @triton.jit kernel: adds its config's block size into the accumulator."""

    def __getitem__(self, grid):
        return lambda out, value, BLOCK, num_warps, num_stages: out.add_(value * BLOCK)


def test_tuner_never_copies_accumulators_and_zeroes_its_trials(monkeypatch):
    launch_module = importlib.import_module("dft_ops.kernels.launch")
    monkeypatch.setattr(launch_module, "interpreting", lambda: False)
    monkeypatch.setattr(launch_module, "device_arch", lambda device: 80)
    monkeypatch.delenv("DFT_OPS_CONFIG", raising=False)
    configs = {"16bit": [Config({"BLOCK": 1}), Config({"BLOCK": 2}), Config({"BLOCK": 4}, min_arch=90)]}
    tuner = Tuner(configs, Config({"BLOCK": 8}))
    timed = []
    monkeypatch.setattr(Tuner, "_time", staticmethod(lambda launch, config: (launch.run(config), timed.append(config),
                                                                              10 - config.blocks["BLOCK"])[-1]))
    acc = torch.zeros(3)
    launch = Launch(_AddKernel(), dict(out=acc, value=1.0), {}, grid=lambda c: (1,), accumulators=[acc])
    monkeypatch.setattr(torch.Tensor, "clone", lambda self: pytest.fail("the tuner copied an accumulator"))
    config = tuner.pick(launch, ("key",))
    assert config.blocks["BLOCK"] == 2  # the fastest of the configurations sm_80 is offered
    assert [c.blocks["BLOCK"] for c in timed] == [1, 2]
    assert (acc == 0).all()  # trials zeroed
    launch.run(config)
    assert tuner.pick(launch, ("key",)) is config and len(timed) == 2  # cached per process
    assert (acc == 2).all()
    monkeypatch.setattr(launch_module, "device_arch", lambda device: 90)
    assert tuner.pick(launch, ("key",)).blocks["BLOCK"] == 4  # another architecture: its own choice


def test_products_off_cuda_are_fp32():
    from dft_ops.backends import products

    assert products.accumulate_method(torch.device("cpu")) == "upcast"
    a = torch.randn(5, 7).to(BF16)
    b = torch.randn(7, 3).to(BF16)
    acc = torch.randn(5, 3)
    want = acc + a.double() @ b.double()
    products.add_product(acc, a, b)
    assert (acc.double() - want).abs().max() < 1e-5
    out = torch.empty(5, 3, dtype=BF16)
    products.write_product(out, a, b)
    assert torch.equal(out, (a.double() @ b.double()).to(BF16))


# --- GPU only ------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("mode", ["gemm", "fused"])
def test_backward_has_no_host_sync(mode):
    hidden, weight, labels, _ = make_inputs((4, 300), 256, 5000, BF16, torch.device("cuda"), ignore_frac=0.1)
    opts = dict(backend="triton", backward_mode=mode)
    h = hidden.requires_grad_()
    dft_ops.linear_cross_entropy(h, weight, labels, **opts).backward()  # tuning and probing: once per process
    loss = dft_ops.linear_cross_entropy(h, weight, labels, **opts)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_products_use_fp32_output_on_cuda():
    from dft_ops.backends import products

    method = products.accumulate_method(torch.device("cuda"))
    a = torch.randn(256, 512, device="cuda").to(BF16)
    b = torch.randn(512, 128, device="cuda").to(BF16)
    acc = torch.randn(256, 128, device="cuda")
    want = acc.double() + a.double() @ b.double()
    products.add_product(acc, a, b)
    assert rel_err(acc, want) < 1e-6, method


@gpu
def test_gemm_backward_memory_is_dhidden_plus_workspace():
    """Peak extra memory of the backward <= fp32 d(hidden) + workspace + 64 MB over the gradients."""
    n, d, v = 8192, 2048, 64000
    dev = torch.device("cuda")
    hidden = torch.randn(n, d, device=dev, dtype=BF16)
    weight = (torch.randn(v, d, device=dev) / d**0.5).to(BF16)
    targets = torch.randint(0, v, (n,), device=dev)
    lse = forward(kernels.lse_forward, hidden, weight, None, targets).lse
    coef = Coef(torch.full((n,), 1.0 / n, device=dev), torch.full((n,), 1.0 / n, device=dev))
    budget = 64 * 2**20
    backward(kernels.gemm_backward, hidden, weight, None, targets, None, lse, coef, workspace_bytes=budget)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = backward(kernels.gemm_backward, hidden, weight, None, targets, None, lse, coef, workspace_bytes=budget)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - sum(g.numel() * g.element_size() for g in grads[:2])
    assert extra <= n * d * 4 + budget + 64 * 2**20, extra / 2**20


def test_column_major_operands_are_copied_for_the_kernels(device):
    """The kernels' column offsets k * stride(1) are int32: a column-major matrix (whose stride(1) = rows
    would pass 2^31 with rows x columns) reaches them as a contiguous copy; others as they are."""
    from dft_ops.backends.protocol import SecondHead
    from dft_ops.kernels.launch import kernel_operands
    from helpers import contract

    hidden, weight, _, targets, _, _ = backend_inputs(F32, BF16, dict(), device)
    column_major = hidden.T.contiguous().T
    every_other = torch.stack([weight, weight], dim=2).reshape(V, 2 * D)[:, ::2]  # stride(1) = 2
    second = SecondHead(column_major, weight)
    head, tokens = contract(column_major, every_other, None, targets, second=second)
    h, got_head, _, _ = kernel_operands(column_major, head, tokens, class_weight=False, second=True)
    for got, given in ((h, column_major), (got_head.weight, every_other), (got_head.second.hidden, column_major)):
        assert got.stride(1) == 1 and got.data_ptr() != given.data_ptr() and torch.equal(got, given)
    head, tokens = contract(hidden, weight, None, targets, second=second)
    h, got_head, _, _ = kernel_operands(hidden, head, tokens, class_weight=False, second=False)
    assert h is hidden and got_head.weight is weight and got_head.second is None
    assert kernel_operands(hidden, head, tokens, class_weight=False, second=True)[1].second.weight is weight
