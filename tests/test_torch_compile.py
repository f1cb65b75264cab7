"""``torch.compile`` of the functional API, of ``LinearCrossEntropy`` and of a patched model's training step.

Under compilation the loss is the registered operator ``dft_ops::linear_cross_entropy``
(:mod:`dft_ops.custom_op`): ``fullgraph=True`` compiles, ``torch._dynamo.explain`` counts no graph
break, and the compiled results equal eager ones (inductor on the CPU for the main paths; the
``aot_eager`` backend, which runs the same fake implementation and registered backward without
code generation, for the option matrix: compile time dominates these tests).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import dft_ops
from dft_ops import custom_op
from dft_ops import objectives as o

from helpers import class_weights, make_inputs, rel_err

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _step(fn, hidden, weight, bias, labels, upstream=None, **kwargs):
    """(loss, stats or None, grads): fn's forward on fresh leaves, then the backward (outside fn)."""
    h, w, b = _leaves(hidden, weight, bias)
    out = fn(h, w, labels, bias=b, **kwargs)
    loss, stats = out if isinstance(out, tuple) else (out, None)
    loss.backward(upstream)
    return loss.detach(), stats, [t.grad for t in (h, w, b) if t is not None]


def _assert_same(got, want, rtol=1e-5):
    loss, stats, grads = got
    assert torch.allclose(loss, want[0], rtol=rtol, atol=1e-7), (loss, want[0])
    for a, b in zip(grads, want[2]):
        assert a.dtype == b.dtype and rel_err(a, b) < rtol
    assert (stats is None) == (want[1] is None)
    if stats is not None:
        for field, a, b in zip(stats._fields, stats, want[1]):
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, field
                assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=1e-6), field


def _breaks(fn, *args, **kwargs):
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_count, explained.graph_break_count, explained.break_reasons


def _functional(**options):
    def loss(hidden, weight, labels, bias=None, **batch):
        return dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, **options, **batch)
    return loss


# ---------------------------------------------------------------------------------------------- graph breaks


def test_importing_dft_ops_leaves_dynamo_and_triton_alone():
    """dft_ops marks its trace-time resolver as torch.compiler.assume_constant_result does, without importing
    torch._dynamo (which imports Triton: a later TRITON_INTERPRET=1 would no longer be read)."""
    import subprocess
    import sys

    code = "import sys, dft_ops; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]

    def probe():
        return None
    torch.compiler.assume_constant_result(probe)
    assert probe.__dict__ == {"_dynamo_marked_constant": True}
    assert custom_op._static._dynamo_marked_constant is True


def test_functional_and_module_trace_to_one_graph():
    hidden, weight, labels, bias = make_inputs((2, 7), 16, 37, torch.float32, "cpu", bias=True)
    h, w, b = _leaves(hidden, weight, bias)
    fn = _functional(objective="dft", shift=True, return_stats=True, label_smoothing=0.1)
    assert _breaks(fn, h, w, labels, bias=b)[:2] == (1, 0)
    module = dft_ops.LinearCrossEntropy("dft", shift=True, class_weight=class_weights(37, "cpu"))
    assert _breaks(module, h, w, labels, b)[:2] == (1, 0)


def test_the_functions_graph_holds_the_operator_and_no_host_read():
    """What the compiler sees: one call of the operator (and its backward), no data-dependent output."""
    hidden, weight, labels, _ = make_inputs((2, 7), 16, 37, torch.float32, "cpu")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(_functional(objective="dft", shift=True), fullgraph=True, backend=backend)
    fn(hidden, weight, labels)
    nodes = [node for node in graphs[0].graph.nodes if node.op in ("call_function", "call_method")]
    assert [n.target for n in nodes].count(torch.ops.dft_ops.linear_cross_entropy.default) == 1
    reads = {"item", "tolist", "nonzero", "__bool__", torch.nonzero, torch.Tensor.item, torch.Tensor.tolist}
    assert not [n for n in nodes if n.target in reads]


# ---------------------------------------------------------------------------------------------- inductor


def test_inductor_fullgraph_functional_and_module_match_eager():
    hidden, weight, labels, bias = make_inputs((2, 9), 16, 37, torch.float32, "cpu", bias=True, scale=3.0)
    options = dict(objective="dft", shift=True, return_stats=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    fn = _functional(**options)
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    _assert_same(_step(compiled, hidden, weight, bias, labels), _step(fn, hidden, weight, bias, labels))
    # the module, two-pass (its own graph: the operator's backward is the second dft_ops operator)
    module = dft_ops.LinearCrossEntropy("chord", backward_mode="gemm", class_weight=class_weights(37, "cpu"))
    compiled_module = torch.compile(module, fullgraph=True, backend="inductor")

    def call(m):
        return lambda h, w, y, bias=None: m(h, w, y, bias)
    _assert_same(_step(call(compiled_module), hidden, weight, bias, labels),
                 _step(call(module), hidden, weight, bias, labels))


# ---------------------------------------------------------------------------------------------- the option matrix

SECOND = "second_head"
CASES = {
    "none-upstream": dict(objective="dft", reduction="none", shift=True, return_stats=True),
    "sum-gemm-temperature": dict(objective=o.Power(0.5), reduction="sum", backward_mode="gemm", temperature=1.5),
    "num-items-tensor": dict(objective="ce", num_items_in_batch="tensor", class_weight=True),
    "weighted-mean-smoothing": dict(objective="dft", class_weight=True, label_smoothing=0.2, return_stats=True),
    "asft-second-head": dict(objective=o.ASFT(0.3, "reverse"), second_head=SECOND, return_stats=True),
    "psft-old-logprobs": dict(objective=o.PSFT(), old_logprobs=True),
    "sequence-dft": dict(objective=o.SequenceDFT("geometric"), position_ids=True),
    "sync-free": dict(objective="dft", shift=True, sync_free=True, return_stats=True, num_items_in_batch=25),
    "sync-free-gemm-none": dict(objective="ce", sync_free=True, backward_mode="gemm", reduction="none"),
    "bf16-hidden-fp32-head": dict(objective="dft", dtype=torch.bfloat16),
    "triton-interpreter": dict(objective="dft", backend="triton", backward_mode="gemm", return_stats=True),
}


def _case(name):
    spec = dict(CASES[name])
    dtype = spec.pop("dtype", torch.float32)
    hidden, weight, labels, bias = make_inputs((2, 9), 16, 37, torch.float32, "cpu", bias=True, scale=3.0)
    hidden = hidden.to(dtype)
    batch = {}
    if spec.pop("class_weight", False):
        spec["class_weight"] = class_weights(37, "cpu")
    if spec.get("num_items_in_batch") == "tensor":
        spec["num_items_in_batch"] = torch.tensor(21.0)
    if spec.pop(SECOND, None):
        spec[SECOND] = dft_ops.SecondHead(torch.randn(2, 9, 12), torch.randn(37, 12) / 3, None, 4.0)
    if spec.pop("old_logprobs", False):
        spec["old_logprobs"] = -torch.rand(2, 9) * 4
    if spec.pop("position_ids", False):
        spec["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))])
    for name in ("num_items_in_batch", SECOND, "old_logprobs", "position_ids"):
        if name in spec:
            batch[name] = spec.pop(name)
    upstream = torch.randn(2, 9 - int(spec.get("shift", 0))) if spec.get("reduction") == "none" else None
    return hidden, weight, bias, labels, upstream, spec, batch


@pytest.mark.parametrize("case", list(CASES))
def test_aot_fullgraph_matches_eager(case):
    hidden, weight, bias, labels, upstream, spec, batch = _case(case)
    fn = _functional(**spec)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_step(compiled, hidden, weight, bias, labels, upstream, **batch),
                 _step(fn, hidden, weight, bias, labels, upstream, **batch))


def test_the_operators_registrations_pass_opcheck():
    """torch.library.opcheck: schema, fake implementation against the real one, autograd registration,
    AOT dispatch (static and dynamic shapes), for a one-pass and a two-pass call."""
    hidden, weight, labels, bias = make_inputs((2, 9), 16, 37, torch.float32, "cpu", bias=True)
    for mode in ("onepass", "gemm"):
        h, w, b = _leaves(hidden.reshape(-1, 16), weight, bias)
        facts = custom_op._static(None, device_type="cpu", fits=True, compute=torch.float32, second_compute=None,
                                  second_softcap=None, needs=(True, True, True), has_class_weight=False,
                                  has_second=False, token_inputs=(),
                                  keywords=(("objective", "dft"), ("backward_mode", mode), ("return_stats", True)))
        args = (h, w, b, labels.reshape(-1), None, None, None, None, None, None, None, None, None, facts.key)
        torch.library.opcheck(torch.ops.dft_ops.linear_cross_entropy.default, args)


# ---------------------------------------------------------------------------------------------- guards and errors


def test_dynamic_shapes_and_changed_settings_recompile_without_a_break():
    fn = _functional(objective="dft", shift=True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for seq in (6, 11, 17):  # the token count is a symbol: one graph for all
        hidden, weight, labels, _ = make_inputs((2, seq), 16, 37, torch.float32, "cpu")
        _assert_same(_step(compiled, hidden, weight, None, labels), _step(fn, hidden, weight, None, labels))

    def with_objective(h, w, y, bias=None, objective=None, smoothing=0.0):
        return dft_ops.linear_cross_entropy(h, w, y, bias=bias, objective=objective, label_smoothing=smoothing)

    compiled = torch.compile(with_objective, fullgraph=True, backend="aot_eager")
    hidden, weight, labels, _ = make_inputs((2, 9), 16, 37, torch.float32, "cpu")
    # a setting that changes between calls becomes a symbol in the compiler: still a constant of the loss's graph
    for objective, smoothing in (("dft", 0.0), (o.Power(0.5), 0.1), (o.Power(2.0), 0.25), ("dft", 0.0)):
        kwargs = dict(objective=objective, smoothing=smoothing)
        _assert_same(_step(compiled, hidden, weight, None, labels, **kwargs),
                     _step(with_objective, hidden, weight, None, labels, **kwargs))


def test_objects_built_inside_the_compiled_function():
    """An objective and LossOptions constructed while tracing (they have no Python counterpart at trace time)."""
    def fn(h, w, y, bias=None):
        options = dft_ops.LossOptions(shift=True, label_smoothing=0.1).replace(z_loss=1e-3)
        return dft_ops.linear_cross_entropy(h, w, y, objective=o.Threshold("dft", min_p=0.01), options=options)

    hidden, weight, labels, _ = make_inputs((2, 9), 16, 37, torch.float32, "cpu", scale=3.0)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_step(compiled, hidden, weight, None, labels), _step(fn, hidden, weight, None, labels))


def test_errors_under_compile_are_the_eager_errors():
    hidden, weight, labels, _ = make_inputs((2, 9), 16, 37, torch.float32, "cpu")
    bad = labels.clone()
    bad[1, 3] = 40
    compiled = torch.compile(_functional(objective="dft"), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"^labels: 1 value\(s\) outside \[0, 37\)"):
        compiled(hidden, weight, bad)  # read inside the operator, as the eager path reads it
    with pytest.raises(ValueError, match="^reduction: expected one of"):
        torch.compile(_functional(reduction="avg"), backend="aot_eager")(hidden, weight, labels)
    with pytest.raises(Exception, match="reduction: expected one of"):  # fullgraph: dynamo's error carries it
        torch.compile(_functional(reduction="avg"), fullgraph=True, backend="aot_eager")(hidden, weight, labels)
    with pytest.raises(ValueError, match="^old_logprobs: objective PSFT needs"):
        torch.compile(_functional(objective=o.PSFT()), backend="aot_eager")(hidden, weight, labels)


def test_eager_operator_path_equals_the_function_path():
    """custom_op.forced(): the operators run eagerly, bit for bit what the autograd Function computes."""
    for name in CASES:
        hidden, weight, bias, labels, upstream, spec, batch = _case(name)
        want = _step(_functional(**spec), hidden, weight, bias, labels, upstream, **batch)
        with custom_op.forced():
            got = _step(_functional(**spec), hidden, weight, bias, labels, upstream, **batch)
        assert torch.equal(got[0], want[0]), name
        assert all(torch.equal(a, b) for a, b in zip(got[2], want[2])), name
        for a, b in zip(got[1] or (), want[1] or ()):
            assert (a is None and b is None) or torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- a patched model

def _patched_step(model):
    def step(input_ids, labels):
        return model(input_ids=input_ids, labels=labels).loss
    return step


def _model_grads(model, step, *batch):
    model.zero_grad(set_to_none=True)
    loss = step(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("backend, options", [("inductor", {}), ("aot_eager", dict(sync_free=True, objective="ce"))],
                         ids=["inductor-dft", "aot-sync-free-ce"])
def test_patched_model_training_step_compiles_whole(backend, options):
    """A tiny Qwen2 patched by dft_ops: its training forward is one graph (no break, from dft-ops or
    transformers), and the compiled loss and every parameter gradient are the eager ones."""
    pytest.importorskip("transformers")
    from dft_ops.callbacks import TokenStatsRecorder, attach_recorder
    from test_patching import build, make_batch

    model = dft_ops.patch(build("qwen2"), **options)
    batch = make_batch()
    step = _patched_step(model)
    graphs, breaks, reasons = _breaks(step, *batch)
    assert (graphs, breaks) == (1, 0), [r.reason for r in reasons]
    eager_recorder, compiled_recorder = TokenStatsRecorder(), TokenStatsRecorder()
    attach_recorder(model, eager_recorder)
    want = _model_grads(model, step, *batch)
    attach_recorder(model, compiled_recorder)  # the per-token statistics a TokenStatsCallback logs
    got = _model_grads(model, torch.compile(step, fullgraph=True, backend=backend), *batch)
    assert torch.allclose(got[0], want[0], rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert rel_err(got[1][name], want[1][name]) < 1e-4, name
    compiled_stats, eager_stats = compiled_recorder.collect(), eager_recorder.collect()
    assert compiled_stats.keys() == eager_stats.keys()
    assert all(abs(compiled_stats[k] - eager_stats[k]) < 1e-5 for k in eager_stats)


# ---------------------------------------------------------------------------------------------- GPU


@gpu
def test_reduce_overhead_mode_replays_the_sync_free_loss():
    """torch.compile(mode="reduce-overhead") (CUDA graphs of the compiled graph) on the sync-free operator:
    replayed on new inputs, the eager results."""
    D, V = 256, 5003
    weight = (torch.randn(V, D, device="cuda") / D**0.5).to(torch.bfloat16).requires_grad_()
    fn = _functional(objective="dft", shift=True, sync_free=True)
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):
        g = torch.Generator(device="cuda").manual_seed(seed)
        hidden = torch.randn(4, 129, D, device="cuda", generator=g).to(torch.bfloat16)
        labels = torch.randint(0, V, (4, 129), device="cuda", generator=g)
        labels[:, : 10 * seed] = -100
        got = _step(compiled, hidden, weight, None, labels)
        want = _step(fn, hidden, weight, None, labels)
        assert torch.allclose(got[0], want[0], rtol=1e-4)
        for a, b in zip(got[2], want[2]):
            assert rel_err(a.float(), b.float()) < 1e-2


def test_autocast_and_no_grad_inside_the_compiled_function():
    hidden, weight, labels, _ = make_inputs((2, 9), 16, 37, torch.float32, "cpu", scale=3.0)

    def mixed(h, w, y, bias=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the products in bf16, as nn.Linear's would be
            return dft_ops.linear_cross_entropy(h, w, y, objective="dft")

    def statistics(h, w, y, bias=None):
        with torch.no_grad():
            return dft_ops.linear_cross_entropy(h, w, y, return_stats=True)[1].entropy

    _assert_same(_step(torch.compile(mixed, fullgraph=True, backend="aot_eager"), hidden, weight, None, labels),
                 _step(mixed, hidden, weight, None, labels))
    compiled = torch.compile(statistics, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(hidden, weight, labels), statistics(hidden, weight, labels))


def test_what_the_operators_do_not_serve_runs_the_function():
    """An objective holding this batch's tensors the deprecated way: the Function runs (with graph breaks)."""
    hidden, weight, labels, _ = make_inputs((2, 9), 16, 37, torch.float32, "cpu")
    with pytest.warns(DeprecationWarning):
        held = o.PSFT(-torch.rand(2, 9) * 3)
    fn = _functional(objective=held)
    got = _step(torch.compile(fn, backend="aot_eager"), hidden, weight, None, labels)
    _assert_same(got, _step(fn, hidden, weight, None, labels))


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl"])
def test_distill_runs_the_function_under_compile(divergence):
    """Distill's mixture terms are not among the operators' outputs: the Function runs, with the eager results."""
    hidden, weight, labels, _ = make_inputs((2, 9), 16, 37, torch.float32, "cpu")
    torch.manual_seed(4)
    teacher = dft_ops.SecondHead(torch.randn(2, 9, 24), torch.randn(37, 24) * 0.3)
    fn = _functional(objective=o.Distill(divergence, alpha=0.3), shift=True, return_stats=True)
    torch._dynamo.reset()
    got = _step(torch.compile(fn, backend="aot_eager"), hidden, weight, None, labels, second_head=teacher)
    _assert_same(got, _step(fn, hidden, weight, None, labels, second_head=teacher))
    assert got[1].kl is not None
