"""Importing this module switches verl's fused kernel to dft-ops (:func:`dft_ops.integrations.verl.install`).

For verl's hooks that import a module by name in every worker process:
``actor_rollout_ref.model.external_lib=dft_ops.integrations.verl_patch`` or
``VERL_USE_EXTERNAL_MODULES=dft_ops.integrations.verl_patch``.
"""

from .verl import install

PREVIOUS = install()
