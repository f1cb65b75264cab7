"""The built wheel installs apart from the checkout and works (the class of bug where `pip install .` gave a
package without dft_ops.integrations). Same check as .ci/run's first step, which deselects this test."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.wheel
def test_wheel_installs_apart_and_computes_a_loss():
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_wheel.py")], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "wheel check passed" in result.stdout
    assert "dft_ops.integrations" in result.stdout and "dft_ops.kernels" in result.stdout
