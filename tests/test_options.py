"""LossOptions (one validated options object) and TokenLayout (one owner of the token layout)."""

import dataclasses
import inspect

import pytest
import torch

import dft_ops
from dft_ops import LossOptions, TokenLayout
from dft_ops import objectives as o
from dft_ops.layout import _positions_of_true
from helpers import make_inputs

# ------------------------------------------------------------------------------------------------ LossOptions


def test_defaults_and_normalization():
    opts = LossOptions()
    assert isinstance(opts.objective, o.CE)  # cross-entropy unless told otherwise; patch() defaults to DFT
    assert (opts.ignore_index, opts.reduction, opts.softcap, opts.shift, opts.return_stats, opts.backend,
            opts.filter_eps) == (-100, "mean", None, 0, False, "auto", None)
    assert (opts.label_smoothing, opts.z_loss, opts.temperature, opts.class_weight, opts.precise) == \
        (0.0, 0.0, None, None, False)
    opts = LossOptions(objective="ce", shift=True, softcap=30, ignore_index=torch.tensor(3).item(), filter_eps=1e-6)
    assert isinstance(opts.objective, o.CE)
    assert opts.shift == 1 and type(opts.shift) is int
    assert opts.softcap == 30.0 and type(opts.softcap) is float
    assert LossOptions(shift=False).shift == 0 and LossOptions(shift=3).shift == 3
    power = o.Power(2.0)
    assert LossOptions(objective=power).objective is power
    assert LossOptions.names() == ("objective", "ignore_index", "reduction", "softcap", "shift", "return_stats",
                                   "backend", "filter_eps", "label_smoothing", "z_loss", "temperature",
                                   "class_weight", "precise", "vocab_parallel",
                                   "backward_mode", "workspace_mb", "sync_free")
    opts = LossOptions(label_smoothing=torch.tensor(0.25).item(), z_loss=1, temperature=2)
    assert (opts.label_smoothing, opts.z_loss, opts.temperature) == (0.25, 1.0, 2.0)
    assert type(opts.z_loss) is float and type(opts.temperature) is float
    assert (LossOptions().backward_mode, LossOptions().workspace_mb) == ("auto", None)  # None: the mode's default
    assert type(LossOptions(workspace_mb=64).workspace_mb) is float


BAD_OPTIONS = [
    (ValueError, "objective", dict(objective="dpo")),
    (TypeError, "objective", dict(objective=3)),
    (TypeError, "ignore_index", dict(ignore_index=1.0)),
    (ValueError, "ignore_index", dict(ignore_index=2**63)),
    (ValueError, "reduction", dict(reduction="avg")),
    (ValueError, "reduction", dict(reduction=None)),
    (TypeError, "softcap", dict(softcap="30")),
    (ValueError, "softcap", dict(softcap=float("nan"))),
    (TypeError, "shift", dict(shift="yes")),
    (TypeError, "shift", dict(shift=(1,))),
    (ValueError, "shift", dict(shift=-2)),
    (TypeError, "return_stats", dict(return_stats=1)),
    (ValueError, "backend", dict(backend="cuda")),
    (TypeError, "filter_eps", dict(filter_eps=True)),
    (ValueError, "filter_eps", dict(filter_eps=0.0)),
    (TypeError, "label_smoothing", dict(label_smoothing="0.1")),
    (TypeError, "label_smoothing", dict(label_smoothing=True)),
    (ValueError, "label_smoothing", dict(label_smoothing=1.0)),
    (ValueError, "label_smoothing", dict(label_smoothing=-0.1)),
    (ValueError, "label_smoothing", dict(label_smoothing=float("nan"))),
    (TypeError, "z_loss", dict(z_loss=None)),
    (ValueError, "z_loss", dict(z_loss=-1e-4)),
    (ValueError, "z_loss", dict(z_loss=float("inf"))),
    (TypeError, "temperature", dict(temperature="1")),
    (ValueError, "temperature", dict(temperature=0.0)),
    (ValueError, "temperature", dict(temperature=float("inf"))),
    (TypeError, "class_weight", dict(class_weight=[1.0, 2.0])),
    (TypeError, "class_weight", dict(class_weight=torch.ones(5, dtype=torch.long))),
    (ValueError, "class_weight", dict(class_weight=torch.ones(5, 2))),
    (TypeError, "class_weight", dict(class_weight=torch.ones(5).to_sparse())),
    (ValueError, "class_weight", dict(class_weight=torch.ones(5, device="meta"))),
    (TypeError, "precise", dict(precise=1)),
    (TypeError, "vocab_parallel", dict(vocab_parallel=(0, 10))),
    (ValueError, "backward_mode", dict(backward_mode="cublas")),
    (TypeError, "workspace_mb", dict(workspace_mb="256")),
    (ValueError, "workspace_mb", dict(workspace_mb=0)),
    (ValueError, "workspace_mb", dict(workspace_mb=float("inf"))),
    (TypeError, "sync_free", dict(sync_free=1)),
]


@pytest.mark.parametrize("exc, name, kwargs", BAD_OPTIONS, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_OPTIONS)])
def test_bad_option_raises_naming_the_field(exc, name, kwargs):
    with pytest.raises(exc, match=rf"^{name}\b"):
        LossOptions(**kwargs)
    with pytest.raises(exc, match=rf"^{name}\b"):
        LossOptions().replace(**kwargs)  # a copy is checked like a new object
    with pytest.raises(exc, match=rf"^{name}\b"):
        dft_ops.LinearCrossEntropy(**kwargs)


def test_frozen_replace_from_dict_check():
    opts = LossOptions(objective="ce", reduction="sum")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.reduction = "none"
    other = opts.replace(shift=True)
    assert other.shift == 1 and opts.shift == 0 and other.objective is opts.objective
    assert opts.replace() is opts
    # what patch() will call with its options dict
    built = LossOptions.from_dict({"objective": "chord", "ignore_index": 5, "backend": "torch"})
    assert isinstance(built.objective, o.Chord) and built.ignore_index == 5 and built.backend == "torch"
    with pytest.raises(TypeError, match=r"^not_an_option: not a loss option"):
        LossOptions.from_dict({"not_an_option": 1})
    with pytest.raises(TypeError, match=r"^not_an_option\b"):
        opts.replace(not_an_option=1)
    assert LossOptions.check("shift", True) == 1
    with pytest.raises(ValueError, match="^reduction"):
        LossOptions.check("reduction", "avg")
    assert set(opts.as_dict()) == set(LossOptions.names())


def test_signature_shows_the_defaults():
    params = inspect.signature(dft_ops.linear_cross_entropy).parameters
    shown = {name: repr(params[name].default) for name in LossOptions.names()}
    assert shown == {"objective": "'ce'", "ignore_index": "-100", "reduction": "'mean'", "softcap": "None",
                     "shift": "False", "return_stats": "False", "backend": "'auto'", "filter_eps": "None",
                     "label_smoothing": "0.0", "z_loss": "0.0", "temperature": "None", "class_weight": "None",
                     "precise": "False", "vocab_parallel": "None",
                     "backward_mode": "'auto'", "workspace_mb": "None", "sync_free": "False"}
    assert params["options"].default is None
    module_params = inspect.signature(dft_ops.LinearCrossEntropy).parameters
    assert set(LossOptions.names()) | {"options"} == set(module_params)


def test_functional_options_and_keyword_overrides(device):
    hidden, weight, labels, bias = make_inputs((2, 9), 16, 40, torch.float32, device, bias=True, scale=3.0)
    by_keywords = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, objective="dft", shift=True,
                                               softcap=4.0, reduction="sum")
    opts = LossOptions(objective="dft", shift=True, softcap=4.0, reduction="sum")
    by_options = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, options=opts)
    assert torch.equal(by_keywords, by_options)
    # an explicit keyword overrides the field (here back to the defaults' values)
    overridden = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, options=opts, objective="ce",
                                              reduction="mean")
    want = dft_ops.linear_cross_entropy(hidden, weight, labels, bias=bias, shift=True, softcap=4.0)
    assert torch.equal(overridden, want) and not torch.allclose(overridden, by_options)


def test_module_holds_one_options_object(device):
    hidden, weight, labels, _ = make_inputs((2, 7), 12, 30, torch.float32, device)
    opts = LossOptions(objective="ce", shift=2, reduction="none")
    module = dft_ops.LinearCrossEntropy(options=opts)
    assert module.options is opts
    assert "shift=2" in repr(module) and "reduction='none'" in repr(module)
    out = module(hidden, weight, labels)
    assert out.shape == (2, 5)
    assert torch.equal(out, dft_ops.linear_cross_entropy(hidden, weight, labels, options=opts))
    assert dft_ops.LinearCrossEntropy(options=opts, reduction="sum").options == opts.replace(reduction="sum")
    assert dft_ops.LinearCrossEntropy("ce", shift=True).options.shift == 1
    with pytest.raises(TypeError, match="^options"):
        dft_ops.LinearCrossEntropy(options={"objective": "ce"})


# ------------------------------------------------------------------------------------------------ TokenLayout


def test_layout_shift_mask_compaction_scatter():
    labels = torch.tensor([[5, 1, -100, 7, 2, 9], [3, -100, -100, 4, 0, 8]])
    layout = TokenLayout(labels, shift=2)
    assert layout.shape == (2, 6) and layout.loss_shape == (2, 4) and layout.n_positions == 12
    # position t predicts labels[..., t + 2]; the last two positions of each row predict nothing
    assert layout.targets.tolist() == [-100, 7, 2, 9, -100, -100, -100, 4, 0, 8, -100, -100]
    assert torch.equal(layout.mask, labels[:, 2:] != -100)
    assert layout.compact(10) == []
    assert layout.n_computed == 6
    assert layout.rows.tolist() == [1, 2, 3, 7, 8, 9]
    assert layout.row_targets.tolist() == [7, 2, 9, 4, 0, 8] and layout.row_targets.is_contiguous()
    values = torch.arange(1.0, 7.0)
    scattered = layout.scatter(values)
    assert scattered.tolist() == [0, 1, 2, 3, 0, 0, 0, 4, 5, 6, 0, 0]
    assert layout.to_loss_positions(scattered).tolist() == [[0, 1, 2, 3], [0, 4, 5, 6]]
    # the per-token input of the loss positions, aligned with the rows
    per_token = torch.tensor([[10.0, 11, 12, 13], [20, 21, 22, 23]])
    assert layout.align(per_token).tolist() == [11, 12, 13, 21, 22, 23]
    with pytest.raises(AssertionError):  # the door checked the shape (tests/test_objectives.py)
        layout.align(torch.zeros(2, 6))


def test_layout_no_ignored_tokens_computes_every_row():
    labels = torch.randint(0, 9, (3, 4))
    layout = TokenLayout(labels)
    assert layout.compact(9, torch.tensor(17)) == [17.0]
    assert layout.rows is None and torch.equal(layout.row_targets, labels.reshape(-1))
    with pytest.raises(ValueError, match=r"^labels: 1 value\(s\) outside \[0, 5\)"):
        TokenLayout(torch.tensor([[1, 2, 7]])).compact(5)


def test_layout_shift_past_the_sequence_leaves_no_loss_position():
    layout = TokenLayout(torch.randint(0, 9, (2, 3)), shift=5)
    assert layout.loss_shape == (2, 0) and layout.mask.shape == (2, 0)
    layout.compact(9)
    assert layout.n_computed == 0 and layout.rows.numel() == 0


def test_layout_reads_strided_and_expanded_labels():
    pairs = torch.randint(0, 50, (9, 2))
    for labels, shift in ((pairs[:, 0], 0), (torch.randint(0, 50, (2, 16))[:, ::2], 1),
                          (torch.tensor([3]).expand(7), 0), (pairs.T, 1)):
        assert not labels.is_contiguous()
        layout = TokenLayout(labels, shift=shift, ignore_index=4)
        want = labels.contiguous()
        if shift:
            want = torch.cat([want[..., shift:], torch.full_like(want[..., :shift], 4)], dim=-1)
        assert layout.targets.is_contiguous() and torch.equal(layout.targets, want.reshape(-1))


def test_layout_segments_follow_rows_and_position_ids():
    labels = torch.tensor([[1, 2, -100, 3, 4, 5], [6, 7, 8, 9, 1, 2]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    layout = TokenLayout(labels, position_ids=position_ids[:, :].T.contiguous().T)
    layout.compact(10)
    # documents: [1 2 -] [3 4] [5] | [6 .. 2]; the ignored position drops out, ids renumbered
    assert layout.segments().tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 3]


def test_layout_inputs_are_checked_at_the_door():
    """One validation per input: the functional API names the argument; TokenLayout below it asserts."""
    labels = torch.randint(0, 9, (2, 5))
    hidden, weight = torch.randn(2, 5, 4), torch.randn(9, 4)

    def call(labels=labels, **kw):
        return dft_ops.linear_cross_entropy(hidden if labels.ndim == 2 else hidden[0], weight, labels, **kw)

    with pytest.raises(ValueError, match="^shift"):
        call(shift=-1)
    with pytest.raises(ValueError, match="^shift"):
        call(labels[0], shift=1)
    with pytest.raises(ValueError, match="^ignore_index"):
        call(ignore_index=2**64)
    with pytest.raises(TypeError, match="^labels"):
        call(labels.float())
    with pytest.raises(ValueError, match="^position_ids"):
        call(position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(AssertionError):
        TokenLayout(labels[0], shift=1)
    with pytest.raises(RuntimeError, match="compact"):
        TokenLayout(labels).scatter(torch.zeros(10))


@pytest.mark.parametrize("n", [0, 1, 37])
def test_positions_of_true_matches_nonzero(n):
    for p in (0.0, 0.3, 1.0):
        mask = torch.rand(n) < p
        assert torch.equal(_positions_of_true(mask, int(mask.sum())), mask.nonzero().squeeze(1))


def test_recorder_uses_the_stats_mask(device):
    hidden, weight, labels, _ = make_inputs((3, 11), 16, 40, torch.float32, device, scale=4.0)
    _, stats = dft_ops.linear_cross_entropy(hidden, weight, labels, shift=True, return_stats=True)
    implicit, explicit = dft_ops.TokenStatsRecorder(), dft_ops.TokenStatsRecorder()
    implicit.record(stats)
    explicit.record(stats, labels[..., 1:] != -100)
    got, want = implicit.collect(), explicit.collect()
    assert got == want and got["token_count"] == int((labels[..., 1:] != -100).sum())
    with pytest.raises(ValueError, match="^mask"):
        implicit.record(dft_ops.TokenStats(stats.logprob, stats.entropy, stats.is_top1))


def test_options_built_from_the_same_names_are_equal():
    assert LossOptions() == LossOptions(objective="ce") and hash(LossOptions()) == hash(LossOptions(objective="ce"))
    assert LossOptions(objective="dft") != LossOptions()
    assert LossOptions(objective=o.Power(2)) == LossOptions(objective=o.Power(2.0))
    assert LossOptions(objective=o.Power(2)) != LossOptions(objective=o.Power(3))
    assert o.PSFT() == o.PSFT(clip_low=0.2) != o.PSFT(clip_high=0.5)  # settings only: no tensor to compare
    assert LossOptions(objective=o.ASFT(0.1)) == LossOptions(objective=o.ASFT(0.1, "forward", "dft"))
    digests = LossOptions(label_smoothing=0.1).digests()
    assert digests == LossOptions(label_smoothing=0.1).digests() and "vocab_parallel" not in digests
    assert digests["label_smoothing"] != LossOptions().digests()["label_smoothing"]
    assert o.Threshold("dft", min_p=0.1) != o.Threshold("ce", min_p=0.1)

