#!/usr/bin/env bash
# One 15-minute GPU window in two device calls (docs/benchmarks/README.md has the plan and its estimates).
#
#   bash bench/gpu_run.sh STEP [OUT_DIR]        # OUT_DIR defaults to $OUT (the device's), else /tmp/dft-ops-gpu-out
#
# STEP:
#   call1  (<= 5 min) environment probe, carried wheels, float64 smoke check of every dft-ops mode at the
#          Llama-3-8B head x 4k tokens (bf16 and fp32, DFT and CE), then the curated GPU tests (pytest -m
#          gpu_smoke) with one tile configuration forced (DFT_OPS_CONFIG=0: nothing is tuned).
#          Writes: gpu_run.log, probe.json, smoke.json, smoke.md, gpu-tests.log, gpu-tests.xml
#   call2  (<= 8 min, right after call1 while the machine is warm) the headline benchmark: python -m bench
#          --suite goals (Llama-3-8B @ 16k DFT and CE, Gemma-2-2B @ 8k, Qwen2.5-7B @ 128k; every dft-ops mode,
#          then Liger, Cut Cross-Entropy exact and filtered, TRL, torch.compile, plain PyTorch), >= 5 timed
#          runs each, every provider checked against float64 first; then the goal lines.
#          Writes: gpu_run.log, <gpu>.json, <gpu>.md, goals.txt
#   asft   the ASFT case (python -m bench.asft, 4k and 16k tokens, both KL directions)
#   rl     the RL case (python -m bench.token_logprobs: per-token log-probs + entropies, Llama-3-8B and Qwen2.5-7B
#          heads at 4k and 16k tokens, bf16; dft-ops vs materialized PyTorch)
#   distill the distillation case (python -m bench.distill: generalized JSD to a teacher head, 4k and 16k tokens,
#          dft-ops vs Liger's LigerFusedLinearJSD and chunked JSD loss vs materialized PyTorch)
#   sweep  the "gemm" backward's workspace sweep (python -m bench --workspace-sweep)
#   tests  the GPU tests not in the curated set (pytest -m "not gpu_smoke"), tuner on, for the time given
# Every result file is written into OUT_DIR as soon as it exists (flat, at most 8 files), so a call cut at
# its limit still returns what it measured. Commit them as docs/benchmarks/README.md says.
#
# The device has python3 with torch and triton but no network: the peers come as wheels in .whl/
# (bash bench/fetch_wheels.sh here; name .whl in the device call's carry), installed into /tmp/site
# (PYTHONPATH); dft-ops itself is installed from this tree without an index (pip -e . --no-deps).
#
# Environment: PYTHON (default python3); DFT_OPS_COMMIT (the commit measured: the device's copy of the tree
# has no .git); BUDGET_S (seconds this call may take in all, default 270 for call1, 450 for call2, 540 else);
# BENCH_ARGS (extra arguments for python -m bench in call2). A CPU dry run of the whole plan (tests/test_gpu_plan.py)
# sets BENCH_DRY_RUN=1 (no GPU needed) and replaces the heavy parts: BENCH_SMOKE_ARGS (python -m bench.smoke),
# BENCH_TEST_ARGS (pytest's selection, default "-m gpu_smoke" and the files of tests/gpu_smoke.py), BENCH_TEST_EXTRA
# (arguments added to it, e.g. --collect-only), BENCH_SUITE_ARGS (default "--suite goals"), BENCH_PREVIOUS (the
# committed results call2 starts from, default docs/benchmarks; the dry run gives an empty folder: this machine's
# own committed CPU results would otherwise be merged into its output).
set -uo pipefail
cd "$(dirname "$0")/.."

step=${1:-}
[ "$step" = bench ] && step=call2  # the old name of the benchmark step (docs/backward.md)
case "$step" in
    call1|call2|asft|rl|distill|sweep|tests) shift ;;
    *) echo "usage: bash bench/gpu_run.sh call1|call2|asft|rl|distill|sweep|tests [OUT_DIR]" >&2; exit 2 ;;
esac
out=${1:-${OUT:-/tmp/dft-ops-gpu-out}}
case "$step" in
    call1) budget=${BUDGET_S:-270} ;;
    call2) budget=${BUDGET_S:-450} ;;
    *) budget=${BUDGET_S:-540} ;;
esac
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$SECONDS
mkdir -p "$out"
left() { echo $((budget - (SECONDS - start))); }
say() { echo; echo "=== $* ($((SECONDS - start)) s of $budget)"; }

install() {
    device_line
    say "install carried wheels and dft-ops"
    if [ -n "${BENCH_DRY_RUN:-}" ]; then
        echo "dry run: carried wheels not installed (they are for the device's Python 3.12)"
    elif compgen -G ".whl/*.whl" >/dev/null; then
        stamp=$(ls .whl/*.whl | sort | tr '\n' ' ')
        # installed once per machine: a second call on the warm machine finds the stamp
        if [ "$(cat /tmp/site/.bench-wheels 2>/dev/null)" != "$stamp" ]; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl && echo "$stamp" > /tmp/site/.bench-wheels
        fi
        if [ "$(cat /tmp/site/.bench-wheels 2>/dev/null)" = "$stamp" ]; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
            ls .whl
        else
            echo "the carried wheels did not install: the peers this image lacks are reported as skipped"
        fi
    else
        echo "no .whl/: the peers this image lacks are reported as skipped (bash bench/fetch_wheels.sh makes them)"
    fi
    if [ -n "${BENCH_DRY_RUN:-}" ]; then
        echo "dry run: dft-ops as importable here"
    elif ! "$PY" -c "import dft_ops, pathlib, sys; sys.exit(pathlib.Path(dft_ops.__file__).parent != pathlib.Path('dft_ops').resolve())" 2>/dev/null; then
        # (kernels/ is dft_ops.kernels only through setup.py's package_dir: PYTHONPATH=. alone would not do)
        if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
            echo "editable install failed; installing a copy into /tmp/site"
            "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . \
                && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        fi
    fi
    if [ -z "${DFT_OPS_COMMIT:-}" ]; then
        DFT_OPS_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    fi
    export DFT_OPS_COMMIT
    echo "commit measured: $DFT_OPS_COMMIT"
}

device_line() {  # every log says which device and versions produced it
    "$PY" -c "import platform, torch, triton; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'CPU (no CUDA device)', '| python', platform.python_version(), '| torch', torch.__version__, '| triton', \
triton.__version__, '| commit', '${DFT_OPS_COMMIT:-unknown}')"
}

need_gpu() {
    if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && [ -z "${BENCH_DRY_RUN:-}" ]; then
        echo "no CUDA device: this script is for a GPU window (BENCH_DRY_RUN=1 runs it as a dry run)"
        exit 2
    fi
}

call1() {
    install
    say "environment probe"
    "$PY" -m bench.probe --out "$out"
    probe_rc=$?
    need_gpu
    # one tile configuration per kernel: no tuner trials, the fewest compiles
    export DFT_OPS_CONFIG=${DFT_OPS_CONFIG:-0}
    say "float64 smoke check of every dft-ops mode (DFT_OPS_CONFIG=$DFT_OPS_CONFIG)"
    # shellcheck disable=SC2086
    timeout --signal=INT "$(( $(left) / 2 ))" "$PY" -m bench.smoke --out "$out" ${BENCH_SMOKE_ARGS:-}
    smoke_rc=$?
    # six workers compile in parallel (Triton compiles in the launching process; the device has 16 cores)
    workers=""
    if [ -z "${BENCH_TEST_ARGS:-}${BENCH_TEST_EXTRA:-}" ] && "$PY" -c "import xdist" 2>/dev/null; then
        workers="-n ${BENCH_TEST_WORKERS:-6} --dist loadgroup"
    fi
    # only the files the curated set lives in: collecting all of tests/ imports transformers, TRL, ... per worker
    files=$("$PY" -c "import sys; sys.path.insert(0, 'tests'); from gpu_smoke import GPU_SMOKE; \
print(' '.join(sorted({i.split('::')[0] for i in GPU_SMOKE})))")
    say "curated GPU tests (pytest -m gpu_smoke $workers), at most $(( $(left) - 15 )) s"
    device_line > "$out/gpu-tests.log"
    # shellcheck disable=SC2086
    timeout --signal=INT "$(( $(left) - 15 ))" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" $workers \
        --junitxml="$out/gpu-tests.xml" --durations=15 ${BENCH_TEST_ARGS:--m gpu_smoke $files} ${BENCH_TEST_EXTRA:-} 2>&1 \
        | tee -a "$out/gpu-tests.log"
    test_rc=${PIPESTATUS[0]}
    say "call1 done: probe $probe_rc, smoke $smoke_rc, tests $test_rc (124: stopped at the time limit)"
}

call2() {
    install
    need_gpu
    # (no separate `python -m bench --list`: the run prints every skipped provider with its reason)
    bench_budget=$(( $(left) - 25 ))
    say "benchmark ${BENCH_SUITE_ARGS:---suite goals}, time budget $bench_budget s"
    # --previous: the committed results of this GPU, if any, are the starting point (merged case by case)
    # shellcheck disable=SC2086
    "$PY" -m bench ${BENCH_SUITE_ARGS:---suite goals} --out "$out" --previous "${BENCH_PREVIOUS:-docs/benchmarks}" \
        --time-budget "$bench_budget" --no-plots ${BENCH_ARGS:-}
    bench_rc=$?
    say "goal lines"
    "$PY" -m bench --goals --out "$out" | tee "$out/goals.txt"
    say "call2 done: benchmark exit status $bench_rc"
}

asft() {
    install
    need_gpu
    share=2  # the forward KL gets half of what is left, the reverse KL the rest
    for direction in forward reverse; do
        say "ASFT case, $direction KL"
        # shellcheck disable=SC2086
        timeout --signal=INT "$(( ($(left) - 20) / share ))" \
            "$PY" -m bench.asft ${BENCH_ASFT_ARGS:---tokens 4k 16k} --direction "$direction" --out "$out"
        share=1
    done
}

rl() {
    install
    need_gpu
    say "RL case: per-token log-probs and entropies"
    # shellcheck disable=SC2086
    timeout --signal=INT "$(( $(left) - 20 ))" "$PY" -m bench.token_logprobs ${BENCH_RL_ARGS:-} --out "$out"
}

distill() {
    install
    need_gpu
    say "distillation case, JSD beta 0.5"
    # shellcheck disable=SC2086
    timeout --signal=INT "$(( $(left) - 20 ))" \
        "$PY" -m bench.distill ${BENCH_DISTILL_ARGS:---tokens 4k 16k} --out "$out"
}

sweep() {
    install
    need_gpu
    say "workspace sweep"
    # shellcheck disable=SC2086
    "$PY" -m bench --workspace-sweep ${BENCH_SWEEP_ARGS:-} --out "$out" --time-budget "$(( $(left) - 20 ))" \
        --no-plots ${BENCH_ARGS:-}
}

tests() {
    install
    need_gpu
    say "the GPU tests outside the curated set, at most $(( $(left) - 15 )) s"
    device_line > "$out/gpu-tests-rest.log"
    # shellcheck disable=SC2086
    timeout --signal=INT "$(( $(left) - 15 ))" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
        --junitxml="$out/gpu-tests-rest.xml" ${BENCH_TEST_ARGS:--m "not gpu_smoke" tests} 2>&1 \
        | tee -a "$out/gpu-tests-rest.log"
}

"$step" 2>&1 | tee "$out/gpu_run.log"
rc=${PIPESTATUS[0]}
echo "files in $out:"; ls -l "$out"
exit "$rc"
