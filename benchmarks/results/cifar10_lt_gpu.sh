#!/usr/bin/env bash
# CIFAR-10-LT IF = 100, ResNet-32 with the LDAM protocol (200 epochs; pipelines/cifar10_lt.py defaults) for
# ce, ce_finetune, conftr and cact, then the GPU step ratio CaCT/CE (benchmarks/gpu_suite.sh). Issue 13, part 5.
#
#   bash benchmarks/results/cifar10_lt_gpu.sh DATA OUT                         # on a GPU machine
#   GPU=0 bash benchmarks/results/cifar10_lt_gpu.sh DATA OUT --epochs 2 --finetune-epochs 1 --n-splits 2   # CPU smoke
#
# DATA: cifar-10-batches-py/ (the official pickles) or a folder with train.parquet/test.parquet (cifar10-jpeg).
# Extra arguments go to the pipeline. PY: the Python to use (default .venv/bin/python if present, else python3).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash benchmarks/results/cifar10_lt_gpu.sh DATA OUT [pipeline flags...]" >&2
    exit 2
fi
data=$1 out=$2
shift 2
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
gpu_flags=()
if [ "${GPU:-1}" = 1 ]; then gpu_flags=(--use-gpu); fi
"$PY" pipelines/cifar10_lt.py --data-root "$data" --imbalance-factor 100 --methods ce,ce_finetune,conftr,cact \
    --out "$out/cifar10-lt-if100" "${gpu_flags[@]}" "$@"
if [ "${GPU:-1}" = 1 ]; then
    bash benchmarks/gpu_suite.sh "$out/gpu-suite"
fi
