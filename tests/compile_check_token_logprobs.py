"""Compile the kernel variants of ``dft_ops.token_logprobs`` for real GPUs (sm_80, sm_90) on a machine without one.

The per-token API switches on two constexprs no other call does: ``TOKEN_TEMPERATURE`` (a temperature per
token, in the forward and both backwards) and ``HAS_ENTROPY`` (the entropy's ``k s log s`` term of G, in
both backwards). This builds the library's own launches with them on, for every configuration of the
families those calls take (the forward's "16bit" and "fp32"; the backwards' "16bit+second" and "fp32+second",
whose tiles leave room for the extra live values; token_logprobs has no second head), and reports registers,
stack / local memory (spills), shared memory and tensor-core instructions as tests/compile_check.py does
(whose compile and read-back functions it uses). Variants per configuration: every feature the calls can
have on (bias, soft-cap, ignored tokens' rows, statistics, d(bias), precise) in each dtype of the family
and with autocast's mixed dtypes; and none but the two flags.

Run as ``python tests/compile_check_token_logprobs.py`` without TRITON_INTERPRET (tests/test_compile.py
starts it in a clean subprocess); one JSON object per compiled variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
from triton.backends.compiler import GPUTarget

import compile_check as cc
from dft_ops.backends.protocol import GradTerms, Head, Tokens, product_dtype

TOKEN_KERNELS = ("lse_forward", "fused_backward", "logit_grad")
"""The kernels token_logprobs launches (not the mixture pass, which needs a second head)."""
FAMILY_DTYPES = {"16bit": ("bf16", "fp16", "bf16+fp32", "fp32+bf16"), "fp32": ("fp32",)}
# the backward kernels' launches take the tiles that leave room for more live values (kernels/logit_grad.py:
# gradient_family); the forward its plain ones
TAKEN = {(kernel, base): base + "+second" for kernel in ("logit_grad", "fused_backward") for base in ("16bit", "fp32")}


def launch(kernel: str, dtypes: str, features: bool):
    """The library's launch of ``kernel`` for a token_logprobs call, every optional feature on or off."""
    hidden_dtype, weight_dtype, compute_dtype = cc._dtypes(dtypes)
    hidden, weight, bias, targets, rows = cc._inputs(hidden_dtype, weight_dtype, 256, features)
    V, M, N, D = weight.shape[0], targets.numel(), hidden.shape[0], hidden.shape[1]
    compute = product_dtype(hidden_dtype, weight_dtype, compute_dtype)
    head = Head(weight, bias, 30.0 if features else None, None, compute)
    tokens = Tokens(targets, rows, torch.rand(M) + 0.5)
    if kernel == "lse_forward":
        return cc.fwd.forward_launch(hidden, head, tokens, with_stats=True, smoothing=False, splits=4)[0]
    terms = GradTerms(torch.randn(M), torch.randn(M), torch.randn(M), entropy=torch.randn(M))
    f32 = torch.float32
    if kernel == "logit_grad":
        g = torch.empty(2, 32, V + 64, dtype=compute)
        split = slice(0, V - 16)
        return cc.lgrad.logit_grad_launch(hidden, head, tokens, terms, g[0, :, split],
                                          g[1, :, split] if features and compute != f32 else None, 8, 40, 16, V)
    return cc.bwd.backward_launch(hidden, head, tokens, terms, None, torch.zeros(N, D, dtype=f32),
                                  torch.zeros(V, D, dtype=f32), torch.zeros(V, dtype=f32) if features else None,
                                  0, V, precise=features)


def check(job) -> dict:
    kernel, family, index, dtypes, features, arch = job
    config = cc.KERNELS[kernel].CONFIGS[family][index]
    out = {"kernel": kernel, "dtype": dtypes, "D": 256, "features": features, "arch": arch, "config": str(config),
           "ref": "token_logprobs", "triton": cc.triton.__version__}
    try:
        built = launch(kernel, dtypes, features)
        assert built.constexprs["TOKEN_TEMPERATURE"] and built.constexprs.get("HAS_ENTROPY", True)
        if built.family != family:
            raise AssertionError(f"the launch takes the {built.family} configurations, not {family}")
        compiled = cc.compile_launch(built, config, GPUTarget("cuda", arch, 32))
        out.update(cc.resource_usage(compiled.asm["cubin"]))
        out["shared_bytes"] = compiled.metadata.shared
        out["shared_limit"] = cc.SHARED_LIMIT[arch]
    except Exception as e:  # reported, and failed, by the test
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    return out


def jobs():
    for kernel in TOKEN_KERNELS:
        module = cc.KERNELS[kernel]
        for base, dtypes in FAMILY_DTYPES.items():
            family = TAKEN.get((kernel, base), base)
            for index, config in enumerate(module.CONFIGS[family]):
                for arch in (a for a in cc.ARCHS if a >= config.min_arch):
                    for dtype in dtypes:
                        yield kernel, family, index, dtype, True, arch
                    yield kernel, family, index, dtypes[0], False, arch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with ProcessPoolExecutor(args.workers) as pool:
        for result in pool.map(check, list(jobs())):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
