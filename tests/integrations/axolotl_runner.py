"""One axolotl training run in this process (``python axolotl_runner.py CONFIG.yaml RESULT.pt``).

axolotl keeps its plugins and Liger's class patches for the life of a process, so the test runs each
configuration in a process of its own. The result file holds the logged losses, the first step's
gradients and the memory probe's numbers (framework_harness.TensorMemory).
"""

from __future__ import annotations

import sys

import torch
from axolotl.integrations.base import BasePlugin

import framework_harness as harness


class RecorderPlugin(BasePlugin):
    """Adds the harness's step recorder to the trainer (listed in the test's YAML ``plugins``)."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        harness.RECORDER = harness.StepRecorder.make(vocab=harness.VOCAB)
        harness.TRAINER = trainer
        return [harness.RECORDER]


def main(config: str, out: str) -> None:
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train

    do_train(load_cfg(config), TrainerCliArgs())
    recorder, trainer = harness.RECORDER, harness.TRAINER
    torch.save(dict(losses=harness.losses(recorder.log_history), grads=recorder.grads[0],
                    peak=recorder.memory.peak, vocab_wide=recorder.memory.largest_vocab_wide,
                    trainer=type(trainer).__name__), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
