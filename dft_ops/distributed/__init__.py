"""Distributed inputs of the loss: vocabulary (tensor) parallelism and DTensor inputs.

- :mod:`.vocab_parallel` - the option :class:`VocabParallel` (this rank's rows of a head split over a
  process group) and :func:`check_group`, the one collective that checks a call across the group;
- :mod:`.dtensor_inputs` - DTensor arguments turned into local tensors and, for a ``Shard(0)`` head,
  into the option.

The backend wrapper that makes both passes collectives is :mod:`dft_ops.backends.sharded`.
"""

from .dtensor_inputs import LocalInputs, is_dtensor, like_linear_output, local, localize, replicated_local
from .vocab_parallel import VocabParallel, check_group, checksum

__all__ = ["VocabParallel", "check_group", "checksum", "LocalInputs", "localize", "replicated_local", "local",
           "is_dtensor", "like_linear_output"]
