"""The ``dft_ops`` logger: what the package says once (which objective a patched model trains, what a
framework plugin set up) reaches stderr by default, as ``[dft_ops] ...`` lines.

``DFT_OPS_LOG_LEVEL`` (a :mod:`logging` level name, default ``INFO``) sets how much; ``WARNING`` keeps
only warnings. The logger does not propagate to the root logger (a user's ``basicConfig`` would print
every line twice); set ``logging.getLogger("dft_ops").propagate = True`` to route it through your own
handlers instead.
"""

from __future__ import annotations

import logging
import os
import sys


class _Stderr(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is at each record (not as it was at import)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("[dft_ops] %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure() -> logging.Logger:
    logger = logging.getLogger("dft_ops")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        level = os.environ.get("DFT_OPS_LOG_LEVEL", "INFO").upper()
        logger.setLevel(level if level in logging.getLevelNamesMapping() else logging.INFO)
        logger.propagate = False
    return logger
