"""The options the peers have, end to end: label smoothing, z-loss, temperature, class weights, precise.

Through the public API (both backends, the Triton kernels under the interpreter) against the float64
reference of dft_ops.naive, with every objective of the table; for CE also against PyTorch's own
``torch.nn.functional.cross_entropy(weight=, label_smoothing=)`` on materialized float64 logits.
Plus the returned values (TokenStats' lse, predicted tokens, z-loss, accuracy), the "mean" divisors,
the module, and a patched model.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import dft_ops
from dft_ops import LossOptions
from helpers import TOL, check_against_reference, class_weights, loss_and_grads, make_inputs, rel_err
from test_objectives import run_case_against_reference

BACKENDS = ["torch", "triton"]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# one case per row of the objective table (dft_ops.objectives)
OBJECTIVES = ["ce", "dft", "power-0.5", "chord", "focal-2", "threshold-dft-band", "psft", "importance-weighted",
              "sequence-product"]

# every new option with every objective on each backend, each dtype and reduction, in three configurations
CONFIGS = {
    "fp32-mean-shift-bias-smoothing-weights": dict(dtype=F32, shape=(2, 9), shift=True, bias=True, reduction="mean",
                                                   label_smoothing=0.1, class_weight=True, return_stats=True),
    "bf16-none-softcap-ignore5-zloss-temperature-precise": dict(dtype=BF16, shape=(2, 9), softcap=3.0,
                                                                ignore_index=5, reduction="none", z_loss=1e-3,
                                                                temperature=0.7, precise=True, return_stats=True),
    "fp16-sum-shift-bias-softcap-everything": dict(dtype=F16, shape=(3, 7), shift=True, bias=True, softcap=4.0,
                                                   reduction="sum", label_smoothing=0.2, z_loss=1e-2,
                                                   temperature=1.6, class_weight=True, precise=True,
                                                   return_stats=True),
}


def mean_divisor(labels, opts):
    """The "mean" divisor written out: num_items_in_batch, else sum of class_weight[y], else the count."""
    target = labels[..., int(opts.get("shift", 0)):]
    valid = target != opts.get("ignore_index", -100)
    if opts.get("num_items_in_batch") is not None:
        return float(opts["num_items_in_batch"])
    if opts.get("class_weight") is not None:
        total = opts["class_weight"].double()[target[valid]].sum().item()
        return total if total > 0 else 1.0
    return max(int(valid.sum()), 1)


def check_returned_values(ours, ref, hidden, weight, labels, bias, opts):
    """TokenStats' lse / predicted / z_loss / reduced_z_loss / accuracy against the reference's stats."""
    loss, stats = ours
    want = ref[1]
    mask = stats.mask
    assert torch.equal(mask, labels[..., int(opts.get("shift", 0)):] != opts.get("ignore_index", -100))
    scale = want["lse"].abs().max().clamp(min=1)
    assert stats.lse.dtype == F32 and (stats.lse.double() - want["lse"]).abs().max() < 1e-5 * scale
    assert stats.predicted.dtype == torch.int64
    assert torch.equal(stats.predicted[mask], want["argmax"][mask]) and (stats.predicted[~mask] == -1).all()
    assert torch.equal(stats.is_top1, want["is_top1"])
    assert torch.equal(stats.accuracy, want["is_top1"].sum().float() / mask.sum().clamp(min=1).float())
    if not opts.get("z_loss"):
        assert stats.z_loss is None and stats.reduced_z_loss is None
        return
    z = want["z_loss"]
    assert (stats.z_loss.double() - z).abs().max() < 1e-4 * z.abs().max()
    reduction = opts["reduction"]
    want_reduced = z if reduction == "none" else z.sum() if reduction == "sum" else z.sum() / mean_divisor(labels, opts)
    assert rel_err(stats.reduced_z_loss, want_reduced) < 1e-4
    # the loss without its z-loss part is the reference without the option
    math_opts = {k: v for k, v in opts.items() if k not in ("precise", "return_stats")}
    leaves = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    without = dft_ops.naive.linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], **{**math_opts, "z_loss": 0.0})
    # measured against the loss's size: the objective part alone may be far smaller (sequence-level DFT)
    assert ((loss.detach() - stats.reduced_z_loss).double() - without).abs().max() < 1e-4 * loss.abs().max()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", OBJECTIVES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_objective_with_the_options(backend, case, config, device):
    ours, ref, inputs, opts = run_case_against_reference(backend, case, CONFIGS[config], device)
    check_returned_values(ours, ref, *inputs, opts)


OPTION_VALUES = {"label_smoothing": 0.15, "z_loss": 3e-3, "temperature": 1.7, "class_weight": True}
SUBSETS = [dict(c) for r in range(len(OPTION_VALUES) + 1) for c in itertools.combinations(OPTION_VALUES.items(), r)]
SUBSET_IDS = ["+".join(s) or "none" for s in SUBSETS]


def full_cross(backend, objective, reduction, subset, device):
    hidden, weight, labels, bias = make_inputs((2, 7), 16, 53, F32, device, bias=True, scale=4.0)
    opts = dict(subset)
    if opts.pop("class_weight", False):
        opts["class_weight"] = class_weights(53, device)
    upstream = torch.randn(2, 6, device=device) if reduction == "none" else None
    check_against_reference(hidden, weight, labels, bias, backend=backend, upstream=upstream, objective=objective,
                            reduction=reduction, shift=True, **opts)


@pytest.mark.parametrize("subset", SUBSETS, ids=SUBSET_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("objective", ["ce", "dft"])
def test_full_cross_of_the_options_torch_backend(objective, reduction, subset, device):
    full_cross("torch", objective, reduction, subset, device)


@pytest.mark.parametrize("subset", SUBSETS, ids=SUBSET_IDS)
def test_full_cross_of_the_options_triton_backend(subset, device):
    full_cross("triton", "dft", "none", subset, device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_is_pytorch_cross_entropy_with_weight_and_label_smoothing(backend, reduction, device):
    """PyTorch's exact semantics (weighted mean included), on logits materialized here in float64."""
    B, S, Dm, Vm, eps, cap, T = 3, 8, 16, 53, 0.1, 5.0, 0.8
    hidden, weight, labels, bias = make_inputs((B, S), Dm, Vm, F32, device, bias=True, scale=4.0, ignore_index=7)
    cw = class_weights(Vm, device)
    upstream = torch.randn(B, S - 1, device=device) if reduction == "none" else None

    def pytorch(h, w, bias, **_):
        z = h @ w.T + bias
        z = cap * torch.tanh(z / cap) / T
        loss = F.cross_entropy(z[:, :-1].reshape(-1, Vm), labels[:, 1:].reshape(-1), weight=cw.double(),
                               label_smoothing=eps, ignore_index=7, reduction=reduction)
        return loss.reshape(B, S - 1) if reduction == "none" else loss

    ours, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, upstream, labels=labels,
                                 objective="ce", shift=True, ignore_index=7, softcap=cap, temperature=T,
                                 label_smoothing=eps, class_weight=cw, reduction=reduction, backend=backend)
    want, want_grads = loss_and_grads(pytorch, hidden.double(), weight.double(), bias.double(),
                                      None if upstream is None else upstream.double())
    assert rel_err(ours, want) < 1e-5
    for name, g, r in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert rel_err(g, r) < 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_divisors_with_class_weights(backend, device):
    """mean = sum / sum_t class_weight[y_t] (PyTorch), or / num_items_in_batch; nothing to weigh gives 0."""
    hidden, weight, labels, bias = make_inputs((2, 9), 16, 41, F32, device, bias=True, scale=3.0)
    cw = class_weights(41, device)
    common = dict(bias=bias, objective="dft", shift=True, class_weight=cw, z_loss=1e-2, label_smoothing=0.05,
                  backend=backend)
    total = dft_ops.linear_cross_entropy(hidden, weight, labels, reduction="sum", **common)
    mean = dft_ops.linear_cross_entropy(hidden, weight, labels, **common)
    target = labels[:, 1:]
    weighted_count = cw[target[target != -100]].sum()
    assert weighted_count > 0 and rel_err(mean, total / weighted_count) < 1e-6
    items = dft_ops.linear_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(37), **common)
    assert rel_err(items, total / 37) < 1e-6
    # every label ignored: 0 and zero gradients, not NaN
    ignored = torch.full_like(labels, -100)
    out, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, labels=ignored, objective="dft",
                                shift=True, class_weight=cw, backend=backend)
    assert out.item() == 0 and all((g == 0).all() for g in grads)
    # labels of weight-0 classes only, without smoothing: nothing counts, loss 0 (PyTorch would give NaN)
    zero_class = torch.zeros_like(labels)  # class 0 has weight 0 (class_weights zeroes every 7th)
    assert cw[0] == 0
    out = dft_ops.linear_cross_entropy(hidden, weight, zero_class, shift=True, class_weight=cw, backend=backend)
    assert out.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_with_the_options(backend, device):
    """bf16 hidden states with an fp32 head and bias, every option: the products in bf16, no cast copies."""
    hidden, weight, labels, bias = make_inputs((2, 11), 24, 67, F32, device, bias=True, scale=4.0)
    hidden = hidden.bfloat16()
    cw = class_weights(67, device)
    opts = dict(objective="dft", shift=True, label_smoothing=0.1, z_loss=1e-3, temperature=0.9, class_weight=cw,
                softcap=6.0)
    ours, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, labels=labels, backend=backend,
                                 precise=True, **opts)
    # what is computed: hidden and weight rounded to bf16, the bias as given, in float64
    ref, ref_grads = loss_and_grads(dft_ops.naive.linear_cross_entropy, hidden.double(),
                                    weight.bfloat16().double(), bias.double(), labels=labels, **opts)
    assert rel_err(ours, ref) < 1e-4
    for name, like, g, r in zip(("hidden", "weight", "bias"), (hidden, weight, bias), grads, ref_grads):
        assert g.dtype == like.dtype and rel_err(g, r) < TOL[BF16], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_precise_changes_how_not_what(backend, device):
    """precise=True: the same loss; 16-bit gradients at least as close to float64 as the two passes without it
    ("auto" would run one pass without it, where the loss is rounded differently)."""
    hidden, weight, labels, bias = make_inputs((4, 9), 32, 97, BF16, device, scale=5.0)
    errors = {}
    for precise in (False, True):
        out, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels,
                                    backend=backend, precise=precise, label_smoothing=0.1, backward_mode="gemm")
        errors[precise] = out, grads
    ref, ref_grads = loss_and_grads(dft_ops.naive.linear_cross_entropy, hidden.double(), weight.double(), None,
                                    labels=labels, label_smoothing=0.1)
    assert torch.equal(errors[False][0], errors[True][0])
    for i in range(2):
        with_precise, without = (rel_err(errors[p][1][i], ref_grads[i]) for p in (True, False))
        # the kernels round G to bf16 unless precise; the torch backend never does (precise changes nothing)
        assert with_precise < without if backend == "triton" else with_precise == without


# ------------------------------------------------------------------------------------------ options object


def test_class_weight_in_the_options_object():
    cw = torch.rand(50) + 0.5
    opts = LossOptions(objective="ce", class_weight=cw, label_smoothing=0.1)
    assert opts.class_weight is cw  # kept as is: no copy, the same object
    assert "Tensor(shape=(50,), dtype=torch.float32, device=cpu)" in repr(opts) and "0.5" not in repr(opts)
    # equality and hash by the tensor's identity: never reads its values
    assert opts == opts.replace() == opts.replace(reduction="mean") and hash(opts) == hash(opts.replace(z_loss=0.0))
    assert opts != opts.replace(class_weight=cw.clone()) and opts != opts.replace(class_weight=None)
    assert len({opts, opts.replace(label_smoothing=0.1), opts.replace(z_loss=1e-4)}) == 2
    grad_cw = cw.clone().requires_grad_()
    held = LossOptions(class_weight=grad_cw).class_weight
    assert not held.requires_grad and held.data_ptr() == grad_cw.data_ptr()  # never differentiated


def test_module_takes_and_moves_the_options(device):
    hidden, weight, labels, bias = make_inputs((2, 7), 12, 30, F32, device, bias=True)
    cw = class_weights(30, device)
    module = dft_ops.LinearCrossEntropy("ce", shift=True, label_smoothing=0.2, z_loss=1e-3, temperature=1.5,
                                        class_weight=cw, precise=True, return_stats=True)
    assert module.options == LossOptions(objective=module.options.objective, shift=True, label_smoothing=0.2,
                                         z_loss=1e-3, temperature=1.5, class_weight=cw, precise=True,
                                         return_stats=True)
    got, stats = module(hidden, weight, labels, bias=bias)
    want, want_stats = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, options=module.options)
    assert torch.equal(got, want) and torch.equal(stats.reduced_z_loss, want_stats.reduced_z_loss)
    assert "class_weight=Tensor(shape=(30,)" in repr(module)
    # .to() moves and casts class_weight with the module, as CrossEntropyLoss's weight buffer
    assert module.to(torch.float64).options.class_weight.dtype == torch.float64
    assert torch.equal(module.options.class_weight, cw.double())


def test_patch_takes_every_new_option():
    from test_patching import build

    from dft_ops.patching import patch_state

    model = build("llama")
    cw = torch.rand(model.config.vocab_size) + 0.1
    dft_ops.patch(model, objective="ce", label_smoothing=0.1, z_loss=1e-4, temperature=0.5, class_weight=cw,
                  precise=True)
    opts = patch_state(model).options
    assert (opts.label_smoothing, opts.z_loss, opts.temperature, opts.class_weight, opts.precise) == \
        (0.1, 1e-4, 0.5, cw, True)
    with pytest.raises(ValueError, match="^label_smoothing"):
        dft_ops.patch(model, label_smoothing=1.5)
    with pytest.raises(TypeError, match="^class_weight"):
        dft_ops.patch(model, class_weight=[1.0])


def test_patched_model_trains_with_label_smoothing_and_z_loss():
    """A patched tiny model (head bias) trains on the fused loss and matches the loss written out on logits."""
    from test_patching import build, make_batch

    eps, zl = 0.1, 1e-2
    input_ids, labels = make_batch()
    patched, plain = build("phi"), build("phi")
    dft_ops.patch(patched, objective="dft", label_smoothing=eps, z_loss=zl)

    def reference(model):
        logits = model(input_ids=input_ids).logits[:, :-1].double()
        target = labels[:, 1:]
        valid = target != -100
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        p = logp.exp().detach()  # DFT's weight, also scaling the smoothing term
        per_token = (1 - eps) * -p * logp + (eps / logits.shape[-1]) * p * -logp_all.sum(-1) \
            + zl * logits.logsumexp(-1) ** 2
        return per_token[valid].sum() / valid.sum()

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (patched, plain)]
    losses = []
    for _ in range(4):
        fused, want = patched(input_ids=input_ids, labels=labels).loss, reference(plain)
        assert rel_err(fused.detach(), want.detach()) < 1e-5
        losses.append(fused.item())
        for loss, opt in zip((fused, want), optimizers):
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert losses[-1] < losses[0]
    for (name, a), b in zip(patched.named_parameters(), plain.parameters()):
        assert rel_err(a.detach(), b.detach()) < 1e-4, name
