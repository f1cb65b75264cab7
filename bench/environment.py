"""What a result was measured with: device, package versions, git commit."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from .providers import PROVIDERS, package_version

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "docs" / "benchmarks"  # the tracked results: written only when --out names it
SCRATCH_DIR = Path(tempfile.gettempdir()) / "dft-ops-bench"  # python -m bench's default --out


def slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; file names of the results."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": package_version("triton"), "transformers": package_version("transformers")}
    for p in PROVIDERS.values():
        if p.package:
            out[p.package] = p.version()
    return out


def git_commit() -> str:
    """HEAD's short hash, '+dirty' when tracked files (results aside) differ; DFT_OPS_COMMIT overrides.

    The GPU machine gets a copy of the working tree that may have no .git: gpu_run.sh passes the
    commit it was given, else 'unknown'.
    """
    if os.environ.get("DFT_OPS_COMMIT"):
        return os.environ["DFT_OPS_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!docs/benchmarks"],
                               cwd=REPO, capture_output=True).returncode != 0
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
