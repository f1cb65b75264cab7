"""The kernel variants of dft_ops.token_logprobs compile for real GPUs (sm_80, sm_90) without spills.

A temperature per token (``TOKEN_TEMPERATURE``) and the entropy's gradient term (``HAS_ENTROPY``) are on
in no other call: tests/compile_check_token_logprobs.py builds those launches for every configuration of
the families they take (the forward's "16bit" / "fp32"; the backwards' "16bit+second" / "fp32+second",
kernels/logit_grad.py: gradient_family), in a clean subprocess (no TRITON_INTERPRET), with the rules of
tests/test_compile.py (no spills on the supported Triton versions, shared memory within the limit,
tensor-core products). For Triton 3.6 (the GPU machines'), run the script under that Triton (its venv
/work/venvs/triton36 maps dft_ops to another checkout: point it at this one first).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_compile import SUPPORTED_TRITON, TRITON, _name

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "compile_check_token_logprobs.py")], capture_output=True,
                          text=True, env=env, timeout=1500, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stderr[-4000:]
    return rows


def test_every_configuration_was_compiled(results):
    import importlib

    expected = 0
    for mod in ("lse_forward", "fused_backward", "logit_grad"):
        configs = importlib.import_module(f"dft_ops.kernels.{mod}").CONFIGS
        # per architecture a configuration is offered on: 16-bit x (bf16, fp16, two mixed pairs; bf16 with no
        # other feature), fp32 x (every feature, none)
        for family, per_arch in (("16bit", 5), ("fp32", 2)):
            family = family if mod == "lse_forward" else family + "+second"
            expected += sum(per_arch * sum(arch >= c.min_arch for arch in (80, 90)) for c in configs[family])
    assert len(results) == expected
    assert {r["kernel"] for r in results} == {"lse_forward", "fused_backward", "logit_grad"}


def test_compiles_without_errors(results):
    errors = [f"{_name(r)}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_register_spills(results):
    spills = [f"{_name(r)}: stack {r['stack']} B, local {r['local']} B, {r['reg']} registers"
              for r in results if "error" not in r and (r["stack"] or r["local"])]
    if TRITON not in SUPPORTED_TRITON:
        pytest.skip(f"Triton {TRITON} is not one of the supported {SUPPORTED_TRITON}: {len(spills)} spilling "
                    "variant(s)" + "".join(f"\n{s}" for s in spills))
    assert not spills, "\n".join(spills)


def test_shared_memory_fits(results):
    over = [f"{_name(r)}: {r['shared_bytes']} > {r['shared_limit']}"
            for r in results if "error" not in r and r["shared_bytes"] > r["shared_limit"]]
    assert not over, "\n".join(over)


def test_matrix_products_use_tensor_cores(results):
    bad = [f"{_name(r)}: no HGMMA" for r in results
           if "error" not in r and r["arch"] == 90 and r["dtype"] != "fp32" and not r["hgmma"]]
    bad += [f"{_name(r)}: no tensor-core instruction" for r in results
            if "error" not in r and not (r["hgmma"] or r["hmma"])]
    assert not bad, "\n".join(bad)
