"""``sync_free=True``: no host read in the forward or the backward, on both backends and every backward mode.

On the CPU a host synchronisation cannot be observed directly, so :class:`NoHostReads` refuses what
would be one on a GPU: reading a tensor's value on the host (``.item()``, ``bool()`` / ``int()`` /
``float()`` of a tensor, ``.tolist()``, ``.numpy()``), and the operators whose output size depends on
values (``nonzero``, boolean indexing, ``masked_select``, ``unique``, ...). The same calls must give
the default path's results (float64 oracle too), with what the default path refuses on the host
turned into NaN. On a GPU the step is captured in a CUDA graph and replayed on new inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dft_ops
from dft_ops import objectives as o

from helpers import class_weights, make_inputs, rel_err, small_chunks

aten = torch.ops.aten
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class HostRead(AssertionError):
    """A host read (or a value-sized operator) inside a NoHostReads block."""


# operators whose result is read on the host, or whose output size depends on the values
_READING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default, aten.bincount.default,
            aten.repeat_interleave.Tensor, aten.equal.default, aten.is_nonzero.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class NoHostReads(TorchDispatchMode):
    """Raises :class:`HostRead` on every way a torch op reads device values on the host (module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READING:
            raise HostRead(f"{func} reads values on the host")
        if func in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                raise HostRead(f"{func} with a boolean index (its size is the mask's count)")
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[0] if func is aten._to_copy.default else args[1]
            dest = kwargs.get("device") if func is aten._to_copy.default else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dest is not None \
                    and torch.device(dest).type == "cpu":
                raise HostRead(f"{func}: a copy to the host")
        return func(*args, **kwargs)

    def __enter__(self):
        def refuse(name):
            def method(*_args, **_kwargs):
                raise HostRead(f"Tensor.{name}() reads values on the host")
            return method

        self._saved = {name: torch.Tensor.__dict__.get(name) for name in ("tolist", "numpy")}
        for name in self._saved:
            setattr(torch.Tensor, name, refuse(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


def test_the_guard_sees_every_kind_of_host_read():
    x = torch.randn(5)
    for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.tolist(), lambda: x[x > 0],
                 lambda: torch.nonzero(x), lambda: x.numpy(), lambda: float(x[0])):
        with NoHostReads(), pytest.raises(HostRead):
            read()
    with NoHostReads():  # what the sync-free path does instead
        torch.where(x > 0, x, 0.0).sum()
        x.scatter_add(0, torch.tensor([1, 3]), torch.ones(2))
    assert x.tolist()  # restored


def test_the_default_path_reads_once_and_is_refused():
    hidden, weight, labels, _ = make_inputs((2, 9), 32, 70, torch.float32, "cpu")
    with NoHostReads(), pytest.raises(HostRead, match="tolist"):
        dft_ops.linear_cross_entropy(hidden, weight, labels)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _run(hidden, weight, bias, labels, *, upstream=None, guard=False, fn=dft_ops.linear_cross_entropy, **kwargs):
    """(loss, stats or None, grads of hidden / weight / bias): one forward and backward of ``fn``, in a
    NoHostReads block when ``guard``."""
    h, w, b = _leaves(hidden, weight, bias)
    with NoHostReads() if guard else torch.enable_grad():
        out = fn(h, w, labels, bias=b, **kwargs)
        loss, stats = out if isinstance(out, tuple) else (out, None)
        loss.backward(upstream)
    return loss.detach(), stats, [t.grad for t in (h, w, b) if t is not None]


# (backend, backward_mode); the Triton kernels run on the CPU interpreter
ENGINES = [("torch", "onepass"), ("torch", "gemm"), ("triton", "onepass"), ("triton", "gemm"), ("triton", "fused")]
CASES = {
    # every option that reads a value on the default path: ignored tokens, shift, num_items_in_batch (a
    # tensor), class weights (values checked, weighted mean), plus smoothing, z-loss and the statistics
    "options": dict(objective="dft", shift=True, label_smoothing=0.1, z_loss=1e-3, return_stats=True,
                    class_weight=True, softcap=4.0, bias=True),
    "num_items": dict(objective="chord", num_items_in_batch="tensor", reduction="mean", bias=True),
    "none": dict(objective="ce", reduction="none", return_stats=True),
    "sum": dict(objective=o.Power(0.5), reduction="sum", temperature=1.5),
}


def _case(name, device, seed=0):
    spec = dict(CASES[name])
    torch.manual_seed(seed)
    hidden, weight, labels, bias = make_inputs((2, 11), 32, 70, torch.float32, device, bias=spec.pop("bias", False),
                                               ignore_frac=0.3, scale=3.0)
    labels[0, :3] = -100  # a prompt
    if spec.pop("class_weight", False):
        spec["class_weight"] = class_weights(70, device)
    if spec.get("num_items_in_batch") == "tensor":
        spec["num_items_in_batch"] = torch.tensor(40.0, device=device)
    upstream = torch.randn(labels.shape, device=device) if spec.get("reduction") == "none" else None
    return hidden, weight, bias, labels, upstream, spec


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend, mode", ENGINES, ids=[f"{b}-{m}" for b, m in ENGINES])
def test_no_host_read_and_the_default_paths_results(backend, mode, case, device, monkeypatch):
    hidden, weight, bias, labels, upstream, spec = _case(case, device)
    if mode == "onepass" and spec.get("reduction") == "none":
        pytest.skip("one pass needs one upstream number (LossOptions refuses it)")
    engine = dict(backend=backend, backward_mode=mode)
    # a few chunks: the sync-free rows (every position) fall on other chunk boundaries than the default's
    small_chunks(monkeypatch, 8, 32)
    free = _run(hidden, weight, bias, labels, upstream=upstream, guard=device.type == "cpu", sync_free=True,
                **engine, **spec)
    default = _run(hidden, weight, bias, labels, upstream=upstream, **engine, **spec)
    assert torch.allclose(free[0], default[0], rtol=1e-5, atol=1e-7), (free[0], default[0])
    for a, b in zip(free[2], default[2]):
        assert rel_err(a, b) < 1e-5
    if default[1] is not None:
        for field, a, b in zip(default[1]._fields, free[1], default[1]):
            if b is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, field
                assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), field


def test_matches_the_float64_oracle(device):
    hidden, weight, bias, labels, _, spec = _case("options", device, seed=3)
    ours = _run(hidden, weight, bias, labels, sync_free=True, backend="torch", **spec)
    h, w, b = _leaves(hidden.double(), weight.double(), bias.double())
    spec = {k: v for k, v in spec.items() if k != "return_stats"}
    ref = dft_ops.naive.linear_cross_entropy(h, w, labels, bias=b, **spec)
    ref.backward()
    assert rel_err(ours[0], ref) < 1e-5
    for a, r in zip(ours[2], (h.grad, w.grad, b.grad)):
        assert rel_err(a, r) < 1e-4


@pytest.mark.parametrize("objective", [o.SequenceDFT("geometric"), o.PSFT()], ids=["sequence-geometric", "psft"])
def test_objectives_reading_sequences_or_token_inputs(objective, device):
    """Ignored rows computed by the sync-free path are not counted in a per-sequence mean, and an objective's
    per-token input at an ignored position (any value, even inf) changes nothing."""
    hidden, weight, labels, _ = make_inputs((3, 10), 24, 50, torch.float32, device, ignore_frac=0.4, scale=2.0)
    position_ids = torch.arange(10, device=device).repeat(3, 1)
    position_ids[1, 6:] -= 6  # two packed documents in row 1
    extra = {}
    if isinstance(objective, o.PSFT):
        old = -torch.rand(labels.shape, device=device) * 3
        old[labels == -100] = float("inf")
        extra["old_logprobs"] = old
    kwargs = dict(objective=objective, position_ids=position_ids, backend="torch", **extra)
    free = _run(hidden, weight, None, labels, guard=device.type == "cpu", sync_free=True, **kwargs)
    default = _run(hidden, weight, None, labels, **kwargs)
    assert torch.allclose(free[0], default[0], rtol=1e-5) and torch.isfinite(free[0])
    for a, b in zip(free[2], default[2]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_label_outside_the_vocabulary_is_nan_not_a_read(backend, device):
    hidden, weight, labels, _ = make_inputs((2, 9), 32, 70, torch.float32, device, ignore_frac=0.0)
    labels[1, 4] = 70 + 3
    with pytest.raises(ValueError, match="^labels: 1 value"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, backend=backend)
    loss, stats, grads = _run(hidden, weight, None, labels, guard=device.type == "cpu", sync_free=True,
                              backend=backend, return_stats=True)
    assert torch.isnan(loss) and all(torch.isnan(g).any() for g in grads)
    # per token: NaN there and nowhere else, the other tokens as if it were ignored
    per_token = _run(hidden, weight, None, labels, sync_free=True, backend=backend, reduction="none",
                     upstream=torch.ones(labels.shape, device=device))[0]
    clean = labels.clone()
    clean[1, 4] = -100
    expected = dft_ops.linear_cross_entropy(hidden, weight, clean, backend=backend, reduction="none")
    assert torch.isnan(per_token[1, 4]) and torch.isnan(per_token).sum() == 1
    keep = clean != -100
    assert torch.allclose(per_token[keep], expected[keep], rtol=1e-5)


def test_what_the_default_path_refuses_on_the_host_is_nan(device):
    hidden, weight, labels, _ = make_inputs((2, 9), 32, 70, torch.float32, device)
    bad_weights = class_weights(70, device)
    bad_weights[5] = -1.0
    with pytest.raises(ValueError, match="^class_weight: 1 value"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, class_weight=bad_weights)
    for kwargs in (dict(class_weight=bad_weights), dict(num_items_in_batch=torch.tensor(0.0)),
                   dict(num_items_in_batch=torch.tensor(-3.0)), dict(num_items_in_batch=torch.tensor(float("inf")))):
        loss, _, grads = _run(hidden, weight, None, labels, guard=device.type == "cpu", sync_free=True, **kwargs)
        assert torch.isnan(loss), kwargs
        assert all(torch.isnan(g).any() for g in grads), kwargs


@pytest.mark.parametrize("num_items", [None, 0])
def test_every_token_ignored_is_zero_not_nan(num_items, device):
    hidden, weight, labels, _ = make_inputs((2, 9), 32, 70, torch.float32, device)
    labels[:] = -100
    kwargs = dict(num_items_in_batch=None if num_items is None else torch.tensor(float(num_items), device=device))
    loss, _, grads = _run(hidden, weight, None, labels, guard=device.type == "cpu", sync_free=True, **kwargs)
    assert loss == 0 and all(torch.count_nonzero(g) == 0 for g in grads)


@gpu
@pytest.mark.parametrize("mode", ["onepass", "gemm"])
def test_cuda_graph_captures_and_replays_a_training_step(mode):
    """Forward and backward captured once in a CUDA graph, replayed on new hidden states and labels (new
    ignored positions, new count): the eager results every time; no host sync in the step."""
    D, V, shape = 256, 5003, (4, 129)
    kwargs = dict(objective="dft", shift=True, sync_free=True, backward_mode=mode, return_stats=True)
    weight = (torch.randn(V, D, device="cuda") / D**0.5).to(torch.bfloat16).requires_grad_()
    static_h = torch.randn(*shape, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_y = torch.randint(0, V, shape, device="cuda")

    def step():
        loss, stats = dft_ops.linear_cross_entropy(static_h, weight, static_y, **kwargs)
        grads = torch.autograd.grad(loss, (static_h, weight))
        return loss, stats.entropy, *grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture: kernel tuning, the products' probe
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            static_out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        h = torch.randn(*shape, D, device="cuda", generator=g).to(torch.bfloat16)
        y = torch.randint(0, V, shape, device="cuda", generator=g)
        y[torch.rand(shape, device="cuda", generator=g) < 0.1 * (seed + 1)] = -100
        with torch.no_grad():
            static_h.copy_(h)
            static_y.copy_(y)
        graph.replay()
        eager_h = h.clone().requires_grad_()
        loss, stats = dft_ops.linear_cross_entropy(eager_h, weight, y, **{**kwargs, "sync_free": False})
        want = (loss, stats.entropy, *torch.autograd.grad(loss, (eager_h, weight)))
        torch.cuda.synchronize()
        for name, got, ref in zip(("loss", "entropy", "d_hidden", "d_weight"), static_out, want):
            assert rel_err(got.float(), ref.float()) < 1e-2, (seed, name)


def test_a_compiled_sync_free_loss_reads_nothing_either(monkeypatch):
    """The sync-free operator inside a compiled graph (torch.compile's aot_eager backend), forward and backward:
    what the operators' implementations run is watched (a dispatch mode cannot be active while compiling)."""
    from dft_ops import custom_op

    def watched(fn):
        def run(*args, **kwargs):
            with NoHostReads():
                return fn(*args, **kwargs)
        return run

    hidden, weight, bias, labels, _, spec = _case("options", torch.device("cpu"))
    want = _run(hidden, weight, bias, labels, sync_free=True, **spec)
    for name in ("_call", "forward_pass", "backward_pass"):
        monkeypatch.setattr(custom_op, name, watched(getattr(custom_op, name)))

    def fn(h, w, y, bias=None, **kwargs):
        return dft_ops.linear_cross_entropy(h, w, y, bias=bias, **kwargs)

    torch._dynamo.reset()
    try:
        got = _run(hidden, weight, bias, labels, fn=torch.compile(fn, fullgraph=True, backend="aot_eager"),
                   sync_free=True, **spec)
        # the same watch sees the default path's read
        with pytest.raises(HostRead):
            _run(hidden, weight, bias, labels, fn=torch.compile(fn, fullgraph=True, backend="aot_eager"), **spec)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(got[0], want[0], rtol=1e-6)
    for a, r in zip(got[2], want[2]):
        assert rel_err(a, r) < 1e-6


def test_sync_free_refuses_what_compacts_or_reads_on_the_host():
    """Distill(distill_unlabeled=True) picks its rows by compacting them (a host read): refused with sync_free,
    by name, as the vocabulary-parallel group check is; without distill_unlabeled it is accepted."""
    with pytest.raises(ValueError, match="sync_free: Distill"):
        dft_ops.LossOptions(objective=o.Distill("jsd", distill_unlabeled=True), sync_free=True)
    dft_ops.LossOptions(objective=o.Distill("jsd"), sync_free=True)
