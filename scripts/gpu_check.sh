#!/usr/bin/env bash
# One command for a GPU machine: bash scripts/gpu_check.sh [REPORT.md]
#
# Runs, on the Python found on PATH (or $PYTHON) and the first visible CUDA GPU:
#   1. the CUDA tests (pytest -k cuda: the Triton kernels compiled for this GPU against fp64, fp32/fp16/bf16);
#   2. python -m kernels.bench with bf16 and with fp32 inputs (time, TFLOP/s and memory against the naive path);
#   3. scripts/rehearsal.py: random models of the real sizes, one optimiser step of the Reddit preset, and the full
#      `python alol.py --task reddit` command at the preset's batch (8 x 2) and lengths, 64 training examples and 32
#      test prompts (one full generation batch);
# and writes every figure to one report file (default gpu_check-<host>-<time>.md). It installs nothing: GPU
# machines are often offline. A missing package is named in one line; without CUDA it stops within seconds.
# Expected run time on one H100: about 5 minutes (not measured: no GPU was available when this was written).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
REPORT=${1:-gpu_check-$(hostname)-$(date +%Y%m%d-%H%M%S).md}

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no '$PY' on PATH (set PYTHON=/path/to/python)" >&2
    exit 2
fi
missing=$("$PY" -c '
import importlib.util
need = {"torch": "torch", "triton": "triton", "transformers": "transformers", "tokenizers": "tokenizers",
        "tqdm": "tqdm", "numpy": "numpy", "pandas": "pandas", "sklearn": "scikit-learn",
        "matplotlib": "matplotlib", "pytest": "pytest"}
print(" ".join(pkg for module, pkg in need.items() if importlib.util.find_spec(module) is None))
')
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages (this script installs nothing): $missing" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA GPU (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 1
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=()
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname)"
    echo
    echo '```'
    "$PY" -c '
import torch, triton, transformers
p = torch.cuda.get_device_properties(0)
print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"transformers {transformers.__version__}")'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo '```'
} > "$REPORT"

# step TITLE COMMAND...: runs COMMAND, shows its output, appends it and its wall time to the report.
step() {
    local title=$1 start status
    shift
    echo "== $title: $*"
    start=$(date +%s)
    {
        echo
        echo "## $title"
        echo
        echo "\`$*\`"
        echo
        echo '```'
    } >> "$REPORT"
    "$@" 2>&1 | tee -a "$REPORT"
    status=${PIPESTATUS[0]}
    {
        echo '```'
        echo
        echo "exit status $status, $(($(date +%s) - start)) s"
    } >> "$REPORT"
    if [ "$status" -ne 0 ]; then
        failed+=("$title")
    fi
}

step "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/
step "kernel benchmark, bf16" "$PY" -m kernels.bench --dtype bf16
step "kernel benchmark, fp32" "$PY" -m kernels.bench --dtype fp32
step "real-size rehearsal" "$PY" scripts/rehearsal.py --device cuda --n-train 64 --n-prompts 16 \
    --report "${REPORT%.md}-rehearsal.json"

if [ ${#failed[@]} -ne 0 ]; then
    echo "gpu_check: failed: ${failed[*]}; report in $REPORT" | tee -a "$REPORT" >&2
    exit 1
fi
echo "gpu_check: all steps passed; report in $REPORT" | tee -a "$REPORT"
