"""What a drop-in for verl's fused kernel must match (issue 17): verl 0.9.1's interface, pinned.

Not a test of dft-ops: the facts docs/integrations.md states about ``verl.utils.kernel.linear_cross_entropy``,
checked against the real verl (``make test-verl`` builds its venv), so that a change in verl shows
here before a drop-in (``dft_ops.integrations.verl``, to come) is built against stale notes.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("verl", reason="verl is not installed here: `make test-verl` builds its venv "
                    "(.venv/frameworks/verl by default) and runs this file there")

import torch  # noqa: E402

kernel = pytest.importorskip("verl.utils.kernel.linear_cross_entropy")


def test_signature_and_autograd_shape():
    fn = kernel.linear_cross_entropy
    assert fn == kernel.LinearCrossEntropy.apply  # an autograd.Function's apply: positional or keyword
    params = list(inspect.signature(kernel.LinearCrossEntropy.forward).parameters.values())[1:]  # ctx dropped
    assert [(p.name, p.default) for p in params] == [
        ("hidden", inspect.Parameter.empty), ("weight", inspect.Parameter.empty), ("labels", inspect.Parameter.empty),
        ("temperature", 1.0), ("reduction", "none"), ("dist_process_group", None)]
    backward = list(inspect.signature(kernel.LinearCrossEntropy.backward).parameters)
    assert backward == ["ctx", "dlogprobs", "dentropy"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_the_triton_kernel_does_not_run_on_cpu():
    h, w = torch.randn(4, 128), torch.randn(256, 128)
    y = torch.randint(0, 256, (4,))
    with pytest.raises((RuntimeError, AssertionError)):
        kernel.linear_cross_entropy(h, w, y, 1.0, "none")


def test_reduction_names_and_the_torch_path_semantics():
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from verl.utils.kernel.kernels import get_entropy_reduction_enum_number

    assert [get_entropy_reduction_enum_number(r) for r in ("none", "sum", "mean")] == [0, 1, 2]
    with pytest.raises(ValueError):
        get_entropy_reduction_enum_number("batchmean")
    # verl's torch backend (impl_backend="torch", runs on CPU): log-probs and entropy of logits / temperature
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=g)
    w = torch.randn(40, 16, generator=g)
    y = torch.randint(0, 40, (2, 5), generator=g)
    logp, entropy = FusedLinearForPPO()(h, w, y, temperature=2.0)
    z = (h @ w.T) / 2.0
    ref = torch.log_softmax(z, -1)
    assert logp.dtype == torch.float32  # fp32 log-probs (entropy in the logits dtype)
    assert torch.allclose(logp, ref.gather(-1, y[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(entropy, -(ref.exp() * ref).sum(-1), atol=1e-5)
