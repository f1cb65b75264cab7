"""dft-ops: fused linear + cross-entropy / Dynamic Fine-Tuning losses that never materialize logits.

    loss = dft_ops.linear_cross_entropy(hidden, lm_head.weight, labels, objective="dft", shift=True)

Options live in one validated object (:class:`LossOptions`), the token layout
(shift, ignored tokens, loss-position mask) in one class (:class:`TokenLayout`).
Data path: functional API -> autograd Function -> backend (Triton kernels in
``dft_ops.kernels``, or the chunked PyTorch backend) -> kernel; objectives are
rows of one table (:mod:`dft_ops.objectives`) used by both backends.
"""

from . import callbacks, naive, objectives, torch_backend
from .callbacks import TokenStatsRecorder
from .functional import TokenStats, linear_cross_entropy
from .layout import TokenLayout
from .module import LinearCrossEntropy
from .options import LossOptions
from .vocab_parallel import VocabParallel
from .integrations.trl import patch_sft_trainer
from .patching import PatchError, patch, unpatch

__version__ = "0.1.0"

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "LossOptions", "VocabParallel", "TokenLayout", "TokenStats", "objectives", "naive", "torch_backend",
           "patch", "unpatch", "PatchError", "patch_sft_trainer", "callbacks", "TokenStatsRecorder", "__version__"]


def __getattr__(name):
    # TokenStatsCallback is a transformers.TrainerCallback: transformers is imported only when it is
    # asked for (so it is not in __all__ either: `from dft_ops import *` must work without transformers)
    if name == "TokenStatsCallback":
        return callbacks.TokenStatsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
