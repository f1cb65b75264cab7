"""The one-pass head's row-pass kernels compile for real GPUs (sm_80, sm_90) without spills.

compile_check_row_pass.py builds the launchers' own launches with every feature on and off, one
and two heads, each dtype of G, compiles them for a GPUTarget on this CPU machine and reads the
cubins with the Triton wheel's cuobjdump. It runs in a subprocess without TRITON_INTERPRET
(interpreted kernels cannot be compiled). Also checked: offsets into the workspace are int64
products (C * ld passes 2^31 at long context).
"""

import importlib
from pathlib import Path

import pytest

import compile_cache

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results(request):
    # minutes on a 2-core machine (its progress lines are shown); seconds when the kernels are unchanged
    return compile_cache.run_from_test(request, HERE / "compile_check_row_pass.py")


def _name(r):
    return f"{r['kernel']} {r['config']} {r['dtype']} {'+'.join(r['features']) or 'plain'} sm_{r['arch']}"


def test_every_configuration_was_compiled(results):
    rp = importlib.import_module("dft_ops.kernels.row_pass")
    # per configuration and architecture it is offered on: one head, off + all on + 5 (stats) / 4 (G)
    # features alone; two heads, per second-head term (stats 2: the KLs, and the JSD's mixture as well;
    # G 4: q + gap, q, gap, the JSD's mixture gap): alone, own soft-cap, all on.
    # G: fp32 and bf16 each, fp16 too with every feature on
    per_family = {("stats", "one"): 7, ("stats", "two"): 2 * 3,
                  ("grad", "one"): 2 * 6 + 1, ("grad", "two"): 4 * (2 * 3 + 1)}
    expected = 0
    for kernel, configs in (("stats", rp.STATS_CONFIGS), ("grad", rp.GRAD_CONFIGS)):
        for family, family_configs in configs.items():
            expected += per_family[kernel, family] * sum(arch >= c.min_arch for c in family_configs
                                                         for arch in (80, 90))
    assert len(results) == expected
    assert {r["kernel"] for r in results} == {"row_stats", "logit_grad"}
    assert {r["dtype"] for r in results if r["kernel"] == "logit_grad"} == {"fp32", "bf16", "fp16"}


def test_compiles_without_errors(results):
    errors = [f"{_name(r)}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_register_spills(results):
    spills = [f"{_name(r)}: stack {r['stack']} B, local {r['local']} B, {r['reg']} registers"
              for r in results if "error" not in r and (r["stack"] or r["local"])]
    assert not spills, "\n".join(spills)


def test_shared_memory_fits(results):
    over = [f"{_name(r)}: {r['shared_bytes']} > {r['shared_limit']}"
            for r in results if "error" not in r and r["shared_bytes"] > r["shared_limit"]]
    assert not over, "\n".join(over)


def test_offsets_are_int64(results):
    bad = [f"{_name(r)}: {line}" for r in results if "error" not in r for line in r["i32_products"]]
    assert not bad, "\n".join(bad)
