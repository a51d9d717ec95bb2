#!/usr/bin/env bash
# The decisive protocol's CIFAR-10-LT backbones (issue 13) on one GPU machine: every (IF, seed) is its own
# `evidence.py backbones --device cuda` process, all started at once (a ResNet-32 step at batch 256 is bound
# by kernel launches, so one process leaves the GPU mostly idle), under CUDA MPS where it starts. The heads are
# then evaluated on any machine with the same WORK (`evidence.py run` reuses the cached backbones; no GPU):
#
#   bash benchmarks/results/evidence_backbones_gpu.sh DATA WORK [IFS] [SEEDS]     # IFS "10 50 100", SEEDS "0 1 2 3 4"
#   python benchmarks/results/evidence.py run --dataset cifar10 --data-root DATA --imbalance-factor IF \
#       --seeds 0 1 2 3 4 --out benchmarks/results/measured/evidence --work WORK
#
# DATA: cifar-10-batches-py/ (the official pickles) or the cifar10-jpeg Parquet folder. Needs torch and
# torchvision only (no Ray, Polars or torchsort). Each process logs to WORK/logs/; its last line is a JSON line
# (backbone path, training seconds, balanced pool accuracy). Environment: PY (default python3), JOB_TIMEOUT
# (seconds per process, default 3600), MPS=0 to leave CUDA MPS off, EPOCHS (smoke runs only: such backbones are
# refused by `run`).
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash benchmarks/results/evidence_backbones_gpu.sh DATA WORK [IFS] [SEEDS]" >&2
    exit 2
fi
data=$(cd "$1" && pwd) || exit 2
mkdir -p "$2/logs" && work=$(cd "$2" && pwd) || exit 2
ifs=${3:-"10 50 100"} seeds=${4:-"0 1 2 3 4"}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-python3}
export OMP_NUM_THREADS=1  # one core per process: they run side by side
mps=0
if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/cact-mps CUDA_MPS_LOG_DIRECTORY=/tmp/cact-mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 60 "$PY" -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
        mps=1
        echo "CUDA MPS: on (kernels of the processes run concurrently)"
    else
        echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        echo "CUDA MPS: unavailable, the processes time-share the GPU"
    fi
fi
start=$(date +%s)
pids=()
for f in $ifs; do
    for s in $seeds; do
        timeout "${JOB_TIMEOUT:-3600}" "$PY" benchmarks/results/evidence.py backbones --dataset cifar10 \
            --data-root "$data" --imbalance-factor "$f" --seeds "$s" --work "$work" --device cuda \
            ${EPOCHS:+--epochs "$EPOCHS"} >"$work/logs/if$f-s$s.log" 2>&1 &
        pids+=($!)
    done
done
while :; do
    running=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=$((running + 1)); done
    [ "$running" = 0 ] && break
    echo "$(( $(date +%s) - start )) s: $running of ${#pids[@]} running; GPU" \
        "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
    sleep 30
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
[ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
echo "all done in $(( $(date +%s) - start )) s, $failed failed"
for f in "$work"/logs/*.log; do echo "$(basename "$f"): $(tail -n 1 "$f")"; done
exit $(( failed > 0 ))
