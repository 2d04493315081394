#!/usr/bin/env bash
# The benchmark in one command: the GPU suite where an NVIDIA GPU answers, else the CPU suite.
#
#   bash bench/run.sh             # GPU: bench/run_gpu.sh all (8 parts, one 10-minute command each); CPU: run_cpu.sh
#   bash bench/run.sh PART ...    # GPU only: the parts of run_gpu.sh (main profile fp32 pairs stream encoders ...)
#
# Environment and outputs: see run_gpu.sh and run_cpu.sh (OUT, PY, TORCH_PY, BENCH_SECONDS, ROUNDS).
set -uo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  exec bash bench/run_gpu.sh "${@:-all}"
fi
if [ $# -gt 0 ]; then
  echo "run.sh: no NVIDIA GPU here; the CPU suite takes no parts (bash bench/run.sh)" >&2
  exit 2
fi
exec bash bench/run_cpu.sh
