"""Bad input raises a TypeError / ValueError naming the argument, before any kernel runs."""

import pytest
import torch

import dft_ops

D, V = 12, 30


def good(device="cpu"):
    return dict(
        hidden=torch.randn(2, 5, D, device=device),
        weight=torch.randn(V, D, device=device),
        labels=torch.randint(0, V, (2, 5), device=device),
    )


def call(**override):
    kwargs = good()
    kwargs.update(override)
    args = [kwargs.pop(k) for k in ("hidden", "weight", "labels")]
    return dft_ops.linear_cross_entropy(*args, **kwargs)


CASES = [
    # (exception, message fragment, overrides)
    (ValueError, "labels", dict(labels=torch.full((2, 5), V))),
    (ValueError, "labels", dict(labels=torch.full((2, 5), -3))),
    (ValueError, "labels", dict(labels=torch.randint(0, V, (2, 4)))),
    (TypeError, "labels", dict(labels=torch.rand(2, 5))),
    (TypeError, "labels", dict(labels=torch.ones(2, 5, dtype=torch.bool))),
    (TypeError, "labels", dict(labels=[[1, 2]])),
    (ValueError, "hidden", dict(hidden=torch.randn(D))),
    (TypeError, "hidden", dict(hidden=torch.randn(2, 5, D, dtype=torch.float64))),
    (TypeError, "hidden", dict(hidden=torch.randint(0, 3, (2, 5, D)))),
    (ValueError, "weight", dict(weight=torch.randn(V, D + 1))),
    (ValueError, "weight", dict(weight=torch.randn(V))),
    (ValueError, "weight", dict(weight=torch.randn(0, D))),
    # mixed float dtypes are fine (products in the 16-bit one), but bf16 with fp16 has no common precision
    # (the bias is added in fp32: any float dtype goes)
    (TypeError, "weight", dict(hidden=torch.randn(2, 5, D, dtype=torch.float16),
                               weight=torch.randn(V, D, dtype=torch.bfloat16))),
    (TypeError, "weight", dict(weight=torch.randn(V, D, dtype=torch.float64))),
    (ValueError, "bias", dict(bias=torch.randn(V + 1))),
    (TypeError, "bias", dict(bias=torch.randn(V, dtype=torch.float64))),
    (TypeError, "bias", dict(bias=3.0)),
    (ValueError, "weight", dict(weight=torch.randn(V, D, device="meta"))),
    # meta and sparse inputs: a clear error, not an internal one
    (ValueError, "hidden", dict(hidden=torch.randn(2, 5, D, device="meta"), weight=torch.randn(V, D, device="meta"),
                                labels=torch.randint(0, V, (2, 5), device="meta"))),
    (TypeError, "hidden", dict(hidden=torch.randn(2, 5, D).to_sparse())),
    (TypeError, "weight", dict(weight=torch.randn(V, D).to_sparse())),
    (TypeError, "labels", dict(labels=torch.randint(0, V, (2, 5)).to_sparse())),
    (TypeError, "bias", dict(bias=torch.randn(V).to_sparse())),
    (TypeError, "position_ids", dict(position_ids=torch.zeros(2, 5, dtype=torch.long).to_sparse())),
    (TypeError, "num_items_in_batch", dict(num_items_in_batch=torch.tensor([7.0]).to_sparse())),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=torch.tensor(7.0, device="meta"))),
    # unsigned labels past int64 would wrap (2**64 - 100 into ignore_index -100)
    (TypeError, "labels", dict(labels=torch.full((2, 5), 2**64 - 100, dtype=torch.uint64))),
    (ValueError, "objective", dict(objective="dpo")),
    (TypeError, "objective", dict(objective=3)),
    (ValueError, "reduction", dict(reduction="avg")),
    (ValueError, "softcap", dict(softcap=0.0)),
    (ValueError, "softcap", dict(softcap=-2.0)),
    (ValueError, "softcap", dict(softcap=float("inf"))),
    (TypeError, "softcap", dict(softcap="30")),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=0)),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=torch.tensor(-4))),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=torch.tensor([3, 4]))),
    (TypeError, "num_items_in_batch", dict(num_items_in_batch="8")),
    (TypeError, "num_items_in_batch", dict(num_items_in_batch=True)),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=float("inf"))),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=float("nan"))),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=10**400)),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=-2.5)),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=torch.tensor(float("inf")))),
    (ValueError, "num_items_in_batch", dict(num_items_in_batch=torch.tensor(0))),
    (TypeError, "num_items_in_batch", dict(num_items_in_batch=torch.tensor(True))),
    (TypeError, "num_items_in_batch", dict(num_items_in_batch=torch.tensor(8 + 0j))),
    (TypeError, "num_items_in_batch", dict(num_items_in_batch=8 + 0j)),
    (ValueError, "shift", dict(hidden=torch.randn(5, D), labels=torch.randint(0, V, (5,)), shift=True)),
    (ValueError, "shift", dict(hidden=torch.randn(5, D), labels=torch.randint(0, V, (5,)), shift=2)),
    (TypeError, "shift", dict(shift="no")),
    (TypeError, "shift", dict(shift=[0])),
    (TypeError, "shift", dict(shift=1.0)),
    (TypeError, "shift", dict(shift=None)),
    (ValueError, "shift", dict(shift=-1)),
    (ValueError, "backend", dict(backend="cuda")),
    (TypeError, "ignore_index", dict(ignore_index=-100.0)),
    (TypeError, "ignore_index", dict(ignore_index=True)),
    (ValueError, "ignore_index", dict(ignore_index=2**70)),
    (ValueError, "ignore_index", dict(ignore_index=-(2**63) - 1)),
    (TypeError, "options", dict(options={"objective": "ce"})),
    (TypeError, "return_stats", dict(options=dft_ops.LossOptions(), return_stats=1)),
    (TypeError, "return_stats", dict(return_stats="yes")),
    (ValueError, "filter_eps", dict(filter_eps=2.0)),
    (ValueError, "position_ids", dict(position_ids=torch.zeros(2, 4, dtype=torch.long))),
    (TypeError, "position_ids", dict(position_ids=torch.zeros(2, 5))),
    (ValueError, "position_ids", dict(position_ids=torch.zeros(2, 5, dtype=torch.long, device="meta"))),
    # class_weight: its length, device and values are checked per call, with the labels' one device read
    (ValueError, "class_weight", dict(class_weight=torch.rand(V + 1))),
    (ValueError, "class_weight", dict(class_weight=torch.rand(V) - 2.0)),
    (ValueError, "class_weight", dict(class_weight=torch.rand(V).index_fill_(0, torch.tensor([3]), float("nan")))),
    (ValueError, "class_weight", dict(class_weight=torch.rand(V).index_fill_(0, torch.tensor([7]), float("inf")),
                                      reduction="sum")),
    (ValueError, "class_weight", dict(class_weight=torch.rand(V, device="meta"))),
    (TypeError, "class_weight", dict(class_weight=torch.randint(1, 3, (V,)))),
    (ValueError, "label_smoothing", dict(label_smoothing=1.0)),
    (ValueError, "z_loss", dict(z_loss=-1.0)),
    (ValueError, "temperature", dict(temperature=0.0)),
    (TypeError, "precise", dict(precise="yes")),
]


@pytest.mark.parametrize("exc, name, override", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_raises_naming_the_argument(exc, name, override):
    with pytest.raises(exc, match=rf"^{name}\b"):
        call(**override)


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    from dft_ops import backends

    monkeypatch.setattr(backends, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="^backend"):
        call(backend="triton")


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="^reduction"):
        dft_ops.LinearCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="^objective"):
        dft_ops.LinearCrossEntropy("nope")
    with pytest.raises(ValueError, match="^softcap"):
        dft_ops.LinearCrossEntropy(softcap=-1.0)


def test_ignore_index_outside_vocab_is_fine_and_good_input_passes():
    kwargs = good()
    kwargs["labels"][0, 0] = 12345
    out = dft_ops.linear_cross_entropy(kwargs["hidden"], kwargs["weight"], kwargs["labels"], ignore_index=12345)
    assert torch.isfinite(out)
