"""axolotl: a plugin that has dft-ops compute the SFT loss (DFT, CE, ASFT, ...) without logits.

In the YAML::

    plugins:
      - dft_ops.integrations.axolotl.DFTOpsPlugin
    dft_ops_objective: dft                 # "dft" (default), "ce", "chord", or a dict (below)
    # dft_ops_objective: {name: ASFT, kl_coef: 0.1, direction: forward, base: dft}
    # dft_ops_reference: adapters_disabled # ASFT's reference: adapters_disabled (LoRA), base_model, or a path
    # dft_ops_options: {filter_eps: 1.0e-6, backend: auto}   # any dft_ops.LossOptions field

A dict objective names a class of :mod:`dft_ops.objectives` (``ASFT``, ``Power``, ``Focal``,
``Threshold``, ``SequenceDFT``, ...) with its constructor's arguments. axolotl 0.19 offers DFT only
through Liger's fused loss with ``liger_use_token_scaling`` (a logits chunk per token block, a full
softmax per chunk, GPU only); this plugin replaces that: leave ``liger_fused_linear_cross_entropy``
and ``cut_cross_entropy`` off.

The plugin patches the model once it is loaded with its adapters (``post_model_load``), with
:func:`dft_ops.patch`: axolotl's trainer (a ``transformers.Trainer``) then gets its loss from the
patched forward, fused, with the same reduction as the model's own (the mean over the micro-batch's
labelled tokens, or ``num_items_in_batch`` where axolotl passes it); sample packing's
``position_ids`` reach it. RL trainers (``rl:``) are refused: they need log-probs, not this loss.

axolotl (and pydantic, for the config keys) are imported only with this module.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field, field_validator, model_validator

import dft_ops

__all__ = ["DFTOpsPlugin", "DFTOpsArgs", "build_objective"]

_LOG = logging.getLogger("dft_ops.integrations.axolotl")
_NAMED = ("dft", "ce", "chord")
_FUSED_LOSS_KEYS = ("liger_fused_linear_cross_entropy", "liger_use_token_scaling", "cut_cross_entropy",
                    "chunked_cross_entropy")


def build_objective(spec):
    """``"dft"`` / ``"ce"`` / ``"chord"``, or ``{name: ClassName, **kwargs}`` -> a dft_ops objective."""
    if isinstance(spec, str):
        if spec.lower() not in _NAMED:
            raise ValueError(f"dft_ops_objective: expected one of {_NAMED} or a dict {{name: ..., ...}} naming a "
                             f"class of dft_ops.objectives, got {spec!r}")
        return spec.lower()
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"dft_ops_objective: a dict needs a string 'name' (a class of dft_ops.objectives), got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("name")
    cls = getattr(dft_ops.objectives, name, None)
    if not (isinstance(cls, type) and issubclass(cls, dft_ops.objectives.Objective)) or cls is dft_ops.objectives.Objective:
        raise ValueError(f"dft_ops_objective: name {name!r} is not a class of dft_ops.objectives")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"dft_ops_objective: {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {exc}") from None


class DFTOpsArgs(BaseModel):
    """The plugin's keys in axolotl's config (validated with the rest of it)."""

    dft_ops_objective: Union[str, dict[str, Any]] = Field(
        default="dft", json_schema_extra={"description": "dft-ops objective: 'dft', 'ce', 'chord', or a dict "
                                          "{name: <class of dft_ops.objectives>, **arguments}, e.g. "
                                          "{name: ASFT, kl_coef: 0.1}"})
    dft_ops_reference: Optional[str] = Field(
        default=None, json_schema_extra={"description": "ASFT's frozen reference: 'adapters_disabled' (a LoRA model "
                                         "with its adapters off), 'base_model' (a frozen copy of base_model) or a "
                                         "model path"})
    dft_ops_options: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"description": "dft_ops.LossOptions fields passed to dft_ops.patch "
                                                 "(backend, filter_eps, label_smoothing, z_loss, precise, ...)"})

    @field_validator("dft_ops_objective")
    @classmethod
    def _objective(cls, value):
        build_objective(value)
        return value

    @field_validator("dft_ops_options")
    @classmethod
    def _options(cls, value):
        for name in ("objective", "reduction", "shift", "softcap"):
            if name in value:
                raise ValueError(f"dft_ops_options: {name!r} is set by the plugin / the model, not here")
        dft_ops.LossOptions(**value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _compatible(cls, data):
        if not isinstance(data, dict) or "dft_ops.integrations.axolotl.DFTOpsPlugin" not in (data.get("plugins") or []):
            return data
        fused = [k for k in _FUSED_LOSS_KEYS if data.get(k)]
        if fused:
            raise ValueError(f"{fused[0]}: another fused loss; the dft-ops plugin computes the loss itself, so leave "
                             f"{', '.join(fused)} off")
        if data.get("rl"):
            raise ValueError(f"rl: {data['rl']!r} trainers need per-token log-probs, not the dft-ops SFT loss; remove "
                             "the dft-ops plugin for RL runs")
        objective = build_objective(data.get("dft_ops_objective", "dft"))
        is_asft = isinstance(objective, dft_ops.objectives.ASFT)
        if is_asft and not data.get("dft_ops_reference"):
            raise ValueError("dft_ops_reference: an ASFT objective needs a reference: 'adapters_disabled' (LoRA), "
                             "'base_model' or a model path")
        if not is_asft and data.get("dft_ops_reference"):
            raise ValueError("dft_ops_reference: only an ASFT objective takes a reference")
        if data.get("dft_ops_reference") == "adapters_disabled" and data.get("adapter") not in ("lora", "qlora"):
            raise ValueError("dft_ops_reference: 'adapters_disabled' needs adapter: lora (or qlora)")
        return data


class DFTOpsPlugin(BasePlugin):
    """Patches the loaded model (adapters included) with :func:`dft_ops.patch` and the config's objective."""

    def get_input_args(self) -> str:
        return "dft_ops.integrations.axolotl.DFTOpsArgs"

    def post_model_load(self, cfg, model):
        objective = build_objective(cfg.dft_ops_objective or "dft")
        options = dict(cfg.dft_ops_options or {})
        reference = self._reference(cfg, model) if isinstance(objective, dft_ops.objectives.ASFT) else None
        if reference is None:
            dft_ops.patch(model, objective=objective, **options)
        else:
            dft_ops.patch(model, objective=objective, reference=reference, **options)
        _LOG.warning("dft-ops computes this run's training loss (%s) without logits", cfg.dft_ops_objective or "dft")

    def post_trainer_create(self, cfg, trainer):
        try:
            from trl import SFTTrainer
        except ImportError:
            return
        if isinstance(trainer, SFTTrainer):  # an SFTTrainer with its own fused head (TRL >= 1.15)
            dft_ops.patch_sft_trainer(trainer, objective=build_objective(cfg.dft_ops_objective or "dft"),
                                      **dict(cfg.dft_ops_options or {}))

    @staticmethod
    def _reference(cfg, model):
        ref = cfg.dft_ops_reference
        if ref == "adapters_disabled":
            return "adapters_disabled"
        import transformers

        path = cfg.base_model if ref == "base_model" else ref
        first = next(model.parameters())
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=first.dtype, trust_remote_code=bool(cfg.trust_remote_code))
        reference.to(first.device).eval().requires_grad_(False)
        _LOG.info("dft-ops: ASFT reference loaded from %s (%s, frozen)", path, first.dtype)
        return reference
