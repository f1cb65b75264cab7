"""``dft_ops.LinearCrossEntropy``: the functional API as an nn.Module holding one LossOptions."""

from __future__ import annotations

from torch import Tensor, nn

from .functional import linear_cross_entropy
from .options import UNSET, LossOptions, describe, resolve_options


class LinearCrossEntropy(nn.Module):
    """Fused linear + objective loss; options fixed (and checked) at construction.

    ``LinearCrossEntropy("dft", shift=True, label_smoothing=0.1)`` or
    ``LinearCrossEntropy(options=LossOptions(...))``
    (keywords given explicitly override the fields of ``options``); the
    result is :attr:`options`.

    ``forward(hidden (..., D), weight (V, D), labels (...), bias=None,
    num_items_in_batch=None, position_ids=None, second_head=None,
    old_logprobs=None, ref_logprobs=None)`` returns what
    :func:`dft_ops.linear_cross_entropy` returns with these options. The
    module holds no parameters: the head's weight is passed in, so it can be
    the model's own ``lm_head.weight``. ``module.to(...)`` moves (and casts)
    ``options.class_weight`` along, like CrossEntropyLoss's ``weight``.
    """

    def __init__(self, objective=UNSET["objective"], *, ignore_index=UNSET["ignore_index"],
                 reduction=UNSET["reduction"], softcap=UNSET["softcap"], shift=UNSET["shift"],
                 return_stats=UNSET["return_stats"], backend=UNSET["backend"], filter_eps=UNSET["filter_eps"],
                 label_smoothing=UNSET["label_smoothing"], z_loss=UNSET["z_loss"],
                 temperature=UNSET["temperature"], class_weight=UNSET["class_weight"], precise=UNSET["precise"],
                 vocab_parallel=UNSET["vocab_parallel"],
                 backward_mode=UNSET["backward_mode"], workspace_mb=UNSET["workspace_mb"],
                 sync_free=UNSET["sync_free"], options: LossOptions | None = None):
        super().__init__()
        self.options = resolve_options(options, objective=objective, ignore_index=ignore_index, reduction=reduction,
                                       softcap=softcap, shift=shift, return_stats=return_stats, backend=backend,
                                       filter_eps=filter_eps, label_smoothing=label_smoothing, z_loss=z_loss,
                                       temperature=temperature, class_weight=class_weight, precise=precise,
                                       vocab_parallel=vocab_parallel,
                                       backward_mode=backward_mode, workspace_mb=workspace_mb,
                                       sync_free=sync_free)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                num_items_in_batch=None, position_ids: Tensor | None = None, second_head=None,
                old_logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None):
        return linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=num_items_in_batch,
                                    position_ids=position_ids, second_head=second_head, old_logprobs=old_logprobs,
                                    ref_logprobs=ref_logprobs, options=self.options)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() / .half() move class_weight with the module, as CrossEntropyLoss's weight buffer
        super()._apply(fn, *args, **kwargs)
        if self.options.class_weight is not None:
            self.options = self.options.replace(class_weight=fn(self.options.class_weight))
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={describe(v)}" for k, v in self.options.as_dict().items())
