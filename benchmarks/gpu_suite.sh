#!/usr/bin/env bash
# The GPU suite end to end on a fresh GPU machine (docs/BENCHMARKS.md, "GPU suite"):
#   bash benchmarks/gpu_suite.sh OUT_DIR [gpu_suite.py options...]
# 1. checks the GPU (nvidia-smi, torch.cuda);
# 2. makes torchsort importable with its CUDA extension: skipped when it already is; otherwise builds the
#    torchsort 0.1.10 source archive against this machine's torch into $SITE (default /tmp/site, put first on
#    PYTHONPATH), from .whl/torchsort-*.tar.gz (see ../shared/ENVIRONMENT.md: the offline GPU machine reaches no
#    registry, so carry .whl/ made by ../shared/tools/offline-gpu-wheels.sh beside the checkout), or from the
#    package index where one is reachable (about 100 s on 16 cores);
# 3. runs benchmarks/gpu_suite.py --device cuda --out OUT_DIR/gpu_suite.json (log: OUT_DIR/gpu_suite.log) and
#    prints the JSON's path. About 3-4 minutes on an H100/H200, build included; the suite itself is stopped after
#    $SUITE_TIMEOUT seconds (default 480) so the whole stays under 10 minutes.
# Environment: PY (the Python with torch; default .venv/bin/python if present, else python3), SITE,
# TORCH_CUDA_ARCH_LIST (default: this GPU's compute capability), MAX_JOBS (default: nproc), SUITE_TIMEOUT.
# Needs no Ray, Polars or network: the suite imports cact_ops and benchmarks/train_overhead.py only.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [gpu_suite.py options...]" >&2
    exit 2
fi
out=$1
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
SITE=${SITE:-/tmp/site}
start=$(date +%s)

# --- 1. the GPU ---------------------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_suite.sh: nvidia-smi not found: not a GPU machine (the CPU smoke form is" \
         "'python benchmarks/gpu_suite.py --device cpu --smoke')" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader \
    | tee "$out/nvidia-smi.txt"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: $PY's torch sees no CUDA device" >&2
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

# --- 2. torchsort with its CUDA extension -------------------------------------------------------------------
torchsort_cuda_ok() {
    "$PY" - <<'EOF' >/dev/null 2>&1
import torch, torchsort
from torchsort import isotonic_cuda  # noqa: F401  (absent when torchsort was built without CUDA)
x = torch.randn(2, 16, device="cuda", requires_grad=True)
torchsort.soft_sort(x).sum().backward()
torch.cuda.synchronize()
EOF
}

if torchsort_cuda_ok; then
    echo "torchsort with CUDA: already importable, not rebuilt"
elif PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" torchsort_cuda_ok; then
    echo "torchsort with CUDA: already built in $SITE"
else
    mkdir -p "$SITE"
    # nvcc: torchsort's setup.py builds the CUDA extension only where nvcc runs (CUDA_HOME or PATH)
    if ! command -v nvcc >/dev/null 2>&1; then
        for d in "${CUDA_HOME:-}" /usr/local/cuda; do
            if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then
                export CUDA_HOME=$d PATH="$d/bin:$PATH"
                break
            fi
        done
    fi
    command -v nvcc >/dev/null 2>&1 || echo "gpu_suite.sh: warning: no nvcc found: torchsort will build" \
        "without CUDA and the CaCT step on CUDA will fail (recorded in the JSON)" >&2
    arch=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}
    src=""
    for f in .whl/torchsort-*.tar.gz ../.whl/torchsort-*.tar.gz; do
        if [ -f "$f" ]; then src=$f; break; fi
    done
    if [ -z "$src" ]; then
        src=torchsort==0.1.10
        echo "gpu_suite.sh: no .whl/torchsort-*.tar.gz: trying the package index for $src" >&2
        index=()
    else
        index=(--no-index)
    fi
    echo "building torchsort ($src) with CUDA for arch $arch into $SITE ..."
    t0=$(date +%s)
    TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q \
        ${index[@]+"${index[@]}"} --no-deps --no-build-isolation --upgrade --target "$SITE" "$src"
    echo "torchsort built in $(( $(date +%s) - t0 )) s"
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if torchsort_cuda_ok; then
        echo "torchsort with CUDA: ok"
    else
        echo "gpu_suite.sh: warning: torchsort still has no working CUDA extension (the suite records it)" >&2
    fi
fi
case ":${PYTHONPATH:-}:" in
    *":$SITE:"*) ;;
    *) if [ -d "$SITE/torchsort" ]; then export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi ;;
esac

# --- 3. the suite -------------------------------------------------------------------------------------------
set +e
timeout "${SUITE_TIMEOUT:-480}" "$PY" benchmarks/gpu_suite.py --device cuda --out "$out/gpu_suite.json" "$@" \
    2>&1 | tee "$out/gpu_suite.log"
rc=${PIPESTATUS[0]}
set -e
echo "gpu_suite.sh: exit status $rc, $(( $(date +%s) - start )) s in all"
if [ -f "$out/gpu_suite.json" ]; then
    echo "$out/gpu_suite.json"
else
    echo "gpu_suite.sh: no JSON written (see $out/gpu_suite.log)" >&2
fi
exit "$rc"
