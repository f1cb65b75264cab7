"""Compile every configuration of the one-pass head's row-pass kernels (kernels/row_pass.py) for real GPUs.

The same machinery as compile_check.py (its ``compile_launch`` and ``resource_usage``: the
library's own launches, specialized as JITFunction.run would, for a GPUTarget, read back with
the Triton wheel's cuobjdump / nvdisasm), over these kernels' own axes: the optional features
of each pass on and off, one and two heads, each dtype of G.

Run as ``python tests/compile_check_row_pass.py``; prints one JSON object per compiled variant.
Must run *without* TRITON_INTERPRET; tests/test_compile_row_pass.py starts it in a clean
subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import compile_cache  # tests/ is on sys.path

import torch
from triton.backends.compiler import GPUTarget

from compile_check import ARCHS, SHARED_LIMIT, compile_launch, resource_usage  # tests/ is on sys.path

rp = importlib.import_module("dft_ops.kernels.row_pass")

# Workspace stand-ins specialized as real ones are: V divisible by 8, not 16 (as 50257 or 32001 are
# by nothing), row strides padded to multiples of 16 (the second head's differs); C not a multiple
# of a block.
C, V, LD, LD_SECOND = 40, 1000, 1008, 1024
# the features each job switches on, by name (see _launch); "second" / "q" / "gap": a second head
STATS_SINGLE = ("softcap", "temperature", "with_stats", "smoothing", "smoothing+class_weight")
GRAD_SINGLE = ("softcap", "temperature", "uniform", "uniform+class_weight")
SECOND_TERMS = {"row_stats": ("second", "second+mix"), "logit_grad": ("q+gap", "q", "gap", "mix")}
OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _launch(kernel: str, features: frozenset, out_dtype: str):
    u = torch.randn(C, LD)[:, :V]
    r = torch.randn(C, LD_SECOND)[:, :V]
    targets = torch.randint(0, V, (C,))
    on = features.__contains__
    common = dict(softcap=30.0 if on("softcap") else None, temperature=0.7 if on("temperature") else None,
                  class_weight=torch.rand(V) if on("class_weight") else None,
                  second_softcap=20.0 if on("second_softcap") else None)
    mix_weight = 0.3 if on("mix") else None  # the generalized JSD's mixture (Distill)
    if kernel == "row_stats":
        return rp.row_stats_launch(u, targets, with_stats=on("with_stats"), smoothing=on("smoothing"),
                                   second_logits=r if on("second") else None, mix_weight=mix_weight, **common)[0]
    vec = [torch.randn(C) for _ in range(7)]
    return rp.logit_grad_launch(
        u, targets, vec[0], vec[1], vec[2], vec[3] if on("uniform") else None, vec[4] if on("q") else None,
        vec[5] if on("gap") else None, second_logits=r, second_lse=torch.randn(C),
        out_dtype=OUT_DTYPES[out_dtype], mix_gap=vec[6] if on("mix") else None, mix_weight=mix_weight, **common)[0]


def i32_products(ttir: str) -> list[str]:
    """The TTIR's 32-bit integer products of two runtime values. Offsets into the workspace
    (row * ld: 2e10 elements at 128k tokens x 152k vocabulary) must be int64; the only int32
    products these kernels need are by a constant (the last full tile, V // BLOCK_V * BLOCK_V)."""
    return [line.strip() for line in ttir.splitlines()
            if "arith.muli" in line and re.search(r"(^|\W|\dx)i32\b", line)
            and not re.search(r"%(c-?\d+_i32|cst)\b", line)]


def check(job) -> dict:
    kernel, family, index, features, out_dtype, arch = job
    config = (rp.STATS_CONFIGS if kernel == "row_stats" else rp.GRAD_CONFIGS)[family][index]
    out = {"kernel": kernel, "config": str(config), "family": family, "features": sorted(features),
           "dtype": out_dtype, "arch": arch}
    try:
        launch = _launch(kernel, features, out_dtype)
        if launch.family != family:
            raise AssertionError(f"the launch takes the {launch.family!r} configurations, not {family!r}")
        compiled = compile_launch(launch, config, GPUTarget("cuda", arch, 32))
        out.update(resource_usage(compiled.asm["cubin"]))
        out["i32_products"] = i32_products(compiled.asm["ttir"])
        out["shared_bytes"] = compiled.metadata.shared
        out["shared_limit"] = SHARED_LIMIT[arch]
    except Exception as e:  # reported, and failed, by the test
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    return out


def _every(kernel: str) -> frozenset:
    """Every one-head feature of a pass."""
    return frozenset("+".join(STATS_SINGLE if kernel == "row_stats" else GRAD_SINGLE).split("+"))


def feature_sets(kernel: str, family: str):
    """One head: every feature off, all on, each alone. Two heads: each term of the second head
    alone, with its own soft-cap, and with every feature on."""
    single = STATS_SINGLE if kernel == "row_stats" else GRAD_SINGLE
    every = _every(kernel)
    if family == "one":
        yield frozenset()
        yield every
        for f in single:
            yield frozenset(f.split("+"))
    else:
        for terms in SECOND_TERMS[kernel]:
            terms = frozenset(terms.split("+"))
            yield terms
            yield terms | {"second_softcap"}
            yield terms | every | {"second_softcap"}


def jobs():
    for kernel, configs in (("row_stats", rp.STATS_CONFIGS), ("logit_grad", rp.GRAD_CONFIGS)):
        for family, family_configs in configs.items():
            for index, config in enumerate(family_configs):
                for arch in (a for a in ARCHS if a >= config.min_arch):
                    for features in feature_sets(kernel, family):
                        # G's dtypes: fp32 in place and bf16 packed for every feature set, fp16 (the
                        # same narrow path as bf16) with every feature on
                        dtypes = ("fp32",) if kernel == "row_stats" else \
                            ("fp32", "bf16", "fp16") if features >= _every(kernel) else ("fp32", "bf16")
                        for out_dtype in dtypes:
                            yield kernel, family, index, features, out_dtype, arch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--features", nargs="+", help="only the jobs with one of these features (e.g. mix)")
    args = parser.parse_args()
    todo = [job for job in jobs() if args.features is None or set(args.features) & job[3]]
    return compile_cache.run(__file__, check, todo, args.workers)


if __name__ == "__main__":
    sys.exit(main())
