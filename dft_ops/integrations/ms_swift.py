"""ms-swift: its ``enable_dft_loss`` runs computed by dft-ops, without logits.

ms-swift (4.6) computes DFT from the full logits: with ``enable_dft_loss`` its
``Seq2SeqTrainer.compute_loss`` pops the labels, the model builds its logits, and
``per_token_loss_func`` takes a float cross-entropy over them (it warns that Liger's fused loss
"will not take effect"). With this module installed, a ``Seq2SeqTrainer`` of such a run has its
model patched by :func:`dft_ops.patch` (objective ``"dft"``) and keeps the labels in the model
call, so the patched forward computes the loss fused; ms-swift's own reduction then applies
unchanged (``sum / num_items_in_batch`` over the accumulated batch). Runs without
``enable_dft_loss`` are left alone.

Adopt it with one argument, read by every process ``swift sft`` starts (torchrun included)::

    swift sft ... --enable_dft_loss true --external_plugins "$(python -m dft_ops.integrations.ms_swift)"

(``python -m dft_ops.integrations.ms_swift`` prints this file's path; ms-swift imports the files
listed in ``external_plugins`` and this one installs itself when imported that way). From Python:
``dft_ops.integrations.ms_swift.install()`` before ``swift.pipelines.sft_main(...)``.

What dft-ops does not take over (a ``ValueError`` at the first step, naming the argument):
``loss_scale`` weights, ``enable_channel_loss``, sequence parallelism, a custom ``loss_type``
(``compute_loss_func``) and label smoothing - each needs ms-swift's per-token losses from logits.
Token accuracy (``acc``) is not logged on these runs: it is computed from logits, which are not
built. Evaluation losses are the model's own cross-entropy (dft-ops patches the training forward).

ms-swift is imported only by :func:`install`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys

import dft_ops

from dft_ops.integrations import _wrapped_trainer  # absolute: ms-swift loads this file by its path

__all__ = ["install", "uninstall", "is_installed", "main"]

_LOG = logging.getLogger("dft_ops.integrations.ms_swift")
_MARK = "__dft_ops_originals__"
_ACTIVE = "_dft_ops_objective"


def _trainer_class():
    try:
        from swift.trainers.seq2seq_trainer import Seq2SeqTrainer
    except ImportError as exc:
        raise ImportError("dft_ops.integrations.ms_swift needs ms-swift: pip install ms-swift") from exc
    return Seq2SeqTrainer


def install(**loss_options) -> None:
    """Have every ms-swift SFT trainer built from now on compute ``enable_dft_loss`` with dft-ops.

    Args:
        **loss_options: extra :func:`dft_ops.patch` options (``backend``, ``filter_eps``,
            ``precise``, ...). Calling it again replaces them; :func:`uninstall` restores ms-swift's path.

    Raises:
        ImportError when ms-swift is not installed; ValueError for options that
        :class:`dft_ops.LossOptions` refuses, or ``objective`` / ``reduction`` (set by the run).
    """
    _wrapped_trainer.check_install_options(loss_options, "the ms-swift run (enable_dft_loss)")
    _wrapped_trainer.wrap(_trainer_class(), _MARK, _wrapped_init, _wrapped_compute_loss, loss_options)


def uninstall() -> None:
    """Restore ms-swift's own loss path for trainers built from now on."""
    _wrapped_trainer.unwrap(_trainer_class(), _MARK)


def is_installed() -> bool:
    return _wrapped_trainer.is_wrapped(_trainer_class(), _MARK)


def _refusal(trainer) -> str | None:
    args = trainer.args
    if getattr(trainer.template, "sequence_parallel_size", 1) > 1:
        return "sequence_parallel_size: ms-swift gathers per-token losses across ranks from logits"
    if getattr(args, "enable_channel_loss", False):
        return "enable_channel_loss: per-channel losses are computed from logits"
    if trainer.compute_loss_func is not None:
        return "loss_type: a custom loss function (compute_loss_func) takes the logits"
    if trainer.label_smoother is not None:
        return ("label_smoothing_factor: computed by ms-swift from logits; drop it, or pass label_smoothing= to "
                "dft_ops.integrations.ms_swift.install()")
    return None


def _wrapped_init(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not getattr(self.args, "enable_dft_loss", False):
            return
        reason = _refusal(self)
        if reason is not None:
            raise ValueError(f"{reason}; dft-ops computes enable_dft_loss only where the model's own labels "
                             "reach it (uninstall dft_ops.integrations.ms_swift to keep ms-swift's logits path)")
        options = type(self).__dict__.get(_MARK, {}).get("loss_options", {})
        dft_ops.patch(self.model, objective="dft", **options)
        setattr(self, _ACTIVE, "dft")
        _LOG.warning("dft-ops computes this run's training loss (dft) without logits")

    return __init__


def _wrapped_compute_loss(compute_loss):
    @functools.wraps(compute_loss)
    def _compute_loss(self, model, inputs, *args, **kwargs):
        if getattr(self, _ACTIVE, None) is None:
            return compute_loss(self, model, inputs, *args, **kwargs)
        if inputs.get("loss_scale") is not None:
            raise ValueError("loss_scale: this batch carries ms-swift loss_scale weights, which need its per-token "
                             "losses from logits; use --loss_scale default, or uninstall dft_ops.integrations.ms_swift")
        # enable_dft_loss off for this call only: ms-swift keeps the labels in the model call, the patched
        # forward computes DFT fused, and ms-swift reduces the model's loss as usual
        training_args = self.args
        training_args.enable_dft_loss = False
        try:
            return compute_loss(self, model, inputs, *args, **kwargs)
        finally:
            training_args.enable_dft_loss = True

    return _compute_loss


def main(argv=None) -> None:
    """``python -m dft_ops.integrations.ms_swift``: print this file's path, for ``--external_plugins``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv:
        sys.exit("usage: swift sft ... --enable_dft_loss true "
                 '--external_plugins "$(python -m dft_ops.integrations.ms_swift)"')
    print(importlib.import_module("dft_ops.integrations.ms_swift").__file__)


if __name__ == "__main__":
    main()
elif __name__ != "dft_ops.integrations.ms_swift":
    # imported by path, as one of ms-swift's external_plugins: install the canonical module's hook
    importlib.import_module("dft_ops.integrations.ms_swift").install()
