#!/usr/bin/env bash
# A short GPU window: check, benchmark, write everything to one folder.
#
#   bash bench/gpu_run.sh [STEP] [OUT_DIR]   # OUT_DIR defaults to $OUT, else /tmp/dft-ops-bench-gpu-out
#
# STEP, one per device command so that neither starves the other (each has the whole budget):
#   tests  - the GPU test suite: pytest -q tests
#   bench  - the benchmark, suite "gpu" (every provider, every dft-ops mode: dft-ops as shipped,
#            dft-ops-gemm, dft-ops-fused, dft-ops-filter): the goal cases first, cut by the time left;
#            then the goal lines (python -m bench --goals)
#   sweep  - the "gemm" backward's workspace sweep (python -m bench --workspace-sweep): memory vs time
#   asft   - the ASFT case (python -m bench.asft): llama3-8b head at 4k and 16k tokens, both KL directions,
#            dft-ops fused vs Unsloth-style vs plain PyTorch
#   all    - (the default) tests for at most BENCH_TEST_S seconds, then bench with the time left
#
# For a GPU machine that has python3 with torch and triton but no network: the peers come as
# wheels in .whl/ (bench/fetch_wheels.sh makes them; carry .whl along), dft-ops is installed from
# this tree without network (every step first installs .whl/*.whl into /tmp/site (PYTHONPATH) and
# dft-ops itself, pip -e . without an index). A step keeps within BENCH_BUDGET_S seconds (default
# 540, under a 10-minute command limit). Results merge into a copy of docs/benchmarks, so earlier
# GPU results are kept.
#
# In OUT_DIR (at most 8 files, flat): gpu_run.log, goals.txt, <gpu>.json, <gpu>.md and
# bench-results.tar.gz (the GPU JSON and Markdown files, their PNG plots, goals.txt, gpu-tests.log).
# Unpack it into docs/benchmarks/ and commit:  tar xzf bench-results.tar.gz -C docs/benchmarks
#
# Environment: PYTHON (default python3), BENCH_BUDGET_S, BENCH_TEST_S (default 150, step "all"),
# DFT_OPS_COMMIT (the commit being measured, when the tree has no .git), BENCH_ARGS (extra
# arguments for python -m bench, e.g. "--inputs peaked random"), BENCH_SUITE_ARGS (default
# "--suite gpu"; setting it also lets the script run without a GPU, as a dry run of the script:
# BENCH_SUITE_ARGS="--suite cpu --tokens 64" BENCH_TEST_S=5 PYTHON=.venv/bin/python bash bench/gpu_run.sh /tmp/x).
set -uo pipefail
cd "$(dirname "$0")/.."

what=all
case "${1:-}" in
    all|tests|bench|sweep|asft) what=$1; shift ;;
esac
out=${1:-${OUT:-/tmp/dft-ops-bench-gpu-out}}
budget=${BENCH_BUDGET_S:-540}
test_budget=${BENCH_TEST_S:-150}
PY=${PYTHON:-python3}
work=/tmp/dft-ops-bench-results
start=$SECONDS
mkdir -p "$out"
rm -rf "$work" && mkdir -p "$work"
cp -r docs/benchmarks/. "$work"/ 2>/dev/null || true
left() { echo $((budget - (SECONDS - start))); }
step() { echo; echo "=== $* ($((SECONDS - start)) s)"; }

main() {
step "machine"
nvidia-smi -L || echo "nvidia-smi: none"
"$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && [ -z "${BENCH_SUITE_ARGS:-}" ]; then
    echo "no CUDA device: this script is for a GPU machine (make bench runs the CPU benchmark)"
    return 2
fi

step "install carried wheels and dft-ops"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    ls .whl
else
    echo "no .whl/: peers not installed here are reported as skipped (bash bench/fetch_wheels.sh makes them)"
fi
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
    echo "editable install failed; installing a copy into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${DFT_OPS_COMMIT:-}" ]; then
    DFT_OPS_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    export DFT_OPS_COMMIT
fi
echo "commit: $DFT_OPS_COMMIT"
"$PY" -m bench --list

test_rc=skipped
if [ "$what" = tests ] || [ "$what" = all ]; then
    [ "$what" = tests ] && test_budget=$(( $(left) - 30 ))
    step "GPU tests (at most ${test_budget} s)"
    timeout --signal=INT "$test_budget" "$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$work/gpu-tests.log"
    test_rc=${PIPESTATUS[0]}
    [ "$test_rc" = 124 ] && echo "GPU tests: stopped after ${test_budget} s"
    echo "GPU tests exit status: $test_rc"
fi

# margin for the provider running when the budget ends, the plots and the archive
bench_budget=$(( $(left) - 60 ))
if [ "$what" = bench ] || [ "$what" = all ]; then
    suite_args=${BENCH_SUITE_ARGS:---suite gpu}
    step "benchmark: $suite_args, time budget ${bench_budget} s"
    if [ "$bench_budget" -gt 30 ]; then
        # shellcheck disable=SC2086
        "$PY" -m bench $suite_args --out "$work" --time-budget "$bench_budget" ${BENCH_ARGS:-}
    else
        echo "no time left for the benchmark"
    fi
fi
if [ "$what" = sweep ]; then
    step "workspace sweep, time budget ${bench_budget} s"
    # shellcheck disable=SC2086
    "$PY" -m bench --workspace-sweep --out "$work" --time-budget "$bench_budget" ${BENCH_ARGS:-}
fi

if [ "$what" = asft ]; then
    for direction in forward reverse; do
        step "ASFT case, $direction KL"
        timeout --signal=INT "$(( $(left) - 60 ))" "$PY" -m bench.asft --tokens 4k 16k --direction "$direction" \
            --out "$work"
    done
fi

step "goals"
"$PY" -m bench --goals --out "$work" | tee "$work/goals.txt"
cp "$work/goals.txt" "$out/"

step "results"
gpu_json=$("$PY" - "$work" <<'EOF'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        if json.loads(p.read_text()).get("device_kind") == "cuda":
            print(p)
    except ValueError:
        pass
EOF
)
# the archive holds what this run made or changed: the GPU result files, their plots, the logs
files=(goals.txt)
[ -e "$work/gpu-tests.log" ] && files+=(gpu-tests.log)
for f in $gpu_json; do
    cp "$f" "${f%.json}.md" "$out/" 2>/dev/null
    stem=$(basename "${f%.json}")
    for g in "$work/$stem".json "$work/$stem".md "$work/$stem"-*.png; do
        [ -e "$g" ] && files+=("$(basename "$g")")
    done
done
tar czf "$out/bench-results.tar.gz" -C "$work" "${files[@]}"
tar tzf "$out/bench-results.tar.gz"
ls -l "$out"
echo "step $what done in $((SECONDS - start)) s; tests exit status $test_rc"
}

main 2>&1 | tee "$out/gpu_run.log"
exit "${PIPESTATUS[0]}"
