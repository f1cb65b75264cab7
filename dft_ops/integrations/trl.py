"""TRL ``SFTTrainer``: have dft-ops compute the training loss, keeping TRL's metrics.

From TRL 1.15, ``SFTTrainer`` installs its own fused LM head and computes the
loss as ``model(**inputs, fused_lm_head=True)``, which bypasses a patched
``forward``'s ordinary training path. :func:`patch_sft_trainer` patches the
trainer's model so that the fused-head call itself is answered by dft-ops
(TRL's ``FusedCausalLMOutput`` protocol):

- ``log_probs`` = ``-(per-token loss of the objective)``, with its gradient:
  ``SFTTrainer.compute_loss`` with ``loss_type="nll"`` reduces it as
  ``sum(-log_probs) / num_tokens`` (``num_items_in_batch`` under gradient
  accumulation), which is exactly dft-ops' loss; for objective "ce" these are
  the true log-probabilities;
- ``entropy``, ``is_top1``, ``label_mask`` from dft-ops' per-token stats feed
  TRL's ``entropy`` and ``mean_token_accuracy`` metrics, without logits;
- ``aux_loss`` (MoE) is the model's own, added by TRL as usual.

A patch *not* set up this way never lets TRL's head train in its place: a
``fused_lm_head=True`` call that reaches the patched forward (the model patched
after the trainer was built), or TRL's head running above the patch (patched
before), raises :class:`dft_ops.PatchError` with the fix.

TRL ``GRPOTrainer`` asks the same fused head for true per-token log-probs and entropies, both with
their gradients (its policy loss, KL penalty and entropy bonus are elementwise on them):
:func:`patch_grpo_trainer` answers those calls with :func:`dft_ops.token_logprobs` (no logits, in any
chunk), for the policy and, with ``beta > 0``, the reference model.

TRL is imported only when a fused call is answered or a ``patch_*_trainer`` is called.
"""

from __future__ import annotations

from .. import patching
from ..patching import protocols

_KEYWORD = "fused_lm_head"


class FusedLMHead(protocols.CallerProtocol):
    """TRL's fused-head protocol: ``model(**inputs, fused_lm_head=True)`` -> ``FusedCausalLMOutput``."""

    name = "TRL fused_lm_head"

    def claims(self, kwargs: dict) -> bool:
        # also drops fused_lm_head=False: the model's own forward does not take it
        return bool(kwargs.pop(_KEYWORD, False))

    def output(self, model_output, call):
        """``log_probs`` holds ``-(per-token loss of the objective)``, with its gradient.

        SFTTrainer's "nll" reduction ``-sum(log_probs) / num_tokens`` is then
        exactly dft-ops' loss. For objective "ce" these are the log-probs.
        """
        from trl.trainer.utils import FusedCausalLMOutput

        return FusedCausalLMOutput(
            loss=model_output.get("loss"), log_probs=-(call.loss + call.link), entropy=call.stats.entropy,
            is_top1=call.stats.is_top1, label_mask=call.stats.mask,
            aux_loss=model_output.get("aux_loss"),
        )

    def refusal(self) -> str:
        return ("model: TRL asks this dft-ops-patched model for its per-token loss through its own fused head "
                "(fused_lm_head=True: SFTTrainer, GRPO, DPO, ...), which dft_ops.patch alone does not answer, so TRL's "
                "loss would train instead of the dft-ops objective. For SFTTrainer, build the trainer, then call "
                "dft_ops.patch_sft_trainer(trainer, objective=...) (in place of or after dft_ops.patch); for trainers "
                "that need true log-probabilities: GRPOTrainer, dft_ops.patch_grpo_trainer(trainer) (in place of "
                "dft_ops.patch); others (DPO, ...), call dft_ops.unpatch(model) first.")

    def wraps_forward(self, causal_lm) -> bool:
        # trl.trainer.utils.add_fused_lm_head installs a bound function taking `fused_lm_head`; functools.wraps
        # copies the model's name and signature onto it, so only its code tells
        code = getattr(getattr(causal_lm.__dict__.get("forward"), "__func__", None), "__code__", None)
        return code is not None and _KEYWORD in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]


FUSED_LM_HEAD = protocols.register(FusedLMHead())


class FusedLogProbs(FusedLMHead):
    """TRL's fused-head protocol answered with true log-probs and entropies (``dft_ops.token_logprobs``),
    each with its gradient: what ``GRPOTrainer`` reads (``log_probs``, ``entropy``, ``label_mask``).

    One instance per patched trainer (its settings), held by the patch state; it is not registered: the
    registered :data:`FUSED_LM_HEAD` refuses the keyword for every other patch.

    Args:
        fp32_head: the head's products in fp32 outside autocast (TRL's ``cast_lm_head_to_fp32``).
    """

    name = "TRL fused_lm_head (log-probs and entropies)"
    logprobs = True

    def __init__(self, fp32_head: bool = False):
        self.fp32_head = bool(fp32_head)

    def output(self, model_output, call):
        from trl.trainer.utils import FusedCausalLMOutput

        logprob, entropy = call.logprobs
        return FusedCausalLMOutput(loss=model_output.get("loss"), log_probs=logprob, entropy=entropy,
                                   label_mask=call.mask, aux_loss=model_output.get("aux_loss"))


_GRPO_OPTIONS = ("backend", "backward_mode", "workspace_mb", "precise")


def patch_grpo_trainer(trainer, **options):
    """Compute ``trainer``'s per-token log-probs and entropies with :func:`dft_ops.token_logprobs`.

    Call after constructing the ``trl.GRPOTrainer`` (1.15+; its constructor installs TRL's fused head, whose
    calls this answers in its place) and before ``trainer.train()``. The policy's calls (with their
    gradients: the policy loss, the KL penalty's policy side, the entropy bonus) and, with ``beta > 0``, a
    separate reference model's go through dft-ops' kernels: no logits are built, in any chunk. The
    trainer's sampling temperature, the model's soft-cap and logit scale, ``cast_lm_head_to_fp32`` and the
    completion mask (labels -100) are read from the trainer and the model. PEFT models with adapters
    anywhere but on the head are served as they are (the reference of a PEFT policy is the same model with
    its adapters disabled: the same patched forward).

    Args:
        trainer: a ``trl.GRPOTrainer``.
        **options: how dft-ops runs: ``backend``, ``backward_mode`` ("auto", "gemm", "fused"),
            ``workspace_mb``, ``precise``.

    Returns:
        ``trainer``.

    Raises:
        ImportError without TRL; TypeError for another trainer or option; :class:`dft_ops.PatchError`
        as :func:`dft_ops.patch` (e.g. an adapter on the head).
    """
    try:
        from trl import GRPOTrainer
    except ImportError as exc:
        raise ImportError("dft_ops.patch_grpo_trainer needs TRL: pip install 'dft-ops[trl]' (trl>=1.15)") from exc
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"trainer: expected a trl.GRPOTrainer, got {type(trainer).__name__}; SFTTrainer: "
                        "dft_ops.patch_sft_trainer")
    for name in options:
        if name not in _GRPO_OPTIONS:
            raise TypeError(f"{name}: not an option of patch_grpo_trainer (the per-token log-probs have no "
                            f"objective or loss option); expected one of {_GRPO_OPTIONS}")
    temperature = float(getattr(trainer, "temperature", 1.0))
    protocol = FusedLogProbs(fp32_head=getattr(trainer.args, "cast_lm_head_to_fp32", False))
    models = [trainer.model] + ([trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else [])
    for model in models:
        patching.patch(model, "ce", temperature=temperature, **options)
        patching.patch_state(model).protocol = protocol
    return trainer


def patch_sft_trainer(trainer, objective="dft", **loss_options):
    """Compute ``trainer``'s training (and eval) loss with dft-ops and ``objective``.

    Call after constructing the ``trl.SFTTrainer`` (its constructor installs
    TRL's fused head, which this one answers in its place) and before
    ``trainer.train()``.

    Args:
        trainer: a ``trl.SFTTrainer`` (1.15+). With ``args.loss_type="nll"``
            (the default) the objective is chosen here. With
            ``args.loss_type="dft"`` TRL's own DFT is kept, computed on
            dft-ops' exact log-probabilities: the fused head answers with
            objective "ce" (true log-probs, with their gradient) and TRL
            weights each token by its detached probability, so the loss is
            exactly TRL's ``loss_type="dft"``; ``objective`` must then be
            "dft" (the default).
        objective: "dft", "ce" or an instance from :mod:`dft_ops.objectives`.
        **loss_options: as for :func:`dft_ops.patch` (``ignore_index``,
            ``backend``, ``filter_eps``, ...), and ``reference=`` with
            ``objectives.ASFT`` (a frozen causal LM, or ``"adapters_disabled"``
            for a PEFT model). With ``class_weight`` the loss is divided by
            the token count (TRL's reduction), not by the sum of the labels'
            class weights as dft-ops' own mean is.

    Returns:
        ``trainer``.

    Raises:
        ImportError when TRL is not installed; TypeError for a trainer that is
        not an SFTTrainer; ValueError for SFTConfig options whose loss does not
        go through the fused head (``compute_loss_func``, label smoothing), for
        a ``loss_type`` other than "nll" / "dft", and for ``loss_type="dft"``
        with another objective or an option that changes the per-token
        log-probabilities TRL re-weights (label smoothing, z-loss, class
        weights, a temperature); :class:`dft_ops.PatchError` as :func:`dft_ops.patch`.
    """
    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise ImportError("dft_ops.patch_sft_trainer needs TRL: pip install 'dft-ops[trl]' (trl>=1.15)") from exc
    if not isinstance(trainer, SFTTrainer):
        raise TypeError(f"trainer: expected a trl.SFTTrainer, got {type(trainer).__name__}; for transformers.Trainer "
                        "use dft_ops.patch(model) before building the trainer")
    args = trainer.args
    loss_type = getattr(args, "loss_type", "nll")
    if loss_type == "dft":
        # TRL re-weights log_probs by exp(log_probs).detach(): answer with the true log-probs (objective "ce"),
        # so TRL's own DFT formula and reduction run on dft-ops' values, unchanged
        if not (isinstance(objective, str) and objective == "dft"):
            raise ValueError(
                f"objective: SFTConfig(loss_type='dft') already trains DFT (TRL weights dft-ops' log-probs); "
                f"objective={objective!r} would be re-weighted by it: leave objective='dft', or set "
                "loss_type='nll' to train another objective")
        changed = ([name for name in ("label_smoothing", "z_loss") if loss_options.get(name)]
                   + [name for name in ("class_weight", "temperature") if loss_options.get(name) is not None])
        if changed:
            raise ValueError(f"{changed[0]}: with SFTConfig(loss_type='dft') TRL re-weights the per-token "
                             f"log-probabilities, which {changed[0]} would alter; set loss_type='nll' and "
                             "objective='dft' to combine DFT with it")
        objective = "ce"
    elif loss_type != "nll":
        raise ValueError(
            f"trainer: SFTConfig(loss_type={loss_type!r}) would re-weight dft-ops' per-token loss; leave "
            "loss_type='nll' and choose the objective here (patch_sft_trainer(trainer, objective='dft'))"
        )
    if getattr(trainer, "compute_loss_func", None) is not None or getattr(args, "label_smoothing_factor", 0) > 0:
        raise ValueError("trainer: compute_loss_func / label_smoothing_factor compute the loss from full logits, "
                         "outside the fused head; remove them to have dft-ops compute the loss (label smoothing: "
                         "patch_sft_trainer(trainer, objective, label_smoothing=eps))")
    if loss_options.get("reduction", "mean") != "mean":
        raise ValueError("reduction: SFTTrainer reduces the per-token loss itself (a mean over num_items_in_batch)")
    patching.patch(trainer.model, objective, **loss_options)
    patching.patch_state(trainer.model).protocol = FUSED_LM_HEAD
    return trainer
