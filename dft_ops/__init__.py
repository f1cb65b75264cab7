"""dft-ops: fused linear + cross-entropy / Dynamic Fine-Tuning losses that never materialize logits.

    loss = dft_ops.linear_cross_entropy(hidden, lm_head.weight, labels, shift=True)                    # cross-entropy
    loss = dft_ops.linear_cross_entropy(hidden, lm_head.weight, labels, objective="dft", shift=True)   # DFT
    model = dft_ops.patch(model)                      # a Hugging Face causal LM trains DFT (it says so, once)
    logp, entropy = dft_ops.token_logprobs(hidden, lm_head.weight, labels, shift=True)  # RL: both differentiable

The layers, top to bottom (docs/architecture.md): :mod:`dft_ops.patching` (Hugging Face models) and
:mod:`dft_ops.integrations` (one file per training framework) call the functional API
(:func:`linear_cross_entropy`, validating every argument once, with the options in one
:class:`LossOptions`, the tokens in one :class:`TokenLayout`), which runs the autograd Function on a
backend of :mod:`dft_ops.backends` (the Triton kernels in ``dft_ops.kernels``, or the chunked PyTorch
backend); :mod:`dft_ops.distributed` turns DTensor and vocabulary-parallel inputs into local ones;
objectives are rows of one table (:mod:`dft_ops.objectives`) used by both backends; :mod:`dft_ops.naive`
is the float64 oracle everything is tested against.
"""

from . import _logging, backends, callbacks, distributed, naive, objectives
from .backends.protocol import SecondHead
from .callbacks import TokenStatsRecorder
from .distributed import VocabParallel
from .functional import TokenStats, linear_cross_entropy
from .integrations.trl import patch_grpo_trainer, patch_sft_trainer
from .layout import TokenLayout
from .module import LinearCrossEntropy
from .options import LossOptions
from .patching import PatchError, patch, unpatch
from .token_logprobs import TokenLogprobs, token_logprobs
from . import _moved

__version__ = "0.1.0"
_logging.configure()

__all__ = ["linear_cross_entropy", "token_logprobs", "TokenLogprobs", "LinearCrossEntropy", "LossOptions", "SecondHead", "VocabParallel", "TokenLayout",
           "TokenStats", "objectives", "naive", "backends", "distributed", "patch", "unpatch", "PatchError",
           "patch_sft_trainer", "patch_grpo_trainer", "callbacks", "TokenStatsRecorder", "__version__"]


def __getattr__(name):
    # TokenStatsCallback is a transformers.TrainerCallback: transformers is imported only when it is
    # asked for (so it is not in __all__ either: `from dft_ops import *` must work without transformers)
    if name == "TokenStatsCallback":
        return callbacks.TokenStatsCallback
    if name in _moved.MODULES:
        return _moved.load(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
