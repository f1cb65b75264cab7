"""Builds the dft-ops wheel, installs it apart from the checkout, and uses it. Exit status 0 when it works.

Run with the project's virtual environment (its torch, triton, numpy are the
installed package's dependencies):

    .venv/bin/python .ci/check_wheel.py

1. ``pip wheel`` of a clean copy of the checkout (no dependencies);
2. ``pip install --no-deps --target`` into an empty temporary directory: it
   must hold ``dft_ops`` and its dist-info only (no top-level ``kernels``,
   which would shadow Hugging Face's package), with every package of the
   checkout's ``dft_ops/`` and ``kernels/``;
3. a fresh interpreter, started in another temporary directory with only that
   directory in front of the venv's site-packages, imports ``dft_ops`` and
   ``dft_ops.kernels`` from it and computes a tiny loss and its backward on the
   torch backend and the Triton kernels (CPU interpreter), and an ASFT loss (two
   heads), against the float64 reference;
4. the wheel's metadata asks for triton on Linux only (there are no triton wheels for macOS or
   Windows), and a fresh interpreter in which ``import triton`` fails (as on those systems) imports
   the installed ``dft_ops`` (``python -S``, site-packages without triton), trains a tiny loss on the torch backend and a patched tiny model, and
   gets a ValueError naming triton for ``backend="triton"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

USE_THE_WHEEL = r"""
import importlib.util, os, sys
site = sys.argv[1]
import torch, dft_ops, dft_ops.kernels
for module in (dft_ops, dft_ops.kernels, dft_ops.integrations):
    assert module.__file__.startswith(site), f"{module.__name__} imported from {module.__file__}, not the wheel"
spec = importlib.util.find_spec("kernels")
assert spec is None or not (spec.origin or "").startswith(site), "the wheel installed a top-level `kernels`"
torch.manual_seed(0)
hidden, weight = torch.randn(2, 7, 16), torch.randn(45, 16) * 0.3
labels = torch.randint(0, 45, (2, 7))
labels[0, 3] = -100
want = dft_ops.naive.linear_cross_entropy(hidden.double(), weight.double(), labels, shift=True)
for backend in ("torch", "triton"):
    h = hidden.clone().requires_grad_()
    loss = dft_ops.linear_cross_entropy(h, weight, labels, shift=True, backend=backend)
    loss.backward()
    assert abs(loss.item() - want.item()) < 1e-4 * abs(want.item()), (backend, loss.item(), want.item())
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0, backend
    print(f"wheel check: {backend} backend loss {loss.item():.6f} (reference {want.item():.6f})")
# ASFT: a second (reference) head streamed beside the model's
asft = dft_ops.objectives.ASFT(0.2, direction="reverse")
second = dft_ops.SecondHead(torch.randn(2, 7, 12), torch.randn(45, 12) * 0.3)
want = dft_ops.naive.linear_cross_entropy(hidden.double(), weight.double(), labels, shift=True, objective=asft,
                                          second_head=second._replace(hidden=second.hidden.double(),
                                                                      weight=second.weight.double()))
for backend in ("torch", "triton"):
    loss = dft_ops.linear_cross_entropy(hidden, weight, labels, shift=True, objective=asft, backend=backend,
                                        second_head=second)
    assert abs(loss.item() - want.item()) < 1e-4 * abs(want.item()), ("asft", backend, loss.item(), want.item())
    print(f"wheel check: {backend} backend ASFT loss {loss.item():.6f} (reference {want.item():.6f})")
"""

WITHOUT_TRITON = r"""
import sys
site = sys.argv[1]
import torch, dft_ops
assert dft_ops.__file__.startswith(site), dft_ops.__file__
torch.manual_seed(0)
hidden, weight, labels = torch.randn(9, 16, requires_grad=True), torch.randn(45, 16), torch.randint(0, 45, (9,))
loss = dft_ops.linear_cross_entropy(hidden, weight, labels, objective="dft")
loss.backward()
want = dft_ops.naive.linear_cross_entropy(hidden.double(), weight.double(), labels, objective="dft")
assert abs(loss.item() - want.item()) < 1e-4 * abs(want.item()), (loss.item(), want.item())
try:
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    dft_ops.linear_cross_entropy(hidden, weight, labels, backend="triton")
except ValueError as e:
    assert "triton" in str(e) and "not installed" in str(e), e
else:
    raise AssertionError("backend='triton' without triton did not refuse")
import transformers
config = transformers.Qwen2Config(vocab_size=45, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
model = dft_ops.patch(transformers.Qwen2ForCausalLM(config))
ids = torch.randint(0, 45, (2, 6))
model(input_ids=ids, labels=ids).loss.backward()
assert not [m for m in sys.modules if m.split(".")[0] == "triton"], "triton was imported"
print(f"wheel check: without triton, torch backend loss {loss.item():.6f} (reference {want.item():.6f}), "
      "a patched model trained, backend='triton' refused")
"""


def site_without_triton(dest: Path) -> Path:
    """``dest`` filled with links to every entry of this interpreter's site-packages but triton's: with ``python -S``
    and ``PYTHONPATH=<wheel site>:<dest>``, ``import triton`` fails as on a system without triton wheels."""
    import site as site_module

    dest.mkdir()
    for packages in map(Path, site_module.getsitepackages()):
        for entry in packages.iterdir():
            if not entry.name.lower().startswith("triton") and not (dest / entry.name).exists():
                (dest / entry.name).symlink_to(entry)
    return dest


def triton_requirement(wheel: Path) -> str:
    """The wheel's Requires-Dist line for triton (one, with a Linux-only marker)."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = z.read(name).decode()
    (line,) = [ln for ln in metadata.splitlines() if ln.startswith("Requires-Dist: triton")]
    return line


def run(cmd: list[str], what: str, **kwargs) -> None:
    print(f"wheel check: {what}", flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def copy_sources(dest: Path) -> None:
    """The checkout's files that git tracks or would track (no build/, .venv, egg-info): a stale build/ directory
    would otherwise put files into the wheel that its package list leaves out."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def expected_packages() -> set[str]:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dft_ops").rglob("__init__.py")}
    found |= {".".join(("dft_ops", *p.parent.relative_to(ROOT).parts)) for p in (ROOT / "kernels").rglob("__init__.py")}
    return {p for p in found if "__pycache__" not in p}


def main() -> int:
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="dft-ops-wheel-") as tmp:
        tmp = Path(tmp)
        src, dist, site, cwd = tmp / "src", tmp / "dist", tmp / "site", tmp / "cwd"
        cwd.mkdir()
        copy_sources(src)
        # the venv's setuptools when it has one (no network), else pip's isolated build
        has_setuptools = subprocess.run([python, "-c", "import setuptools"], capture_output=True).returncode == 0
        run([python, "-m", "pip", "wheel", "--no-deps", "--quiet", *(["--no-build-isolation"] if has_setuptools else []),
             "--wheel-dir", str(dist), str(src)], "building the wheel", cwd=cwd)
        (wheel,) = dist.glob("dft_ops-*.whl")
        run([python, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)], f"installing {wheel.name} apart",
            cwd=cwd)

        top_level = sorted(p.name for p in site.iterdir())
        extra = [n for n in top_level if n != "dft_ops" and not (n.startswith("dft_ops-") and n.endswith(".dist-info"))]
        if extra:
            print(f"wheel check FAILED: the wheel installs top-level {extra}; only dft_ops belongs there", file=sys.stderr)
            return 1
        installed = {".".join(p.parent.relative_to(site).parts) for p in site.rglob("__init__.py")}
        missing = expected_packages() - installed
        if missing:
            print(f"wheel check FAILED: packages missing from the wheel: {sorted(missing)}", file=sys.stderr)
            return 1

        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
        env.update(PYTHONPATH=str(site), TRITON_INTERPRET="1")
        run([python, "-c", USE_THE_WHEEL, str(site)], "importing it from a temporary directory, a tiny loss + backward",
            cwd=cwd, env=env)
        requirement = triton_requirement(wheel)
        if "sys_platform == \"linux\"" not in requirement.replace("'", '"'):
            print(f"wheel check FAILED: triton must be required on Linux only: {requirement}", file=sys.stderr)
            return 1
        env.pop("TRITON_INTERPRET")
        env["PYTHONPATH"] = f"{site}{os.pathsep}{site_without_triton(tmp / 'no-triton')}"
        run([python, "-S", "-c", WITHOUT_TRITON, str(site)], f"without triton ({requirement})", cwd=cwd, env=env)
    print(f"wheel check passed: {wheel.name}, packages {sorted(installed)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"wheel check FAILED: {' '.join(map(str, exc.cmd))[:120]}... exited with {exc.returncode}",
              file=sys.stderr)
        sys.exit(1)
