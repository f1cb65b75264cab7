"""Integrations with training frameworks, one module each; each imports its framework only when used.

- :mod:`.trl`: :func:`patch_sft_trainer` for TRL's ``SFTTrainer`` (1.15+), ``loss_type="nll"`` or ``"dft"``;
  :func:`patch_grpo_trainer` for ``GRPOTrainer`` (per-token log-probs and entropies, ``dft_ops.token_logprobs``);
- :mod:`.verl`: ``linear_cross_entropy``, a drop-in for verl's fused kernel (``install()`` switches verl to it);
- :mod:`.axolotl`: ``DFTOpsPlugin``, an axolotl plugin (imports axolotl and pydantic when imported);
- :mod:`.llamafactory`: ``install()`` / ``python -m dft_ops.integrations.llamafactory train cfg.yaml``
  for LLaMA-Factory's ``use_dft_loss`` / ``use_asft_loss``;
- :mod:`.ms_swift`: ``install()`` / ``--external_plugins`` for ms-swift's ``enable_dft_loss``.

Only the two TRL functions are imported here; the others are imported by their framework's
configuration (see docs/integrations.md).
"""

from .trl import patch_grpo_trainer, patch_sft_trainer

__all__ = ["patch_sft_trainer", "patch_grpo_trainer"]
