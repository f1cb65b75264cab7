"""verl: a drop-in for ``verl.utils.kernel.linear_cross_entropy``, the fused kernel of ``use_fused_kernels``.

:func:`linear_cross_entropy` has verl 0.9.1's signature and return values (docs/integrations.md, verl):
``(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None) ->
(logprobs, entropy)``, both float32; its backward takes the upstream gradients of both at once. It is
:func:`dft_ops.token_logprobs` with verl's conventions:

- ``hidden`` (..., D) and ``labels`` (any shape with as many elements as hidden has rows) are read
  flattened; ``logprobs`` is (N,) for ``reduction="none"``, else the 0-d sum / mean of the log-probs
  over all N tokens (verl's meaning: no masking); ``entropy`` is always (N,);
- every label is a class (verl has no ignore index): a label outside [0, V) is a ValueError
  (verl's kernel would return ``-lse`` for it);
- ``dist_process_group``: the vocabulary split over the group's ranks in equal slices (rank r holds
  rows [r V_local, (r+1) V_local) of V = world V_local; labels are global ids); d(hidden) is this
  rank's share, not all-reduced (verl's tensor-parallel region reduces it), as verl's kernel does.

Beyond verl's kernel: it runs on CPU (the PyTorch backend) and under the Triton interpreter; any hidden
size (verl asserts D % 128 == 0); a soft-cap-free head with a bias is not verl's interface and is not
taken here (use :func:`dft_ops.token_logprobs`); ``temperature`` may also be a tensor broadcastable to
the labels' shape (a temperature per sequence or per token, which verl's float cannot say).

Switching verl to it, in every process that runs the model (verl's workers are Ray actors):
``dft_ops.integrations.verl.install()``, or import :mod:`dft_ops.integrations.verl_patch` (which calls
it), e.g. by ``actor_rollout_ref.model.external_lib=dft_ops.integrations.verl_patch`` or the environment
variable ``VERL_USE_EXTERNAL_MODULES=dft_ops.integrations.verl_patch``; with
``actor_rollout_ref.model.use_fused_kernels=True`` and
``actor_rollout_ref.model.fused_kernel_options.impl_backend=triton`` the Hugging Face forwards verl patches
in then call this function (they import it from verl's module at each call).
"""

from __future__ import annotations

import numbers
import sys

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import VocabParallel
from ..token_logprobs import token_logprobs

REDUCTIONS = ("none", "sum", "mean")
# verl modules that bind the kernel's name at import (`from ... import linear_cross_entropy`): install()
# rebinds them when they are already imported
_BOUND_AT_IMPORT = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
_KERNEL_MODULE = "verl.utils.kernel.linear_cross_entropy"


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float | Tensor = 1.0,
                         reduction: str = "none", dist_process_group: dist.ProcessGroup | None = None
                         ) -> tuple[Tensor, Tensor]:
    """verl's ``linear_cross_entropy``: per-token log-probs and entropies of ``(hidden @ weight.T) / temperature``.

    Args:
        hidden: (..., D) float32 / bfloat16 / float16 hidden states, read as (N, D).
        weight: (V, D) head, or this rank's (V_local, D) rows under ``dist_process_group``.
        labels: integer labels, N of them in any shape (read flattened), each in [0, V).
        temperature: a positive float (verl's), or a float tensor broadcastable to ``labels``' shape.
        reduction: "none" (per-token log-probs), "sum" or "mean" (of the log-probs over all N tokens);
            the entropy is per token whatever the reduction.
        dist_process_group: a process group splitting the vocabulary in equal slices by rank, or None.

    Returns:
        (logprobs, entropy): float32; logprobs (N,) or 0-d, entropy (N,). Differentiable in hidden and
        weight (gradients in each input's dtype; under a process group d(hidden) is this rank's share).
    """
    if not isinstance(reduction, str) or reduction.lower() not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, Tensor) or hidden.ndim < 1:
        raise TypeError(f"hidden: expected a tensor (..., D), got {type(hidden).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected an integer tensor, got {type(labels).__name__}")
    D = hidden.shape[-1]
    rows = hidden.numel() // D if D else 0
    if labels.numel() != rows:
        raise ValueError(f"labels: {labels.numel()} labels for {rows} rows of hidden {tuple(hidden.shape)}; "
                         "verl's kernel reads one label per row of hidden (both flattened)")
    flat_labels = labels.reshape(-1)
    if isinstance(temperature, Tensor):
        try:
            temperature = torch.broadcast_to(temperature, labels.shape).reshape(-1)
        except RuntimeError:
            raise ValueError(f"temperature: shape {tuple(temperature.shape)} does not broadcast to the labels' "
                             f"shape {tuple(labels.shape)}") from None
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a positive float or a tensor, got {type(temperature).__name__}")
    vocab_parallel = None
    if dist_process_group is not None:
        if not isinstance(dist_process_group, dist.ProcessGroup):
            raise TypeError(f"dist_process_group: expected a torch.distributed.ProcessGroup or None, got "
                            f"{type(dist_process_group).__name__}")
        rank, world = dist.get_rank(dist_process_group), dist.get_world_size(dist_process_group)
        local = weight.shape[0]
        # verl's split: equal slices in rank order, labels global ids
        vocab_parallel = VocabParallel(rank * local, (rank + 1) * local, group=dist_process_group,
                                       reduce_hidden_grad=False, vocab_size=world * local)
    logprobs, entropy = token_logprobs(hidden.reshape(rows, D), weight, flat_labels, temperature=temperature,
                                       ignore_index=None, vocab_parallel=vocab_parallel)
    reduction = reduction.lower()
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


def install() -> dict:
    """Make verl call :func:`linear_cross_entropy`: rebinds ``verl.utils.kernel.linear_cross_entropy.
    linear_cross_entropy`` (which verl's Hugging Face forwards import at each call) and the name in verl's
    Megatron forwards already imported. Returns ``{module name: the function it held}`` (for
    :func:`uninstall`). Raises ImportError without verl."""
    import importlib

    module = importlib.import_module(_KERNEL_MODULE)
    previous = {}
    for name in (_KERNEL_MODULE, *_BOUND_AT_IMPORT):
        mod = sys.modules.get(name)
        held = getattr(mod, "linear_cross_entropy", None) if mod is not None else None
        if held is not None and held is not linear_cross_entropy:
            previous[name] = held
            mod.linear_cross_entropy = linear_cross_entropy
    assert module.linear_cross_entropy is linear_cross_entropy
    return previous


def uninstall(previous: dict) -> None:
    """Undo :func:`install` (its return value)."""
    for name, fn in previous.items():
        mod = sys.modules.get(name)
        if mod is not None:
            mod.linear_cross_entropy = fn
