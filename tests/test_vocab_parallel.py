"""Vocabulary parallelism: the head's rows split over ranks, the loss of the whole vocabulary.

In this process: the merge of per-slice statistics (the algebra the ranks'
all-gather feeds) against the whole vocabulary on both backends, and the
option's checks. In a spawned two-rank job (gloo on CPU,
tests/vocab_parallel_worker.py): the functional API with the explicit option on
both backends, one-pass (chunks of 8 tokens, "auto") and two passes (CE, DFT, CHORD, PSFT's per-token input, a sequence objective;
softcap, bias, ignored tokens, shift, reduction "none" with an upstream gradient,
TokenStats, uneven, reversed and empty slices, bf16, caller-side sequence
parallelism), DTensor heads (Shard(0), Replicate, sequence-sharded hidden
states), and every refusal. Each exact case compares the loss, TokenStats and
every gathered gradient with the loss over the whole vocabulary in one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dft_ops
from dft_ops import VocabParallel
from dft_ops.backends import select_backend
from dft_ops.backends.sharded import ShardedBackend, merge_partials, shard_partials
from helpers import forward, make_inputs, rel_err
from rank_harness import run_ranks

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}  # bf16: d(hidden) summed over ranks after each rank's rounding

EXACT = [f"{backend}-{case}" for backend in ("torch", "triton")
         for case in ("ce", "dft-bias-softcap-shift", "chord-none-upstream-stats", "psft-per-token-input",
                      "sequence-dft-packed", "dft-empty-slice", "dft-peer-options-stats",
                      "dft-bias-softcap-shift-two-pass", "dft-empty-slice-two-pass")] + [
    "torch-dft-reversed-slices", "torch-dft-all-ignored", "torch-dft-bf16", "torch-explicit-sequence-parallel",
    "dtensor-shard0", "dtensor-shard0-replicated-hidden", "dtensor-shard0-sequence-parallel",
    "dtensor-replicate", "group-of-one"]
REFUSED = ["dtensor-refused-shard1-weight", "dtensor-refused-plain-bias", "dtensor-refused-with-option",
           "dtensor-refused-hidden-features", "refused-overlap", "refused-gap", "refused-weight-rows",
           "refused-labels-differ", "refused-hidden-differs", "refused-vocab-size", "refused-label-outside-vocabulary",
           "refused-options-differ", "refused-class-weight-differs", "refused-invalid-on-one-rank",
           "refused-bad-option-on-one-rank", "refused-fsdp-like-shard", "refused-fsdp2-head-outside-its-forward"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    return run_ranks(WORKER, tmp_path_factory.mktemp("vocab_parallel") / "results.json", EXACT + REFUSED)


@pytest.mark.slow
@pytest.mark.parametrize("case", EXACT)
def test_equals_the_whole_vocabulary(results, case):
    result = results[case]
    assert "error" not in result, result["error"]
    errors = result["errors"]
    if case == "group-of-one":
        assert errors["loss"] == 0.0 and errors["weight"] == 0.0, errors  # one rank: the very same computation
    assert errors, result
    tol = TOLERANCE["bf16" if "bf16" in case else "fp32"]
    for name, err in errors.items():
        limit = 0 if name.endswith("_mismatches") else tol
        assert err <= limit, f"{name}: {err:.2e} > {limit} ({errors})"


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSED)
def test_refused_on_every_rank(results, case):
    result = results[case]
    assert "error" not in result, result["error"]
    assert "raised" in result, result


# ------------------------------------------------------------------------------------------------ in process


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_stats", [False, True])
def test_merged_slices_equal_the_whole_vocabulary(backend, with_stats, device):
    """Each slice's statistics (targets shifted by its start), merged, are the whole vocabulary's: lse, label logit,
    entropy, max, argmax, smoothing sum with class weights. One slice is empty, one masked to -inf by its bias."""
    V, bounds = 150, [(0, 40), (40, 40), (40, 97), (97, 150)]
    hidden, weight, labels, bias = make_inputs((23,), 32, V, torch.float32, device, bias=True, ignore_frac=0,
                                               scale=3.0)
    bias[97:] = float("-inf")  # a slice that contributes no probability at all
    class_weight = torch.rand(V, device=device) + 0.5
    module = select_backend(dft_ops.LossOptions(backend=backend), hidden.device)
    options = dict(with_stats=with_stats, smoothing=True, softcap=8.0)
    whole = forward(module, hidden, weight, bias, labels, class_weight=class_weight, **options)
    parts = []
    for start, stop in bounds:
        if stop == start:
            continue  # what ShardedBackend sends for an empty slice is tested in the spawned job
        stats = forward(module, hidden, weight[start:stop], bias[start:stop], labels - start,
                        class_weight=class_weight[start:stop], **options)
        parts.append(shard_partials(stats, start, with_stats=with_stats, smoothing=True))
    merged = merge_partials(torch.stack(parts), with_stats=with_stats, smoothing=True)
    for name in ("lse", "target_logit", "smooth_sum") + (("entropy", "max_logit") if with_stats else ()):
        got, want = getattr(merged, name), getattr(whole, name)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert rel_err(got, want) < 1e-6, (name, rel_err(got, want))
    if with_stats:
        assert torch.equal(merged.argmax, whole.argmax)
    else:
        assert merged.entropy is None and merged.argmax is None


def test_option_checks():
    assert VocabParallel(0, 5).rows == 5 and VocabParallel(3, 3).rows == 0
    for exc, pattern, kwargs in [
        (TypeError, "^start: expected an int", dict(start=1.0, stop=3)),
        (TypeError, "^stop: expected an int", dict(start=0, stop=True)),
        (ValueError, "^start: expected 0 <= start <= stop", dict(start=4, stop=3)),
        (ValueError, "^start: expected 0 <= start <= stop", dict(start=-1, stop=3)),
        (ValueError, "^vocab_size: 2 is smaller than stop=3", dict(start=0, stop=3, vocab_size=2)),
        (TypeError, "^reduce_hidden_grad: expected a bool", dict(start=0, stop=3, reduce_hidden_grad=1)),
        (TypeError, "^group: expected a torch.distributed.ProcessGroup", dict(start=0, stop=3, group="tp")),
    ]:
        with pytest.raises(exc, match=pattern):
            VocabParallel(**kwargs)
    with pytest.raises(TypeError, match="^vocab_parallel: expected a dft_ops.VocabParallel or None"):
        dft_ops.LossOptions(vocab_parallel=(0, 3))
    assert dft_ops.LossOptions(vocab_parallel=VocabParallel(0, 3)).vocab_parallel.stop == 3


def test_without_a_process_group(device):
    hidden, weight, labels, _ = make_inputs((2, 5), 8, 20, torch.float32, device)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="^vocab_parallel: torch.distributed is not initialized"):
        dft_ops.linear_cross_entropy(hidden, weight[:10], labels, vocab_parallel=VocabParallel(0, 10))
    with pytest.raises(AssertionError, match=r"vocab_parallel: check_group fills in vocab_size"):
        ShardedBackend(dft_ops.backends.TorchBackend(), VocabParallel(0, 10))


def test_not_a_patch_option():
    with pytest.raises(ValueError, match="^vocab_parallel: is not a patch option"):
        dft_ops.patch(torch.nn.Linear(2, 2), vocab_parallel=VocabParallel(0, 2))


def test_plain_tensors_are_not_touched(device):
    """No DTensor among the inputs: the same objects reach the checks (no copy, no DTensor machinery)."""
    from dft_ops.distributed import localize

    hidden, weight, labels, bias = make_inputs((2, 5), 8, 20, torch.float32, device, bias=True)
    out = localize(hidden, weight, bias, labels, None)
    assert all(a is b for a, b in zip(out, (hidden, weight, bias, labels, None)))
