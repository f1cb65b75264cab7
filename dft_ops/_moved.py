"""Modules that moved in the 0.1 restructure, still importable under their old names for one release.

``import dft_ops.torch_backend`` (or ``dft_ops.torch_backend`` as an attribute) gives the module at its
new place with a DeprecationWarning naming it. A meta-path finder serves the old dotted names, so no
stand-in file is left in the package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MODULES = {
    "torch_backend": "dft_ops.backends.torch_backend",
    "backend_contract": "dft_ops.backends.protocol",
    "vocab_parallel": "dft_ops.distributed.vocab_parallel",
    "dtensor_inputs": "dft_ops.distributed.dtensor_inputs",
}


def load(name: str):
    """The moved module ``dft_ops.<name>``, with a DeprecationWarning naming its new place."""
    target = MODULES[name]
    warnings.warn(f"dft_ops.{name} moved to {target}; the old name will be removed in the next release",
                  DeprecationWarning, stacklevel=3)
    return importlib.import_module(target)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix == "dft_ops" and name in MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return load(spec.name.rpartition(".")[2])

    def exec_module(self, module):
        pass  # create_module returned the module at its new place, already executed


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
