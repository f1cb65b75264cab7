#!/usr/bin/env bash
# Download, on a machine with network, the wheels a GPU window needs on a device without network:
# the peers and what TRL's fused head imports that the device image lacks, for its Python 3.12 x86-64.
# They land in .whl/ (git-ignored); bench/gpu_run.sh installs them with pip --no-index --no-deps into
# /tmp/site. The device call names .whl in its carry list.
#
#   bash bench/fetch_wheels.sh            # prints each wheel and the total (checked against the carry limit)
#
# What the device has already (/work/.library/device/KINDS.md, read 2026-11-17), so not carried:
# torch 2.11, triton 3.6, transformers 5.17, accelerate 1.15, huggingface-hub 1.33, pandas, pyarrow,
# fsspec, xxhash, requests, tqdm, filelock, packaging, pyyaml, jinja2, psutil, numpy, pytest, matplotlib.
# Carried (one version each: two versions of one package stop pip's install there):
# - liger-kernel, cut-cross-entropy, trl: the peers (versions of the committed CPU results);
# - datasets, and its dill and multiprocess: TRL's backward imports trl.trainer.utils, which imports
#   datasets (if it still fails to import there, bench/providers.py gives the backward a nullcontext
#   stand-in for maybe_gather_lm_head_ctx and says so in the record). datasets 5.2 asks for
#   pyarrow >= 24 and fsspec <= 2026.9: pip does not check that with --no-deps; call1's probe imports it.
# All pure Python: 2.7 MB in all (measured 2026-12-01), far under the 64 MiB that a device call may
# carry together with the working tree (~2 MB tracked).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    liger-kernel==0.8.5
    cut-cross-entropy==25.1.1
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
CARRY_LIMIT=$((64 * 1024 * 1024))

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    rm -f .whl/"${name//-/_}"-*.whl .whl/"$name"-*.whl
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
count=$(ls .whl/*.whl | wc -l)
if [ "$count" != "${#WHEELS[@]}" ]; then
    echo "expected ${#WHEELS[@]} wheels in .whl/, found $count: remove the stale ones" >&2
    exit 1
fi
ls -l .whl
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z 2>/dev/null | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1 || echo 0)
echo "wheels: $wheels bytes; tracked tree: $tree bytes; together $((wheels + tree)) of $CARRY_LIMIT"
if [ $((wheels + tree)) -gt "$CARRY_LIMIT" ]; then
    echo "over the device's carry limit" >&2
    exit 1
fi
