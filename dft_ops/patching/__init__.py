"""``dft_ops.patch``: compute the training loss of any Hugging Face causal LM with dft-ops.

One generic patch, no per-family code. Three parts:

- :mod:`.install` - ``patch`` / ``unpatch``, the patch options and the patched
  ``forward``, which sends training calls with labels to the fused forward and
  everything else (eval, ``generate()``) to the model's own;
- :mod:`.fused_call` - one fused forward: the model's own forward runs, and the
  loss is computed *inside the output head's forward*, so engines that gather
  and reduce the head through module hooks (FSDP2, DeepSpeed ZeRO-3) do so as
  for any layer; no logits are built;
- :mod:`.state` - the live patch of a model (:class:`PatchState`) and the causal LM it targets;
- :mod:`.reference` - ASFT's reference model or Distill's teacher (a frozen causal LM, or a PEFT
  model's adapters disabled): its final hidden states per call, no logits;
- :mod:`.probe` - at patch time, measures what the forward does between head
  and loss (logit scale, soft-cap) with stand-in modules, bypassing every hook,
  and refuses what it cannot reproduce exactly.

:mod:`.protocols` lets trainers' own per-token call protocols (TRL's fused
head, in :mod:`dft_ops.integrations.trl`) be answered or refused, never
silently served by another objective.
"""

from .head import PatchError
from .install import patch, unpatch
from .state import PatchState, is_patched, patch_state
from .probe import HeadTransform, probe_head_transform
from .reference import ADAPTERS_DISABLED

__all__ = ["patch", "unpatch", "is_patched", "patch_state", "PatchError", "PatchState", "HeadTransform",
           "probe_head_transform", "ADAPTERS_DISABLED"]
