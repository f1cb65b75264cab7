"""LLaMA-Factory: its ``use_dft_loss`` / ``use_asft_loss`` runs, computed by dft-ops without logits.

LLaMA-Factory (0.9.5) computes both objectives from the full logits: ``use_dft_loss`` sets the
trainer's ``compute_loss_func``, so ``transformers.Trainer.compute_loss`` pops the labels and the
model builds its logits (a fused head never engages; ``dft_loss_func`` even returns the plain loss
when the logits are None); ``use_asft_loss`` also runs the reference model to its logits and
takes a full softmax of both.

With this module installed, a ``CustomSeq2SeqTrainer`` built for such a run instead has its model
patched by :func:`dft_ops.patch` (objective ``"dft"``, or ``ASFT(asft_alpha)`` with LLaMA-Factory's
KL direction, ``KL(ref || model)``, against its reference model), its ``compute_loss_func`` removed,
and the labels and ``num_items_in_batch`` passed to the model: the loss is ``sum / num_items_in_batch``
as LLaMA-Factory's ``dft_loss_func`` computes it, gradient accumulation included. Every other run
(``use_dft_loss`` off) is left alone.

Adopt it in one line, either way:

- command line: ``python -m dft_ops.integrations.llamafactory train config.yaml`` in place of
  ``llamafactory-cli train config.yaml`` (one process; for several GPUs
  ``torchrun --nproc_per_node N -m dft_ops.integrations.llamafactory train config.yaml``);
- Python: ``dft_ops.integrations.llamafactory.install()`` before ``llamafactory.train.tuner.run_exp()``.

Differences from LLaMA-Factory's own path, by design: evaluation losses are the model's own
cross-entropy (dft-ops patches the training forward only); ASFT under gradient accumulation is the
mean over the accumulated batch (LLaMA-Factory's ``asft_loss_func`` sums the micro-batches' means,
``gradient_accumulation_steps`` times larger); with LoRA and no ``ref_model`` the reference is the
model with its adapters disabled (LLaMA-Factory has no reference model then).

LLaMA-Factory is imported only by :func:`install` and the launcher.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import dft_ops

from dft_ops.integrations import _wrapped_trainer

__all__ = ["install", "uninstall", "is_installed", "main"]

_LOG = logging.getLogger("dft_ops.integrations.llamafactory")
_MARK = "__dft_ops_originals__"
_ACTIVE = "_dft_ops_objective"


def _trainer_class():
    try:
        from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
    except ImportError as exc:
        raise ImportError("dft_ops.integrations.llamafactory needs LLaMA-Factory: pip install llamafactory") from exc
    return CustomSeq2SeqTrainer


def _objective_and_reference(trainer):
    """(objective, reference) for the run's finetuning_args, or (None, None) when dft-ops has nothing to do."""
    args = trainer.finetuning_args
    if getattr(args, "use_dft_loss", False):
        return "dft", None
    if getattr(args, "use_asft_loss", False):
        # LLaMA-Factory's _kl_divergence is F.kl_div(log p, q): KL(q_ref || p), dft-ops' "forward" direction
        objective = dft_ops.objectives.ASFT(args.asft_alpha, direction="forward", base="dft")
        reference = getattr(trainer, "ref_model", None)
        if reference is None:
            model = trainer.accelerator.unwrap_model(trainer.model)
            if type(model).__module__.startswith("peft"):
                return objective, "adapters_disabled"
            raise ValueError("use_asft_loss: the trainer has no reference model (ref_model) and its model is not a "
                             "PEFT model whose adapters could be disabled; set ref_model in the config")
        return objective, trainer.accelerator.unwrap_model(reference)
    return None, None


def install(**loss_options) -> None:
    """Have every LLaMA-Factory SFT trainer built from now on compute DFT / ASFT with dft-ops.

    Args:
        **loss_options: extra :func:`dft_ops.patch` options (``backend``, ``filter_eps``,
            ``precise``, ...), applied to every run that uses ``use_dft_loss`` or ``use_asft_loss``.

    Calling it again replaces the options; :func:`uninstall` restores LLaMA-Factory's own path.

    Raises:
        ImportError when LLaMA-Factory is not installed; ValueError for options that
        :class:`dft_ops.LossOptions` refuses or that the run's objective sets (``objective``).
    """
    _wrapped_trainer.check_install_options(
        loss_options, "the LLaMA-Factory config (use_dft_loss / use_asft_loss, asft_alpha, ref_model)")
    _wrapped_trainer.wrap(_trainer_class(), _MARK, _wrapped_init, _wrapped_compute_loss, loss_options)


def uninstall() -> None:
    """Restore LLaMA-Factory's own loss path for trainers built from now on."""
    _wrapped_trainer.unwrap(_trainer_class(), _MARK)


def is_installed() -> bool:
    return _wrapped_trainer.is_wrapped(_trainer_class(), _MARK)


def _wrapped_init(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        objective, reference = _objective_and_reference(self)
        if objective is None:
            return
        options = type(self).__dict__.get(_MARK, {}).get("loss_options", {})
        if reference is None:
            dft_ops.patch(self.model, objective=objective, **options)
        else:
            dft_ops.patch(self.model, objective=objective, reference=reference, **options)
        # the model computes the loss from the labels: no compute_loss_func (it would pop them), and
        # num_items_in_batch goes to the model, so the loss is sum / num_items_in_batch over the
        # accumulated batch (LLaMA-Factory's dft_loss_func) and Trainer does not divide it again
        self.compute_loss_func = None
        self.model_accepts_loss_kwargs = True
        setattr(self, _ACTIVE, objective)
        _LOG.warning("dft-ops computes this run's training loss (%s) without logits",
                     objective if isinstance(objective, str) else f"ASFT(kl_coef={objective.kl_coef}, forward KL)")

    return __init__


def _wrapped_compute_loss(compute_loss):
    @functools.wraps(compute_loss)
    def _compute_loss(self, model, inputs, *args, **kwargs):
        if getattr(self, _ACTIVE, None) is None:
            return compute_loss(self, model, inputs, *args, **kwargs)
        # past LLaMA-Factory's ASFT branch (reference logits + asft_loss_func): transformers.Trainer's
        # compute_loss, whose model call the patched forward answers
        from transformers import Seq2SeqTrainer

        return Seq2SeqTrainer.compute_loss(self, model, inputs, *args, **kwargs)

    return _compute_loss


def _device_count() -> int:
    try:
        from llamafactory.extras.misc import get_device_count
    except ImportError:
        import torch

        return torch.cuda.device_count()
    return get_device_count()


def main(argv=None) -> None:
    """``python -m dft_ops.integrations.llamafactory train config.yaml [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        sys.exit("usage: python -m dft_ops.integrations.llamafactory train CONFIG.yaml [key=value ...]\n"
                 "  (llamafactory-cli train with dft-ops computing use_dft_loss / use_asft_loss; other "
                 "llamafactory-cli commands are unchanged: run them with llamafactory-cli)")
    under_torchrun = "LOCAL_RANK" in os.environ
    if not under_torchrun and _device_count() > 1:
        sys.exit("dft_ops.integrations.llamafactory: several devices: launch one process per device with\n"
                 "  torchrun --nproc_per_node N -m dft_ops.integrations.llamafactory train CONFIG.yaml\n"
                 "(llamafactory-cli's own torchrun launch would start processes without dft-ops)")
    install()
    from llamafactory.train.tuner import run_exp

    sys.argv = [sys.argv[0], *argv[1:]]  # run_exp reads the config path and overrides from sys.argv[1:]
    run_exp()


if __name__ == "__main__":
    main()
