"""``python -m bench.probe``: what the machine has that a GPU window needs, printed and written as JSON.

The first step of bench/gpu_run.sh call1, before anything is relied on: Python, torch, Triton and
CUDA versions, the GPU (name, capability, SMs, memory, L2), every package the run imports (with the
version, or the import error), the C compiler and the Python headers Triton builds its launcher
with at run time, and one tiny Triton kernel compiled and launched (which fails fast if either is
missing). ``--out DIR`` writes ``DIR/probe.json``. Exit status 1 when something the run cannot do
without is missing (torch, triton, a C compiler, Python.h, or the kernel launch on a GPU); missing
peers only skip their providers.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

# (import name, distribution): what the window's steps import. "needed": the run stops without it.
NEEDED = (("torch", "torch"), ("triton", "triton"), ("numpy", "numpy"), ("pytest", "pytest"))
WANTED = (("matplotlib", "matplotlib"), ("transformers", "transformers"), ("accelerate", "accelerate"),
          ("pandas", "pandas"), ("pyarrow", "pyarrow"), ("fsspec", "fsspec"), ("huggingface_hub", "huggingface-hub"),
          ("xxhash", "xxhash"), ("packaging", "packaging"), ("peft", "peft"),
          ("xdist", "pytest-xdist"),  # call1 runs the curated tests on 6 workers when it is there
          # carried as wheels (bench/fetch_wheels.sh)
          ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"), ("trl", "trl"),
          ("datasets", "datasets"), ("dill", "dill"), ("multiprocess", "multiprocess"),
          # what TRL's backward imports at call time (bench/providers.py)
          ("trl.trainer.utils", "trl"), ("dft_ops", "dft-ops"))


def _package(module: str, dist: str) -> dict:
    out = {"module": module, "dist": dist}
    try:
        out["version"] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        out["version"] = None
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(module)
        out["ok"] = True
        out["file"] = getattr(mod, "__file__", None)
    except Exception as e:  # noqa: BLE001 - any import failure is a finding
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    out["import_s"] = round(time.perf_counter() - t0, 2)
    return out


def _compiler() -> dict:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    out = {"cc": cc}
    if cc:
        try:
            out["version"] = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                            timeout=20).stdout.splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            out["error"] = str(e)
    include = sysconfig.get_paths().get("include", "")
    out["python_include"] = include
    out["python_h"] = os.path.exists(os.path.join(include, "Python.h"))
    return out


def _gpu() -> dict:
    import torch

    out = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        return out
    p = torch.cuda.get_device_properties(0)
    out.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        out["nvidia_smi"] = f"not available: {e}"
    return out


def _triton_launch() -> dict:
    """Compile and launch one tiny kernel: Triton's launcher is built with the C compiler on first use."""
    import torch

    if not torch.cuda.is_available():
        return {"ok": None, "note": "no CUDA device"}
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"ok": None, "note": "TRITON_INTERPRET=1"}
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

    t0 = time.perf_counter()
    try:
        x = torch.randn(1000, device="cuda")
        want = x + 1
        add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
        torch.cuda.synchronize()
        ok = bool(torch.equal(x, want))
        return {"ok": ok, "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}", "seconds": round(time.perf_counter() - t0, 2)}


def probe() -> dict:
    import torch

    info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
            "cpus": os.cpu_count(), "env": {k: os.environ.get(k) for k in ("PYTHONPATH", "DFT_OPS_CONFIG",
                                                                            "TRITON_INTERPRET", "CC")},
            "torch_threads": torch.get_num_threads()}
    info["needed"] = [_package(m, d) for m, d in NEEDED]
    info["wanted"] = [_package(m, d) for m, d in WANTED]
    info["compiler"] = _compiler()
    info["gpu"] = _gpu()
    info["triton_launch"] = _triton_launch()
    return info


def missing(info: dict) -> list[str]:
    """What the window cannot do without."""
    out = [f"{p['dist']}: {p.get('error')}" for p in info["needed"] if not p["ok"]]
    if not info["compiler"]["cc"]:
        out.append("no C compiler (gcc/cc/clang): Triton cannot build its launcher")
    if not info["compiler"]["python_h"]:
        out.append(f"no Python.h in {info['compiler']['python_include']}: Triton cannot build its launcher")
    if info["triton_launch"].get("ok") is False:
        out.append(f"a Triton kernel failed to compile or launch: {info['triton_launch'].get('error')}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write probe.json here")
    args = p.parse_args(argv)
    info = probe()
    g = info["gpu"]
    print(f"python {info['python']} ({info['executable']}), {info['cpus']} CPUs; torch CUDA {g['torch_cuda']}")
    if g.get("name"):
        print(f"GPU {g['name']} sm_{g['capability'].replace('.', '')}, {g['sms']} SMs, {g['memory_gib']} GiB, "
              f"L2 {g['l2_mb']} MB; nvidia-smi: {g.get('nvidia_smi')}")
    else:
        print("no CUDA GPU")
    for p_ in info["needed"] + info["wanted"]:
        state = "ok" if p_["ok"] else f"FAILS: {p_['error']}"
        print(f"  {p_['module']:20s} {str(p_['version']):12s} {state}")
    c = info["compiler"]
    print(f"C compiler: {c['cc']} ({c.get('version', c.get('error'))}); Python.h: {c['python_h']} ({c['python_include']})")
    print(f"Triton kernel launch: {info['triton_launch']}")
    gaps = missing(info)
    info["missing"] = gaps
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    for gap in gaps:
        print(f"MISSING: {gap}")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
