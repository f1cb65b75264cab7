"""Every kernel configuration compiles for real GPUs (sm_80, sm_90) without spills.

The Triton interpreter is lenient: code it runs can fail to compile, spill
registers to local memory, or exceed shared memory on a GPU. compile_check.py
builds the library's own launches for a GPUTarget on this CPU machine and reads
the cubins with cuobjdump / nvdisasm from the Triton wheel. It runs in a
subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled).

The no-spill rule holds on the Triton versions the project supports (SUPPORTED_TRITON: the
GPU machines' 3.6 and the development machines' 3.9; the same CONFIGS lists must be clean on
both, as the code cannot tell at import which compiler will build it for a user). Under any
other version spills are reported (the test skips, listing them), not failed: a new compiler
is a finding to look at, not a broken build. To check 3.6 here: a venv with triton==3.6.0 and
torch==2.13.0 (e.g. /work/venvs/triton36), then `python tests/compile_check.py` in it.
"""

from pathlib import Path

import pytest
import triton

import compile_cache

HERE = Path(__file__).parent
SUPPORTED_TRITON = ("3.6", "3.9")
TRITON = ".".join(triton.__version__.split(".")[:2])


@pytest.fixture(scope="module")
def results(request):
    # minutes on a 2-core machine (its progress lines are shown); seconds when the kernels are unchanged
    return compile_cache.run_from_test(request, HERE / "compile_check.py")


def _name(r):
    ref = f" reference={r['ref']}" if r.get("ref") else ""
    return f"{r['kernel']} {r['config']} {r['dtype']} D={r['D']} features={r['features']} sm_{r['arch']}{ref}"


def test_every_configuration_was_compiled(results):
    import importlib

    expected = 0
    for mod in ("lse_forward", "fused_backward", "logit_grad", "mixture"):
        configs = importlib.import_module(f"dft_ops.kernels.{mod}").CONFIGS
        # per architecture it is offered on: a 16-bit config x (bf16, fp16, three mixed dtypes with every
        # feature; bf16 and bf16 hidden + fp32 head with none; D=208), an fp32 config x (every feature, none, D=208)
        # "+second" configs (the second head: ASFT's reference model, Distill's teacher), per second-head term
        # of the kernel (the forward and the JSD's mixture pass: one; a backward: q, gap, the JSD's mixture gap):
        # 16bit+second x (bf16, three mixed dtypes, bf16 hidden + fp32 head with a bf16 second head),
        # fp32+second x (fp32; bf16 and bf16 hidden + fp32 head with an fp32 second head)
        terms = 1 if mod in ("lse_forward", "mixture") else 3
        for family, per_arch in (("16bit", 8), ("fp32", 3), ("16bit+second", 5 * terms), ("fp32+second", 3 * terms)):
            expected += sum(per_arch * sum(arch >= c.min_arch for arch in (80, 90)) for c in configs.get(family, ()))
    assert len(results) == expected
    assert {r["triton"] for r in results} == {triton.__version__}  # the subprocess compiled with this Triton
    assert {r["ref"] for r in results} >= {"", "stream", "q", "gap", "mix", "q:fp32", "gap:fp32", "mix:fp32"}
    assert {r["kernel"] for r in results} == {"lse_forward", "fused_backward", "logit_grad", "mixture"}


def test_compiles_without_errors(results):
    errors = [f"{_name(r)}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_register_spills(results):
    spills = [f"{_name(r)}: stack {r['stack']} B, local {r['local']} B, {r['reg']} registers"
              for r in results if "error" not in r and (r["stack"] or r["local"])]
    if TRITON not in SUPPORTED_TRITON:
        pytest.skip(f"Triton {triton.__version__} is not one of the supported {SUPPORTED_TRITON}: "
                    f"{len(spills)} spilling variant(s)" + "".join(f"\n{s}" for s in spills))
    assert not spills, f"Triton {triton.__version__}:\n" + "\n".join(spills)


def test_shared_memory_fits(results):
    over = [f"{_name(r)}: {r['shared_bytes']} > {r['shared_limit']}"
            for r in results if "error" not in r and r["shared_bytes"] > r["shared_limit"]]
    assert not over, "\n".join(over)


def test_matrix_products_use_tensor_cores(results):
    bad = []
    for r in results:
        if "error" in r:
            continue
        if r["arch"] == 90 and r["dtype"] != "fp32" and not r["hgmma"]:
            bad.append(f"{_name(r)}: no HGMMA (Hopper warpgroup MMA)")
        if not (r["hgmma"] or r["hmma"]):
            bad.append(f"{_name(r)}: no tensor-core instruction at all")
    assert not bad, "\n".join(bad)
