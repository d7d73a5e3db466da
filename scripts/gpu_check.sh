#!/usr/bin/env bash
# make gpu-check: the CUDA checks, on a machine with an NVIDIA GPU, in under 8 minutes.
# Steps (each with its own time limit): NVML facts dump, the gpu-marked tests, NCCL DDP on the
# GPUs present, the trainer on CUDA (confidential vs plaintext, bf16), a GPU memory scan after
# shredding. Prints every goal line again at the end. Without a GPU it stops at once, exit 2.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU (no nvidia-smi / driver on this machine); nothing measured" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-check: no NVIDIA GPU visible to torch (torch.cuda.is_available() is False;" \
       "a CPU build of torch?); nothing measured" >&2
  exit 2
fi
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
LOG=$(mktemp -d)/gpu-check.log
status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "===== $name (limit ${limit}s) =====" | tee -a "$LOG"
  if ! timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"; then
    echo "gpu-check: step '$name' failed" | tee -a "$LOG"
    status=1
  fi
}

step "NVML facts" 30 "$PY" scripts/gpu_check.py facts
step "gpu-marked tests" 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
step "NCCL DDP on $NGPU GPU(s)" 60 "$PY" -m torch.distributed.run --standalone \
  --nproc-per-node="$NGPU" scripts/gpu_check.py ddp-worker
step "trainer on CUDA" 150 "$PY" scripts/gpu_check.py train
step "GPU memory scan after shredding" 40 "$PY" scripts/gpu_check.py scan

echo "===== goals ====="
grep '^goal ' "$LOG" || true
exit $status
