"""Install LLaMA-Factory's text path into this interpreter's venv (``make test-llamafactory`` runs it).

``python setup_llamafactory.py VERSION CONSTRAINTS``. LLaMA-Factory requires torchaudio and
torchvision; on PyPI their builds that pip resolves next to torch 2.13 (CPU) are CUDA builds that
pull another torch or fail to load (torchaudio 2.11.1: "Could not load this library"). So: the
package without dependencies, then every requirement but those two under the torch constraint,
then - because LLaMA-Factory imports torchaudio when it loads, even for text - a placeholder
``torchaudio`` package that raises on any use (audio inputs are then unavailable; nothing else is
stood in for).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

PLACEHOLDER = '''"""Placeholder from dft-ops' tests/integrations/setup_llamafactory.py: no torchaudio build matches this torch.

LLaMA-Factory imports torchaudio when it loads, even for text-only training; any use raises.
"""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is a placeholder here (no build matches this torch); "
                      "audio inputs are unavailable")
'''


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "--progress-bar", "off", *args], check=True)


def main(version: str, constraints: str) -> None:
    pip("--no-deps", f"llamafactory=={version}")
    requirements = [r for r in importlib.metadata.requires("llamafactory") or []
                    if "extra ==" not in r and not re.match(r"torch(audio|vision)\b", r)]
    pip("-c", constraints, *requirements)
    try:
        import torchaudio  # noqa: F401
    except Exception:  # missing, or a build that does not load with this torch
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "torchaudio"], check=False)
        target = Path(sysconfig.get_paths()["purelib"]) / "torchaudio"
        target.mkdir(exist_ok=True)
        (target / "__init__.py").write_text(PLACEHOLDER)
        print(f"setup_llamafactory: placeholder torchaudio written to {target}")


if __name__ == "__main__":
    main(*sys.argv[1:])
