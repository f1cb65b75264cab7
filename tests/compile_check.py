"""Compile every kernel configuration for real NVIDIA GPUs on a machine without one.

Builds the exact launches the library makes (same arguments, same Triton
specialization of sizes and pointer alignment, small CPU tensors standing in
for the data), compiles them with ``triton.compile`` for a ``GPUTarget``, and
reads the cubin with the ``cuobjdump`` / ``nvdisasm`` shipped in the Triton
wheel: registers, stack frame and local memory (spills), shared memory, and
whether the matrix products became HGMMA (sm_90) / HMMA (sm_80) instructions.

Run as ``python tests/compile_check.py [--quick]``; prints one JSON object per
compiled variant. Must run *without* TRITON_INTERPRET (kernels decorated
under the interpreter cannot be compiled); tests/test_compile.py starts it in
a clean subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

# the modules, not the launcher functions dft_ops.kernels re-exports under the same names
from dft_ops.backends.protocol import GradTerms, Head, SecondHead, Tokens, product_dtype

fwd = importlib.import_module("dft_ops.kernels.lse_forward")
bwd = importlib.import_module("dft_ops.kernels.fused_backward")
lgrad = importlib.import_module("dft_ops.kernels.logit_grad")
mix = importlib.import_module("dft_ops.kernels.mixture")

sys.path.insert(0, str(Path(__file__).parent))
import compile_cache  # noqa: E402  (tests/ is not a package)

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(hidden_dtype, weight_dtype, D: int, features: bool):
    """Small CPU stand-ins: sizes chosen so Triton specializes them like real heads (not 1, multiples of 16 or not)."""
    N, V, M = 48, 320, 40
    hidden = torch.randn(N, D, dtype=hidden_dtype)
    weight = torch.randn(V, D, dtype=weight_dtype)
    bias = torch.randn(V, dtype=weight_dtype) if features else None
    targets = torch.randint(0, V, (M,))
    rows = torch.arange(M) if features else None
    return hidden, weight, bias, targets, rows


def _dtypes(spec: str):
    """(hidden, weight, requested compute dtype) of "bf16", "fp32+bf16" (hidden+weight) or "fp32+fp32>bf16"."""
    inputs, _, compute = spec.partition(">")
    hidden, weight = (DTYPES[d] for d in (inputs.split("+") * 2)[:2])
    return hidden, weight, DTYPES[compute] if compute else None


def _second_head(spec: str, hidden_dtype, weight_dtype, compute_dtype, N: int, V: int):
    """The second head (ASFT's reference model) of a job's ``ref`` spec, "TERM[:dtype]" (its own hidden
    size 192, bias and soft-cap), or None for "". Its hidden states and weight take the model's two dtypes
    (a reference read under the same autocast: bf16 hidden states, an fp32 head), or both the one given."""
    if not spec:
        return None, ""
    term, _, dtype = spec.partition(":")
    hidden2_dtype, weight2_dtype = (DTYPES[dtype],) * 2 if dtype else (hidden_dtype, weight_dtype)
    D2 = 192
    second = SecondHead(torch.randn(N, D2, dtype=hidden2_dtype), torch.randn(V, D2, dtype=weight2_dtype),
                        torch.randn(V, dtype=weight2_dtype), 20.0,
                        product_dtype(hidden2_dtype, weight2_dtype, compute_dtype))
    return second, term


def _launch(kernel: str, dtypes: str, D: int, features: bool, ref: str = ""):
    """The library's launch with every optional feature on (``features``) or off, and the second head
    (``ref``: "stream" for the forward, "q" / "gap" / "mix" for a backward's forward KL / reverse KL /
    generalized JSD term, "mix" for the JSD's mixture pass)."""
    hidden_dtype, weight_dtype, compute_dtype = _dtypes(dtypes)
    hidden, weight, bias, targets, rows = _inputs(hidden_dtype, weight_dtype, D, features)
    V = weight.shape[0]
    second, term = _second_head(ref, hidden_dtype, weight_dtype, compute_dtype, hidden.shape[0], V)
    compute = product_dtype(hidden_dtype, weight_dtype, compute_dtype)
    head = Head(weight, bias, 30.0 if features else None, 0.7 if features else None, compute,
                torch.rand(V) if features else None, second, 0.3 if term == "mix" else None)
    tokens = Tokens(targets, rows)
    if kernel == "lse_forward":
        launch, _, _ = fwd.forward_launch(hidden, head, tokens, with_stats=features, smoothing=features, splits=4)
        return launch
    M, N = targets.numel(), hidden.shape[0]
    if kernel == "mixture":
        return mix.mixture_launch(hidden, head, tokens, torch.randn(M), torch.randn(M), splits=4)[0]
    f32 = torch.float32
    terms = GradTerms(torch.randn(M), torch.randn(M), torch.randn(M), torch.rand(M) if features else None,
                      torch.randn(M) if term == "q" else None, torch.randn(M) if term == "gap" else None,
                      torch.randn(M) if term else None, mix_gap=torch.randn(M) if term == "mix" else None)
    if kernel == "logit_grad":
        # a workspace row longer than the split (the last split of a sweep), precise (two parts) with features
        g = torch.empty(2, 32, V + 64, dtype=compute)
        split = slice(0, V - 16)
        return lgrad.logit_grad_launch(hidden, head, tokens, terms, g[0, :, split],
                                       g[1, :, split] if features and compute != f32 else None, 8, 40, 16, V)
    return bwd.backward_launch(
        hidden, head, tokens, terms, torch.ones(1) if features else None,
        torch.zeros(N, D, dtype=f32), torch.zeros(V, D, dtype=f32), torch.zeros(V, dtype=f32) if features else None,
        0, V, precise=features)


def compile_launch(launch, config, target: GPUTarget):
    """triton.compile the launch for ``target``, specialized as JITFunction.run would."""
    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = launch.kwargs(config)
    bound_args, specialization, _ = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, None)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([BIN / "nvdisasm", f.name], capture_output=True, text=True).stdout
    line = next(ln for ln in res.splitlines() if "REG:" in ln)
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    usage["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
    usage["hmma"] = len(re.findall(r"\bHMMA\b", sass))
    return usage


KERNELS = {"lse_forward": fwd, "fused_backward": bwd, "logit_grad": lgrad, "mixture": mix}
ARCHS = (80, 90)
FAMILY_DTYPES = {"16bit": ("bf16", "fp16"), "fp32": ("fp32",), "16bit+second": ("bf16",), "fp32+second": ("fp32",)}
# hidden+weight dtypes autocast produces (and fp32 inputs computed in autocast's bf16): fp32
# operands are rounded to bf16 in registers, so their wider tiles in shared memory and
# registers must fit the 16-bit configurations too
MIXED_DTYPES = ("fp32+bf16", "bf16+fp32", "fp32+fp32>bf16")
SHARED_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block, bytes
# the second-head variants of each kernel (see _launch)
SECOND_HEAD_TERMS = {"lse_forward": ("stream",), "fused_backward": ("q", "gap", "mix"),
                     "logit_grad": ("q", "gap", "mix"), "mixture": ("mix",)}


def check(job) -> dict:
    kernel, family, index, dtype_name, D, features, arch, ref = job
    config = KERNELS[kernel].CONFIGS[family][index]
    out = {"kernel": kernel, "dtype": dtype_name, "D": D, "features": features, "arch": arch, "config": str(config),
           "ref": ref, "triton": triton.__version__}
    try:
        launch = _launch(kernel, dtype_name, D, features, ref)
        if launch.family != family:
            raise AssertionError(f"the launch takes the {launch.family} configurations, not {family}")
        compiled = compile_launch(launch, config, GPUTarget("cuda", arch, 32))
        out.update(resource_usage(compiled.asm["cubin"]))
        out["shared_bytes"] = compiled.metadata.shared
        out["shared_limit"] = SHARED_LIMIT[arch]
    except Exception as e:  # reported, and failed, by the test
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    return out


def jobs(quick: bool):
    """Every configuration of every kernel, for sm_80 and sm_90: with every optional feature on
    (bias, softcap, temperature, rows, statistics, smoothing, class weights, the uniform term,
    filtering, d(bias), precise), also with mixed hidden/weight dtypes, with none, and with a
    hidden size no block divides (208: the masked tail step).
    Hidden sizes that are not multiples of 16 work but lose vectorized loads (a
    slower path, not held to the no-spill rule); real heads use multiples of 64.
    A configuration is built for the architectures it is offered on (``min_arch``):
    the no-spill rule holds per target.
    The "+second" configurations (a second head: ASFT's reference model, Distill's teacher) are built
    with it, every feature on and each term of a backward (the forward KL's q, the reverse
    KL's gap, the generalized JSD's mixture gap), in their family's dtype (the JSD's mixture pass,
    kernels/mixture.py, has only such configurations); "16bit+second" also with the mixed dtypes
    (model and reference alike, and autocast's model with a bf16 reference);
    "fp32+second" also for a bf16 model and for bf16 hidden states with an fp32
    head, each with an fp32 reference (whose fp32 products take those
    configurations)."""
    for kernel, module in KERNELS.items():
        for family, configs in module.CONFIGS.items():
            dtypes = FAMILY_DTYPES[family][:1] if quick else FAMILY_DTYPES[family]
            for index, config in enumerate(configs):
                for arch in (a for a in ARCHS if a >= config.min_arch):
                    if family.endswith("+second"):
                        for term in SECOND_HEAD_TERMS[kernel]:
                            yield kernel, family, index, dtypes[0], 256, True, arch, term
                            if quick:
                                continue
                            if family == "16bit+second":
                                for dtype in MIXED_DTYPES:
                                    yield kernel, family, index, dtype, 256, True, arch, term
                                # autocast's model beside a bf16 reference model
                                yield kernel, family, index, "bf16+fp32", 256, True, arch, f"{term}:bf16"
                            else:
                                for dtype in ("bf16", "bf16+fp32"):
                                    yield kernel, family, index, dtype, 256, True, arch, f"{term}:fp32"
                        continue
                    for dtype in dtypes:
                        yield kernel, family, index, dtype, 256, True, arch, ""
                    if not quick and family == "16bit":
                        for dtype in MIXED_DTYPES:
                            yield kernel, family, index, dtype, 256, True, arch, ""
                        yield kernel, family, index, "bf16+fp32", 256, False, arch, ""  # plain autocast
                    if not quick:
                        yield kernel, family, index, dtypes[0], 256, False, arch, ""
                        yield kernel, family, index, dtypes[0], 208, False, arch, ""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one dtype per family, all features on")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--second-head-only", action="store_true", help="only the second-head (ASFT) variants")
    parser.add_argument("--terms", nargs="+", help="only these second-head terms (e.g. mix)")
    args = parser.parse_args()
    todo = [job for job in jobs(args.quick) if job[0] in args.kernels and (job[-1] or not args.second_head_only)
            and (args.terms is None or job[-1].partition(":")[0] in args.terms)]
    return compile_cache.run(__file__, check, todo, args.workers)


if __name__ == "__main__":
    sys.exit(main())
