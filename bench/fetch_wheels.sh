#!/usr/bin/env bash
# Download, on a machine with network, the wheels the benchmark needs on a GPU machine that has
# torch, triton, transformers, accelerate, pandas and pyarrow but no network (Python 3.12, x86-64):
# the peers (Liger-Kernel, Cut Cross-Entropy, TRL) and what TRL imports that such an image lacks
# (datasets, and datasets' dill and multiprocess). All pure Python, about 3 MB.
# They land in .whl/ (git-ignored); bench/gpu_run.sh installs them with pip --no-index.
#
#   bash bench/fetch_wheels.sh            # then carry .whl to the GPU machine with the working tree
set -euo pipefail
cd "$(dirname "$0")/.."

# the versions the committed CPU results were measured with
WHEELS=(
    liger-kernel==0.8.5
    cut-cross-entropy==25.1.1
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p .whl
# one version of each package: two would stop the install on the GPU machine
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    rm -f .whl/"${name//-/_}"-*.whl .whl/"$name"-*.whl
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
ls -l .whl
du -sh .whl
