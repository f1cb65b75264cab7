"""Every objective of dft_ops.objectives against the float64 oracle dft_ops.naive, both backends.

The float64 oracle (naive.naive_loss) is written from the papers' formulas with
``.detach()`` for stop-gradients and differentiated by autograd; the table's
``weight`` is never used there. Inputs are "peaked" (many labels are the
argmax) so label probabilities span (0, 1): thresholds, clips and clamps are
placed where tokens fall on both sides of them, which the tests assert.
"""

import math

import pytest
import torch

import dft_ops
from dft_ops import objectives as o
from dft_ops.objectives import TokenBatch
from helpers import check_against_reference, class_weights, loss_and_grads, make_inputs, rel_err

BACKENDS = ["torch", "triton"]
D, V = 24, 67


def peaked_inputs(shape, dtype, device, *, shift, bias=False, ignore_index=-100, ignore_frac=0.2, seed_frac=0.6):
    """make_inputs whose labels are the argmax of their logits at a fraction of positions."""
    hidden, weight, labels, b = make_inputs(shape, D, V, dtype, device, bias=bias, scale=6.0,
                                            ignore_frac=0, ignore_index=ignore_index)
    with torch.no_grad():
        top = dft_ops.naive.logits(hidden, weight, b).argmax(-1)
        if shift:  # position t predicts labels[..., t + 1]
            pick = torch.rand(top[..., :-1].shape, device=device) < seed_frac
            labels[..., 1:] = torch.where(pick, top[..., :-1], labels[..., 1:])
        else:
            labels = torch.where(torch.rand(shape, device=device) < seed_frac, top, labels)
        labels[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    return hidden, weight, labels, b


def label_logprobs(hidden, weight, labels, bias, **opts):
    """(loss positions) float32 label log-probs from the reference, and the valid mask."""
    keep = {k: opts[k] for k in ("shift", "softcap", "temperature", "ignore_index") if k in opts}
    _, stats = dft_ops.naive.linear_cross_entropy(hidden, weight, labels, bias=bias, return_stats=True, **keep)
    target = labels[..., 1:] if opts.get("shift") else labels
    return stats["logprob"].float(), target != opts.get("ignore_index", -100)


def with_garbage(t, valid):
    """Per-token input with absurd values at ignored positions: they must be ignored."""
    return torch.where(valid, t, torch.full_like(t, -1e4))


def split_point(p, q):
    """A probability near the q-quantile of p, halfway across the widest gap there (no token sits near it)."""
    p = p.double().sort().values
    n = p.numel()
    ks = range(max(1, int((q - 0.15) * n)), min(n - 1, int((q + 0.15) * n)) + 1)
    k = max(ks, key=lambda k: p[k] / p[k - 1])
    return float((p[k] + p[k - 1]) / 2)


def threshold_between(lo_q, hi_q):
    def make(logp, valid):
        p = logp[valid].exp()
        lo = None if lo_q is None else split_point(p, lo_q)
        hi = None if hi_q is None else split_point(p, hi_q)
        return o.Threshold("ce" if hi_q is None else "dft", min_p=lo, max_p=hi)
    return make


def offsets(like, lo, hi):
    """Random magnitudes in [lo, hi) with alternating signs: per-token inputs on both sides of the policy."""
    sign = 1 - 2 * (torch.arange(like.numel(), device=like.device) % 2).reshape(like.shape)
    return sign * (lo + (hi - lo) * torch.rand_like(like))


def psft(logp, valid, **clips):
    return o.PSFT(**clips), {"old_logprobs": with_garbage(logp + offsets(logp, 0.3, 0.9), valid)}


def importance_weighted(logp, valid):
    return o.ImportanceWeighted(clamp=(0.5, 1.5)), {"ref_logprobs": with_garbage(logp + offsets(logp, 0.2, 2.0), valid)}


def make_case(name, logp, valid):
    """(objective, this batch's call arguments) of a case of CASES."""
    made = CASES[name](logp, valid)
    return made if isinstance(made, tuple) else (made, {})


# name -> factory(label log-probs at the loss positions, valid mask) -> objective (instance or name), or
# (objective, the batch's per-token inputs as call arguments)
CASES = {
    "ce": lambda logp, valid: o.CE(),
    "dft": lambda logp, valid: "dft",
    "power-0.5": lambda logp, valid: o.Power(0.5),
    "power-10": lambda logp, valid: o.Power(10),
    "chord": lambda logp, valid: "chord",
    "focal-2": lambda logp, valid: o.Focal(2.0),
    "focal-0.5": lambda logp, valid: o.Focal(0.5),
    "threshold-ce-min": threshold_between(0.4, None),
    "threshold-dft-band": threshold_between(0.25, 0.75),
    "psft": psft,
    "psft-tight": lambda logp, valid: psft(logp, valid, clip_low=0.1, clip_high=0.1),
    "importance-weighted": importance_weighted,
    "sequence-product": lambda logp, valid: o.SequenceDFT("product"),
    "sequence-geometric": lambda logp, valid: o.SequenceDFT("geometric"),
}

# every option, dtype and reduction, spread over four configurations instead of a cross product
CONFIGS = {
    "fp32-mean-shift-bias-stats": dict(dtype=torch.float32, shape=(2, 9), shift=True, bias=True,
                                       reduction="mean", return_stats=True),
    "bf16-none-softcap-ignore5": dict(dtype=torch.bfloat16, shape=(2, 9), softcap=3.0, ignore_index=5,
                                      reduction="none"),
    "fp32-sum-shift-softcap-bias": dict(dtype=torch.float32, shape=(3, 7), shift=True, softcap=2.5, bias=True,
                                        reduction="sum"),
    "bf16-mean-items-shift": dict(dtype=torch.bfloat16, shape=(2, 9), shift=True, reduction="mean",
                                  num_items_in_batch=23),
}


def assert_tokens_on_both_sides(objective, batch, logp, valid):
    """The parameters split the tokens, so a wrong comparison or clip would show."""
    p = logp[valid].double().exp()
    if isinstance(objective, o.Threshold):
        inside = torch.ones_like(p, dtype=torch.bool)
        if objective.min_p is not None:
            inside &= p >= objective.min_p
        if objective.max_p is not None:
            inside &= p <= objective.max_p
        assert inside.any() and not inside.all()
    if isinstance(objective, o.PSFT):
        r = (logp - batch["old_logprobs"])[valid].double().exp()
        assert (r > 1 + objective.clip_high).any() and (r < 1 - objective.clip_low).any()
    if isinstance(objective, o.ImportanceWeighted):
        w = (logp - batch["ref_logprobs"])[valid].double().exp()
        assert (w > objective.clamp[1]).any() and (w < objective.clamp[0]).any()


def case_inputs(config, device):
    """Peaked inputs of a configuration (the options plus ``dtype``, ``shape``, ``bias`` and
    ``class_weight`` bools): (hidden, weight, labels, bias, the loss options, label log-probs, valid mask)."""
    opts = dict(config)
    dtype, shape = opts.pop("dtype"), opts.pop("shape")
    hidden, weight, labels, bias = peaked_inputs(shape, dtype, device, shift=opts.get("shift", False),
                                                 bias=opts.pop("bias", False),
                                                 ignore_index=opts.get("ignore_index", -100))
    if opts.pop("class_weight", False):
        opts["class_weight"] = class_weights(V, device)
    logp, valid = label_logprobs(hidden, weight, labels, bias, **opts)
    return hidden, weight, labels, bias, opts, logp, valid


def run_case_against_reference(backend, case, config, device):
    """An objective case of CASES in a configuration, through check_against_reference.

    ``config``: the options plus ``dtype``, ``shape``, ``bias`` (bool) and
    ``class_weight`` (bool: random class weights). Returns (ours, ref,
    (hidden, weight, labels, bias), the options used, objective included).
    """
    hidden, weight, labels, bias, opts, logp, valid = case_inputs(config, device)
    objective, batch = make_case(case, logp, valid)
    assert_tokens_on_both_sides(objective, batch, logp, valid)
    upstream = torch.randn(logp.shape, device=device) if opts["reduction"] == "none" else None
    ours, ref = check_against_reference(hidden, weight, labels, bias, backend=backend, upstream=upstream,
                                        objective=objective, **batch, **opts)
    return ours, ref, (hidden, weight, labels, bias), {**opts, **batch, "objective": objective}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case, config, device):
    ours, ref, _, opts = run_case_against_reference(backend, case, CONFIGS[config], device)
    if opts.get("return_stats"):  # stats do not depend on the objective
        for key in ("logprob", "entropy"):
            assert (ours[1][key].double() - ref[1][key]).abs().max() < 1e-4, key
        assert torch.equal(ours[1].is_top1, ref[1]["is_top1"])


# packed rows: documents start where position_ids is 0; the third document of row 0 is fully ignored
POSITION_IDS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0],
                             [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["product", "geometric"])
@pytest.mark.parametrize("shift", [False, True])
def test_sequence_level_with_packed_position_ids(backend, mode, shift, device):
    position_ids = POSITION_IDS.to(device)
    hidden, weight, labels, bias = peaked_inputs(tuple(position_ids.shape), torch.float32, device, shift=shift,
                                                 bias=True, seed_frac=0.8, ignore_frac=0.1)
    labels[0, 7:12] = -100  # with shift, position 6 predicts labels[0, 7] and belongs to the 2nd document
    labels[position_ids == 0] = -100  # as packing collators do at document starts
    objective = o.SequenceDFT(mode)
    upstream = torch.randn((2, 12 if shift else 13), device=device)
    for reduction in ("mean", "none"):
        check_against_reference(hidden, weight, labels, bias, backend=backend, objective=objective, shift=shift,
                                position_ids=position_ids, reduction=reduction,
                                upstream=upstream if reduction == "none" else None)
    # packing matters: the same tokens as two plain rows weigh differently
    packed = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, objective=objective, shift=shift,
                                          position_ids=position_ids, backend=backend)
    rows = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, objective=objective, shift=shift,
                                        backend=backend)
    assert not torch.allclose(packed, rows, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_level_on_flat_tokens_is_one_sequence(backend, device):
    hidden, weight, labels, _ = peaked_inputs((15,), torch.float32, device, shift=False, seed_frac=0.9)
    position_ids = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2], device=device)
    for mode in ("product", "geometric"):
        check_against_reference(hidden, weight, labels, None, backend=backend, objective=o.SequenceDFT(mode))
        check_against_reference(hidden, weight, labels, None, backend=backend, objective=o.SequenceDFT(mode),
                                position_ids=position_ids)


# --- facts that deserve their own test ------------------------------------------------------------


def grads_of(objective, inputs, backend, upstream=None, **opts):
    hidden, weight, labels, bias = inputs
    return loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, upstream, labels=labels,
                          objective=objective, backend=backend, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_one_has_dft_gradient(backend, device):
    inputs = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    loss_p, g_p = grads_of(o.Power(1.0), inputs, backend, shift=True)
    loss_d, g_d = grads_of("dft", inputs, backend, shift=True)
    for a, b in zip(g_p, g_d):
        assert rel_err(a, b) < 1e-6
    assert not torch.allclose(loss_p, loss_d)  # same gradient, different loss value: (1 - p) vs -p log p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["ce", "dft"])
def test_threshold_without_bounds_equals_its_base(backend, base, device):
    inputs = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    loss_t, g_t = grads_of(o.Threshold(base), inputs, backend, shift=True, softcap=4.0)
    loss_b, g_b = grads_of(base, inputs, backend, shift=True, softcap=4.0)
    assert torch.equal(loss_t, loss_b)
    for a, b in zip(g_t, g_b):
        assert torch.equal(a, b)
    # bounds that include every probability change nothing either
    loss_all, _ = grads_of(o.Threshold(base, min_p=0.0, max_p=1.0), inputs, backend, shift=True, softcap=4.0)
    assert torch.equal(loss_all, loss_b)


def current_logprobs(inputs, backend, **opts):
    hidden, weight, labels, bias = inputs
    _, stats = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, return_stats=True, backend=backend,
                                            **opts)
    return stats.logprob


@pytest.mark.parametrize("backend", BACKENDS)
def test_psft_at_the_old_policy_has_ce_gradient(backend, device):
    inputs = peaked_inputs((2, 9), torch.float32, device, shift=True, bias=True)
    old = current_logprobs(inputs, backend, shift=True)
    upstream = torch.randn(old.shape, device=device)
    loss_p, g_p = grads_of(o.PSFT(), inputs, backend, upstream, shift=True, reduction="none", old_logprobs=old)
    loss_c, g_c = grads_of("ce", inputs, backend, upstream, shift=True, reduction="none")
    for a, b in zip(g_p, g_c):
        assert rel_err(a, b) < 1e-6
    valid = inputs[2][..., 1:] != -100
    assert torch.allclose(loss_p[valid], torch.tensor(-1.0, device=device))  # ratio 1 everywhere


@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_weighted_at_the_reference_is_ce(backend, device):
    inputs = peaked_inputs((2, 9), torch.float32, device, shift=True)
    ref = current_logprobs(inputs, backend, shift=True)
    # the two passes, as current_logprobs computes (no gradient): the same log p to the last bit
    loss_i, g_i = grads_of(o.ImportanceWeighted(), inputs, backend, shift=True, ref_logprobs=ref,
                           backward_mode="gemm")
    loss_c, g_c = grads_of("ce", inputs, backend, shift=True, backward_mode="gemm")
    assert torch.allclose(loss_i, loss_c, rtol=1e-6)
    for a, b in zip(g_i, g_c):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_sequences_are_dft(backend, device):
    inputs = peaked_inputs((2, 9), torch.float32, device, shift=False)
    every_token_alone = torch.zeros((2, 9), dtype=torch.long, device=device)
    loss_d, g_d = grads_of("dft", inputs, backend, backward_mode="gemm")  # sequence objectives run two passes
    for mode in ("product", "geometric"):
        loss_s, g_s = grads_of(o.SequenceDFT(mode), inputs, backend, position_ids=every_token_alone)
        assert torch.allclose(loss_s, loss_d, rtol=1e-6)
        for a, b in zip(g_s, g_d):
            assert rel_err(a, b) < 1e-6


def test_focal_weight_is_finite_and_exact_up_to_p_equal_one():
    """weight = -d value / d logp of the focal formula, in float64, including gamma < 1 where p -> 1."""
    logp = torch.tensor([0.0, -1e-30, -1e-9, -1e-6, -1e-3, -0.1, -1.0, -5.0, -30.0, -200.0])
    for gamma in (0.0, 0.3, 0.5, 1.0, 2.0, 5.0):
        w = o.Focal(gamma).weight(TokenBatch(logp=logp))
        assert torch.isfinite(w).all(), gamma
        x = logp.double()[1:].requires_grad_()  # the float64 formula's derivative is NaN at p == 1 exactly
        (-((1 - x.exp()) ** gamma) * x).sum().backward()
        # p = exp(-1e-30) is 1 in float64: there the limit is the exact answer
        expected = torch.cat([torch.tensor([1.0 if gamma == 0 else 0.0], dtype=torch.float64), -x.grad])
        expected[1] = 1.0 if gamma == 0 else 0.0
        assert torch.allclose(w.double(), expected, rtol=1e-5, atol=1e-6), (gamma, w, expected)
    assert torch.equal(o.Focal(0.0).weight(TokenBatch(logp=logp)), torch.ones_like(logp))


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_with_gamma_below_one_survives_certain_tokens(backend, device):
    hidden, weight, labels, _ = make_inputs((12,), 16, 40, torch.float32, device, scale=3e3, ignore_frac=0)
    labels = dft_ops.naive.logits(hidden, weight).argmax(-1)  # p == 1 in float32
    loss, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, None, labels=labels,
                                 objective=o.Focal(0.5), backend=backend)
    # 0 where log p reads 0 (two passes: z_y - lse); the one-pass head's log p, free of lse's rounding, can
    # read -1e-24: a loss of that order, never a NaN or an infinite weight
    assert loss.abs() < 1e-20 and all(torch.isfinite(g).all() and g.abs().max() < 1e-10 for g in grads)


def test_objective_names_and_repr():
    assert set(o.OBJECTIVES) == {"ce", "dft", "chord"}
    assert isinstance(o.resolve("chord"), o.Chord)
    with pytest.raises(ValueError, match=r"^objective: 'power' takes parameters.*Power\(alpha\)"):
        o.resolve("power")
    assert repr(o.Power(10)) == "Power(alpha=10.0)" and repr(o.CE()) == "CE()" and repr(o.Chord()) == "Chord()"
    assert repr(o.Threshold("dft", min_p=0.2)) == "Threshold(base='dft', min_p=0.2, max_p=None)"
    assert repr(o.PSFT()) == "PSFT(clip_low=0.2, clip_high=0.28)"  # settings only: the tensors come per call
    assert o.PSFT(clip_high=0.3) == o.PSFT(clip_high=0.3) != o.PSFT() and len({o.PSFT(), o.PSFT()}) == 1


T = torch.zeros(2, 8)
BAD_PARAMETERS = [
    # (exception, parameter, constructor)
    (ValueError, "alpha", lambda: o.Power(0)),
    (ValueError, "alpha", lambda: o.Power(-1.5)),
    (ValueError, "alpha", lambda: o.Power(math.nan)),
    (TypeError, "alpha", lambda: o.Power("1")),
    (ValueError, "gamma", lambda: o.Focal(-0.5)),
    (ValueError, "gamma", lambda: o.Focal(math.inf)),
    (ValueError, "base", lambda: o.Threshold("focal")),
    (ValueError, "base", lambda: o.Threshold(o.Power(1))),
    (ValueError, "min_p", lambda: o.Threshold("ce", min_p=0.6, max_p=0.4)),
    (ValueError, "min_p", lambda: o.Threshold("ce", min_p=1.5)),
    (ValueError, "max_p", lambda: o.Threshold("dft", max_p=-0.1)),
    (ValueError, "clip_low", lambda: o.PSFT(clip_low=1.0)),
    (ValueError, "clip_low", lambda: o.PSFT(clip_low=-0.1)),
    (ValueError, "clip_high", lambda: o.PSFT(clip_high=-0.2)),
    (ValueError, "clamp", lambda: o.ImportanceWeighted(clamp=(1.5, 0.5))),
    (ValueError, "clamp", lambda: o.ImportanceWeighted(clamp=(0.5,))),
    (ValueError, "clamp", lambda: o.ImportanceWeighted(clamp=(-1.0, 2.0))),
    (ValueError, "mode", lambda: o.SequenceDFT("mean")),
]


@pytest.mark.parametrize("exc, name, make", BAD_PARAMETERS, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_PARAMETERS)])
def test_bad_parameters_raise_naming_the_parameter(exc, name, make):
    with pytest.raises(exc, match=rf"^{name}\b"):
        make()


@pytest.mark.parametrize("make", [o.PSFT, o.ImportanceWeighted], ids=["psft", "importance_weighted"])
def test_per_token_input_must_have_the_loss_positions_shape(make, device):
    hidden, weight, labels, _ = make_inputs((2, 8), D, V, torch.float32, device)
    name = make.token_inputs[0]
    # with shift the loss positions are labels[..., 1:]: (2, 7); the labels' own shape is wrong
    with pytest.raises(ValueError, match=rf"^{name}: shape \(2, 8\).*\(2, 7\)"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, objective=make(), shift=True,
                                     **{name: torch.zeros(2, 8, device=device)})
    with pytest.raises(TypeError, match=rf"^{name}: expected a floating-point tensor"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, objective=make(), shift=True,
                                     **{name: torch.zeros(2, 7, dtype=torch.long, device=device)})
    dft_ops.linear_cross_entropy(hidden, weight, labels, objective=make(), shift=True,
                                 **{name: torch.zeros(2, 7, device=device)})


def test_per_token_inputs_are_call_arguments():
    """Missing, misplaced and deprecated (held by the objective) per-token inputs."""
    hidden, weight, labels, _ = make_inputs((2, 6), 12, 30, torch.float32, "cpu")
    ref = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"^ref_logprobs: objective ImportanceWeighted needs this batch's"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, objective=o.ImportanceWeighted())
    with pytest.raises(ValueError, match=r"^old_logprobs: objective ImportanceWeighted takes no old_logprobs"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, objective=o.ImportanceWeighted(), ref_logprobs=ref,
                                     old_logprobs=ref)
    with pytest.raises(ValueError, match=r"^old_logprobs: objective DFT takes no old_logprobs"):
        dft_ops.linear_cross_entropy(hidden, weight, labels, objective="dft", old_logprobs=ref)
    want = dft_ops.linear_cross_entropy(hidden, weight, labels, objective=o.ImportanceWeighted(), ref_logprobs=ref)
    # the deprecated forms, for one release: tensors held by the objective move to the call
    with pytest.warns(DeprecationWarning, match="ImportanceWeighted"):
        held = o.ImportanceWeighted(ref)
    with pytest.warns(DeprecationWarning, match="with_token_tensors"):
        held_later = o.ImportanceWeighted().with_token_tensors(ref_logprobs=ref)
    for objective in (held, held_later):
        assert objective == o.ImportanceWeighted()  # the tensors are no setting
        assert torch.equal(dft_ops.linear_cross_entropy(hidden, weight, labels, objective=objective), want)
        options = dft_ops.LossOptions(objective=objective)
        assert torch.equal(dft_ops.linear_cross_entropy(hidden, weight, labels, options=options), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", [o.DFT(), o.Chord(), o.Threshold("dft", max_p=0.9), o.SequenceDFT("geometric")],
                         ids=lambda ob: type(ob).__name__)
def test_a_label_masked_to_minus_inf_contributes_zero(backend, objective, device):
    """p = 0 exactly (the label's logit is -inf): -sg(p) log p tends to 0, never 0 * inf = NaN."""
    hidden, weight, labels, bias = make_inputs((2, 11), D, V, torch.float32, device, bias=True, ignore_frac=0.1)
    masked = torch.arange(0, V, 5, device=device)
    bias[masked] = float("-inf")  # classes 0, 5, 10, ... can never be predicted
    labels[:, ::3] = masked[: labels[:, ::3].shape[1]]
    values, grads = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, torch.ones(labels.shape),
                                   labels=labels, objective=objective, reduction="none", backend=backend)
    hit = torch.isin(labels, masked)
    assert hit.sum() >= 4 and torch.isfinite(values).all()
    assert (values[hit] == 0).all()
    assert not any(torch.isnan(g).any() for g in grads)
    # the other tokens are as if the masked ones were ignored
    clean = labels.masked_fill(hit, -100)
    ref, _ = loss_and_grads(dft_ops.linear_cross_entropy, hidden, weight, bias, torch.ones(labels.shape),
                            labels=clean, objective=objective, reduction="none", backend=backend)
    if not isinstance(objective, o.SequenceDFT):  # a sequence's weight is its product of p: 0 for the whole row
        assert rel_err(values[~hit], ref[~hit]) < 1e-5
