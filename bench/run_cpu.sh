#!/usr/bin/env bash
# CPU suite of the pretraining benchmark (the 2-core development / CI machine): ecgcl-jax beside torch_reference.py.
#
#   bash bench/run_cpu.sh                 # about 30 minutes on 2 cores
#
# Needs the project venv (.venv) and a benchmark-only torch venv:
#   python3 -m venv .torch-venv && .torch-venv/bin/pip install torch==2.13.0 numpy
# Env: OUT (results folder; default /tmp/ecgcl_bench_cpu_<date>), PY, TORCH_PY, BENCH_SECONDS (timed seconds per
# measurement, default 10), ROUNDS (A B rounds, default 3: the median
# survives one disturbed round). Writes $OUT/bench_pretrain.jsonl and $OUT/bench_pretrain.log.
# Run nothing else heavy meanwhile: the ratios are only as good as the machine is quiet.
set -uo pipefail  # no -e: a failed invocation is logged and the suite goes on
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCH_PY=${TORCH_PY:-.torch-venv/bin/python}
export OUT=${OUT:-/tmp/ecgcl_bench_cpu_$(date +%Y%m%dT%H%M%S)}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! "$TORCH_PY" -c "import torch" >/dev/null 2>&1; then
  echo "run_cpu.sh: no torch at $TORCH_PY; make the benchmark venv first:" >&2
  echo "  python3 -m venv .torch-venv && .torch-venv/bin/pip install torch==2.13.0 numpy   (or set TORCH_PY)" >&2
  exit 1
fi
LOG="$OUT/bench_pretrain.log"
COMMON=(--torch-python "$TORCH_PY" --torch-args=--layout\ nhwc --seconds "${BENCH_SECONDS:-10}"
        --rounds "${ROUNDS:-3}" --json "$OUT/bench_pretrain.jsonl")
run() {
  echo "### $(date -u +%H:%M:%S) bench_pretrain.py $*" | tee -a "$LOG"
  "$PY" bench/bench_pretrain.py "${COMMON[@]}" "$@" 2>&1 | tee -a "$LOG"
}
# torch's best eager variant on 2 cores is --layout nhwc (../shared/bench/CPU_BASELINE.md); the CPU target is
# 1.5x of it at the same batch.
run --batch 16,64 --data resident,streamed                                   # CNN, Gaussian pair, fp32
run --batch 16,64 --pair time_warp:4,0.2+dropout:0.1                         # the heaviest pair
run --batch 64 --pair zero_mask:0.1+permute:5 --pair gaussian_noise:0.05+dropout:0.1
run --batch 64 --encoder cnn_lstm                                            # CNN-BiLSTM
# each other augmentation against the Gaussian pair's first view, and two structural ones together
run --batch 64 --pair gaussian_noise:0.05+zero_mask:0.1 --pair gaussian_noise:0.05+permute:5 \
    --pair gaussian_noise:0.05+time_warp:4,0.2 --pair permute:5+time_warp:4,0.2
# the physiological / geometric ops (torch_reference.py has none of them: ours alone), each against the Gaussian
# pair in the same invocation, and one composed pipeline
run --batch 64 --no-torch --pair gaussian_noise:0.05+gaussian_noise:0.25 \
    --pair gaussian_noise:0.05+baseline_wander --pair gaussian_noise:0.05+powerline \
    --pair gaussian_noise:0.05+muscle_noise --pair gaussian_noise:0.05+amplitude_scale \
    --pair gaussian_noise:0.05+random_resized_crop --pair gaussian_noise:0.05+lead_mask \
    --pair gaussian_noise:0.05+vcg_rotate_scale \
    --pair "baseline_wander@0.5|gaussian_noise:0.05+vcg_rotate_scale|random_resized_crop@0.5|lead_mask:1@0.5"
# the encoders torch_reference.py does not have: ours alone
run --batch 16 --encoder cnn_attn_lstm,cnn_transformer --no-torch
run --batch 16 --precision bfloat16                                          # bf16 (AVX-512 BF16 CPUs)
# the same step compiled with XLA's default options instead of models.xla_compiler_options() (which pretrain.run
# uses): shows what keeping the optimization barriers is worth
run --batch 64 --compiler-options none --pair gaussian_noise:0.05+gaussian_noise:0.25 --pair time_warp:4,0.2+dropout:0.1
echo "results: $OUT/bench_pretrain.jsonl, log: $LOG"
