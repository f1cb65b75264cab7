"""A framework's Trainer class wrapped in place (LLaMA-Factory, ms-swift): its ``__init__`` and
``compute_loss`` replaced, the originals kept on the class under one attribute, so that installing
twice wraps once and uninstalling restores them; the install's loss options travel with them."""

from __future__ import annotations

from typing import Callable

import dft_ops

RUN_SETS = ("objective", "reference", "reduction")
"""Options the framework's run decides (its config), never ``install()``."""


def check_install_options(loss_options: dict, who: str) -> None:
    """Refuses what the run decides and what :class:`dft_ops.LossOptions` refuses, at install time (not at the
    first training step); ``who`` names the framework's setting in the message."""
    for name in RUN_SETS:
        if name in loss_options:
            raise ValueError(f"{name}: set by {who}, not by install()")
    dft_ops.LossOptions(**loss_options)


def wrap(cls: type, mark: str, wrap_init: Callable, wrap_compute_loss: Callable, loss_options: dict) -> None:
    """``cls.__init__`` / ``cls.compute_loss`` replaced by ``wrap_init(original)`` / ``wrap_compute_loss(original)``
    once; ``loss_options`` (re)stored with the originals under ``cls.<mark>``."""
    originals = cls.__dict__.get(mark)
    if originals is None:
        originals = {"__init__": cls.__init__, "compute_loss": cls.compute_loss}
        setattr(cls, mark, originals)
        cls.__init__ = wrap_init(originals["__init__"])
        cls.compute_loss = wrap_compute_loss(originals["compute_loss"])
    originals["loss_options"] = dict(loss_options)


def unwrap(cls: type, mark: str) -> None:
    """The class's own ``__init__`` and ``compute_loss`` back (nothing when it is not wrapped)."""
    originals = cls.__dict__.get(mark)
    if originals is not None:
        cls.__init__, cls.compute_loss = originals["__init__"], originals["compute_loss"]
        delattr(cls, mark)


def is_wrapped(cls: type, mark: str) -> bool:
    return mark in cls.__dict__
