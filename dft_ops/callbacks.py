"""Per-token training statistics: a recorder the loss computation writes to, and a Trainer callback.

How the numbers travel (no logits, no extra pass, no host sync per step)::

    loss, stats = dft_ops.linear_cross_entropy(..., return_stats=True)   # TokenStats, loss positions
    recorder.record(stats)             # on-device sums + a label-probability histogram (over stats.mask)
    ...                                # more micro-batches / steps
    recorder.collect()                 # at logging time: one sync, a dict of floats, reset

:class:`TokenStatsRecorder` is plain PyTorch. ``dft_ops.TokenStatsCallback``
(a ``transformers.TrainerCallback``, built on first access so that dft_ops
imports without transformers) owns one, collects it whenever the Trainer logs
its training loss and adds the results to the same log record, so they reach
the console, ``trainer.state.log_history`` and the reporting integrations
(TensorBoard, W&B, ...) next to the objective's ``loss``.

Two ways to feed the recorder:

- your own ``compute_loss`` calls ``callback.record(stats)``;
- a model patched by dft-ops finds the recorder with :func:`recorder_of` (the
  callback attaches it to the model when training begins) and records the
  stats of every training forward itself.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# the keys added to the Trainer's log records; histogram keys are HIST_PREFIX + "lo-hi"
LABEL_PROB, ENTROPY, TOP1, CE_LOSS, TOKENS, KL = (
    "token_label_prob", "token_entropy", "token_top1_acc", "token_ce_loss", "token_count", "token_kl")
HIST_PREFIX = "token_label_prob_hist/"

_ATTR = "_dft_ops_token_stats_recorder"
# accumulator layout: [tokens, sum p, sum entropy, sum top-1 hits, sum -log p, tokens with a KL, sum KL,
# histogram bins...]
_N_SUMS = 7


class TokenStatsRecorder:
    """Accumulates statistics of the label tokens recorded since the last :meth:`collect`.

    Everything stays on the stats' device in one float64 vector (sums of the
    label probability, entropy, top-1 hits and -log p, the token count, and a
    ``bins``-bin histogram of the label probability over [0, 1]); only
    :meth:`collect` reads it back.

    Args:
        bins: number of equal-width histogram bins over [0, 1] (the DFT
            paper's Figure 2 uses 10).
    """

    def __init__(self, bins: int = 10):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins: expected a positive int, got {bins!r}")
        self.bins = bins
        self.enabled = True
        self._acc: Tensor | None = None

    @property
    def edges(self) -> list[float]:
        """The bins + 1 histogram edges over [0, 1]."""
        return [i / self.bins for i in range(self.bins + 1)]

    def histogram_keys(self) -> list[str]:
        e = self.edges
        return [f"{HIST_PREFIX}{e[i]:g}-{e[i + 1]:g}" for i in range(self.bins)]

    def record(self, stats, mask: Tensor | None = None) -> None:
        """Adds one batch of tokens.

        Args:
            stats: the :class:`~dft_ops.TokenStats` of ``linear_cross_entropy(...,
                return_stats=True)`` (anything with ``logprob``, ``entropy`` and
                ``is_top1`` tensors of the loss positions' shape).
            mask: bool tensor of the same shape, True at tokens that count;
                None (default): ``stats.mask``, the loss computation's own
                (:attr:`dft_ops.TokenLayout.mask`: the label is not ignored).

        Does nothing while :attr:`enabled` is False (the callback disables it
        outside training steps, so evaluation batches are not counted).
        """
        if not self.enabled:
            return
        logprob, entropy, is_top1 = stats.logprob, stats.entropy, stats.is_top1
        if mask is None:
            mask = getattr(stats, "mask", None)
            if mask is None:
                raise ValueError("mask: these stats carry no mask (TokenStats.mask is None); pass mask=")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != logprob.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} differs from the stats' {tuple(logprob.shape)} "
                             "(the loss positions: labels[..., 1:] with shift)")
        with torch.no_grad():
            m = mask.to(device=logprob.device, dtype=torch.float64).reshape(-1)
            logp = logprob.double().reshape(-1)
            p = logp.exp()
            sums = torch.stack([m.sum(), (p * m).sum(), (entropy.double().reshape(-1) * m).sum(),
                                (is_top1.reshape(-1) & mask.reshape(-1)).double().sum(), -(logp * m).sum(),
                                *_kl_sums(getattr(stats, "kl", None), m)])
            # p == 1 goes to the last bin; index_add_ (not bincount) keeps this free of host syncs
            bin_of = (p * self.bins).long().clamp_(0, self.bins - 1)
            hist = torch.zeros(self.bins, dtype=torch.float64, device=p.device).index_add_(0, bin_of, m)
            update = torch.cat([sums, hist])
            self._acc = update if self._acc is None else self._acc + update

    def collect(self, *, all_reduce: bool = False, device=None) -> dict[str, float] | None:
        """The statistics since the last call, as a dict of floats, and a reset; None if no token was recorded.

        Keys: ``token_label_prob`` (mean p), ``token_entropy`` (mean, nats),
        ``token_top1_acc``, ``token_ce_loss`` (mean -log p: plain
        cross-entropy, whatever the objective), ``token_count``,
        ``token_kl`` (only with an ASFT objective: the mean KL to the
        reference model, unscaled by ``kl_coef``), and one
        ``token_label_prob_hist/lo-hi`` per bin: the fraction of tokens with
        ``lo <= p < hi``.

        Args:
            all_reduce: sum over the processes of torch.distributed first (every
                process must call collect then); ``device`` is where a process
                that recorded nothing makes its zeros.
        """
        acc, self._acc = self._acc, None
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            if acc is None:
                acc = torch.zeros(_N_SUMS + self.bins, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(acc)
        if acc is None:
            return None
        values = acc.tolist()
        n = values[0]
        if n == 0:
            return None
        out = {LABEL_PROB: values[1] / n, ENTROPY: values[2] / n, TOP1: values[3] / n, CE_LOSS: values[4] / n,
               TOKENS: n}
        if values[5] > 0:
            out[KL] = values[6] / values[5]
        out.update({k: c / n for k, c in zip(self.histogram_keys(), values[_N_SUMS:])})
        return out


def _kl_sums(kl: Tensor | None, m: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens, sum of the KL) over the counted tokens; zeros for stats without a KL (objectives other than ASFT)."""
    if kl is None:
        zero = m.new_zeros(())
        return zero, zero
    return m.sum(), (kl.double().reshape(-1) * m).sum()


def attach_recorder(model, recorder: TokenStatsRecorder | None) -> None:
    """Makes ``recorder`` findable by :func:`recorder_of` from ``model`` and the models inside it.

    Sets it on ``model`` and on every submodule that is a Hugging Face model
    (has ``get_output_embeddings``), so a patched forward finds it through
    wrappers such as PEFT's. ``None`` removes it.
    """
    import torch.nn as nn

    modules = list(model.modules()) if isinstance(model, nn.Module) else [model]
    for i, m in enumerate(modules):
        if i == 0 or hasattr(m, "get_output_embeddings"):
            if recorder is None:
                m.__dict__.pop(_ATTR, None)
            else:
                m.__dict__[_ATTR] = recorder


def recorder_of(model) -> TokenStatsRecorder | None:
    """The recorder attached to ``model`` by :func:`attach_recorder` (or a TokenStatsCallback), else None.

    A patched forward calls this to decide whether to ask for ``return_stats``.
    """
    return getattr(model, "__dict__", {}).get(_ATTR)


class _TokenStatsCallbackMixin:
    """Logs per-token statistics of the training tokens beside the Trainer's loss.

    At every training log (the records with ``loss``) it adds the keys of
    :meth:`TokenStatsRecorder.collect`: mean label probability, mean entropy,
    top-1 accuracy, plain cross-entropy (``token_ce_loss``, next to the
    objective's ``loss``) and the token count; with ``log_histogram=True``
    also the label-probability histogram (``token_label_prob_hist/lo-hi``,
    one key per bin, fractions of tokens; the DFT paper's Figure 2). Each
    logging step's histogram is kept in :attr:`histograms` as
    ``(global_step, fractions)`` either way.

    Feeding it: call :meth:`record` from your ``compute_loss`` (see the docs
    page), or train a model patched by dft-ops, which finds the recorder this
    callback attaches to it at ``on_train_begin``.

    Placement: the Trainer calls callbacks in order and puts the reporting
    integrations before the ``callbacks=`` you pass. Add it with
    ``TokenStatsCallback.add_to(trainer)``, which puts it first, so that every
    logger sees its keys; passed through ``callbacks=[...]`` its keys still
    reach the console and ``trainer.state.log_history``, but not the
    integrations (a warning says so when ``report_to`` has any).

    Args:
        bins: histogram bins over [0, 1].
        log_histogram: also add the ``bins`` histogram keys to every log record (off by default: they
            would fill every console line).
    """

    def __init__(self, bins: int = 10, log_histogram: bool = False):
        if not isinstance(log_histogram, bool):
            raise TypeError(f"log_histogram: expected a bool, got {type(log_histogram).__name__}")
        self.log_histogram = log_histogram
        self.recorder = TokenStatsRecorder(bins)
        self.recorder.enabled = False  # only inside training steps
        self.histograms: list[tuple[int, list[float]]] = []
        self._first = False
        self._warned_empty = False

    @classmethod
    def add_to(cls, trainer, **kwargs):
        """Creates the callback and puts it first in ``trainer``'s callbacks; returns it.

        Raises:
            TypeError: ``trainer`` is not a ``transformers.Trainer`` (it has no ``callback_handler``).
        """
        handler = getattr(trainer, "callback_handler", None)
        if not isinstance(getattr(handler, "callbacks", None), list):
            raise TypeError(f"trainer: expected a transformers.Trainer (or a subclass such as trl.SFTTrainer), got "
                            f"{type(trainer).__name__}; outside a Trainer, use dft_ops.TokenStatsRecorder directly")
        callback = cls(**kwargs)
        callback._first = True
        handler.callbacks.insert(0, callback)
        return callback

    def record(self, stats, mask: Tensor | None = None) -> None:
        """Records one batch's :class:`~dft_ops.TokenStats` (see :meth:`TokenStatsRecorder.record`)."""
        self.recorder.record(stats, mask)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            attach_recorder(model, self.recorder)
        integrations = [r for r in (args.report_to or []) if r != "none"]
        if integrations and not self._first:
            warnings.warn(f"TokenStatsCallback: reporting integrations {integrations} run before callbacks passed as "
                          "Trainer(callbacks=...) and will not see the token statistics; use "
                          "TokenStatsCallback.add_to(trainer) instead.", stacklevel=2)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            attach_recorder(model, None)

    def on_step_begin(self, args, state, control, **kwargs):
        self.recorder.enabled = True

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.enabled = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation and end-of-training summaries
            return
        summary = self.recorder.collect(all_reduce=True, device=args.device)
        if summary is None:
            if not self._warned_empty:
                self._warned_empty = True
                warnings.warn("TokenStatsCallback: no token statistics were recorded; call callback.record(stats) "
                              "in compute_loss or train a model patched by dft-ops.", stacklevel=2)
            return
        keys = self.recorder.histogram_keys()
        self.histograms.append((state.global_step, [summary[k] for k in keys]))
        if not self.log_histogram:
            summary = {k: v for k, v in summary.items() if k not in keys}
        logs.update(summary)
        # Trainer.log stored a copy of this record before calling the callbacks
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(summary)


_CALLBACK_CLASS = None


def _callback_class():
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        try:
            from transformers import TrainerCallback
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "dft_ops.TokenStatsCallback is a transformers.TrainerCallback and needs transformers: pip install "
                "'dft-ops[hf]' (dft_ops.TokenStatsRecorder works without it)", name=e.name) from e

        _CALLBACK_CLASS = type("TokenStatsCallback", (_TokenStatsCallbackMixin, TrainerCallback),
                               {"__doc__": _TokenStatsCallbackMixin.__doc__, "__module__": __name__,
                                "__qualname__": "TokenStatsCallback"})
    return _CALLBACK_CLASS


def __getattr__(name):
    # TokenStatsCallback subclasses transformers.TrainerCallback: built on first access
    if name == "TokenStatsCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TokenStatsRecorder", "TokenStatsCallback", "attach_recorder", "recorder_of"]
