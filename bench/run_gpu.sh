#!/usr/bin/env bash
# GPU suite of the pretraining benchmark: ecgcl-jax beside torch_reference.py on the same GPU, same invocation.
#
#   bash bench/run_gpu.sh main       # CNN bf16, batch 128/512/2048, vs torch compiled bf16 nhwc (the targets in bench/RESULTS.md)
#   bash bench/run_gpu.sh PART ...   # parts: main profile fp32 pairs stream encoders conv scaling; "all" = all
#
# Each part fits a 10-minute command on one H100 (main is the longest: torch.compile compiles each batch size).
# Env: OUT (results folder; default /tmp/ecgcl_bench_gpu), PY (python with jax[cuda], flax, optax; default python3),
# TORCH_PY (python with torch; default $PY), BENCH_SECONDS (timed seconds per measurement, default 3), ROUNDS (2),
# TORCH_TIMEOUT (s per torch_reference.py invocation, 300), ECGCL_GIT_COMMIT (recorded when the copy has no .git).
# SMOKE=1: every batch size becomes 8 (2 per device with --scaling), 0.5 s and 1 round per measurement, so that
# every part's command line runs end to end in minutes on a CPU, before device time is spent on it.
# JSON lines go to $OUT/bench_pretrain.jsonl, the log to $OUT/bench_pretrain.log. torch_reference.py is looked for
# in ../shared/bench/ and .bench_shared/ (or set TORCH_REF).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_PY=${TORCH_PY:-$PY}
export OUT=${OUT:-/tmp/ecgcl_bench_gpu}
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ecgcl_jax_cache}  # later parts reuse compiles
mkdir -p "$OUT"
# ml_collections is not in every GPU image: install a carried wheel (.whl/) if the import fails
if ! "$PY" -c "import ml_collections" >/dev/null 2>&1; then
  if ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ecgcl_site .whl/ml_collections-*.whl
    export PYTHONPATH=/tmp/ecgcl_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "run_gpu.sh: ml_collections is missing (carry .whl/ml_collections-*.whl)" >&2
    exit 1
  fi
fi
LOG="$OUT/bench_pretrain.log"
# one jax start-up for the log line and the backend check (each start costs device time)
jax_line=$("$PY" -c "import jax; print('# jax', jax.__version__, 'backend', jax.default_backend(), jax.devices())" 2>&1)
echo "$jax_line" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$LOG"
if [ -n "${SMOKE:-}" ]; then
  BENCH_SECONDS=${BENCH_SECONDS:-0.5}; ROUNDS=${ROUNDS:-1}
elif ! grep -q "^# jax .* backend gpu " <<< "$jax_line"; then
  # a CUDA plugin that failed to start leaves jax on the CPU with only a warning: batch 2048 there would use up
  # the device time measuring nothing
  echo "run_gpu.sh: jax's backend is not a GPU (SMOKE=1 runs the suite on a CPU as a check)" | tee -a "$LOG" >&2
  exit 1
fi
# torch_reference.py: where bench_pretrain.py looks (../shared/bench beside the checkout does not travel to a
# device machine: copy it into .bench_shared/ first), or TORCH_REF
if [ -z "${TORCH_REF:-}" ] && [ ! -f ../shared/bench/torch_reference.py ] && [ ! -f .bench_shared/torch_reference.py ]; then
  echo "run_gpu.sh: torch_reference.py not found (copy ../shared/bench/torch_reference.py to .bench_shared/, or set" \
       "TORCH_REF); the parts beside torch will fail, the others run" | tee -a "$LOG" >&2
fi
# batch sizes: as given, or SMOKE's small one
bs() { if [ -n "${SMOKE:-}" ]; then echo "${2:-8}"; else echo "$1"; fi; }
# torch's time limit per invocation: a hung torch.compile must not take the whole 10-minute command
COMMON=(--torch-python "$TORCH_PY" --seconds "${BENCH_SECONDS:-3}" --rounds "${ROUNDS:-2}"
        --json "$OUT/bench_pretrain.jsonl" --workdir /tmp/ecgcl_bench_data --torch-timeout "${TORCH_TIMEOUT:-300}")
[ -n "${TORCH_REF:-}" ] && COMMON+=(--torch-ref "$TORCH_REF")
PART_RC=0  # the part's status: the last failure of any of its commands (not only of its last one)
run() {
  echo "### $(date -u +%H:%M:%S) bench_pretrain.py $*" | tee -a "$LOG"
  "$PY" bench/bench_pretrain.py "${COMMON[@]}" "$@" 2>&1 | tee -a "$LOG" || PART_RC=$?
}
TORCH_BEST="--layout nhwc --compile"   # torch's best GPU settings: bf16 + nhwc + compile (its README)
PAIRS=(--pair gaussian_noise:0.05+gaussian_noise:0.25 --pair gaussian_noise:0.05+dropout:0.1
       --pair time_warp:4,0.2+dropout:0.1 --pair zero_mask:0.1+permute:5 --pair permute:5+time_warp:4,0.2
       # the physiological / geometric ops and one pipeline (no torch column: torch_reference.py lacks them)
       --pair gaussian_noise:0.05+baseline_wander --pair gaussian_noise:0.05+powerline
       --pair gaussian_noise:0.05+muscle_noise --pair gaussian_noise:0.05+amplitude_scale
       --pair gaussian_noise:0.05+random_resized_crop --pair gaussian_noise:0.05+lead_mask
       --pair gaussian_noise:0.05+vcg_rotate_scale
       --pair "baseline_wander@0.5|gaussian_noise:0.05+vcg_rotate_scale|random_resized_crop@0.5|lead_mask:1@0.5")

part() {
  case "$1" in
    main)      # targets: >= 1.5x torch compiled at 512, >= 1.2x at 2048, >= 200k ECG/s at 2048 bf16, <= 20 GB
      run --batch "$(bs 128,512,2048)" --precision bfloat16 --torch-args="$TORCH_BEST" ;;
    fp32)      # float32 against torch fp32 eager ncl (its plain variant) at the same batches
      run --batch "$(bs 128,512,2048)" --precision float32 --torch-args="--layout ncl" ;;
    pairs)     # every pair within 10% of the Gaussian pair; torch eager bf16 nhwc beside (no per-pair compiles)
      run --batch "$(bs 2048)" --precision bfloat16 "${PAIRS[@]}" --torch-args="--layout nhwc" ;;
    stream)    # streamed from the memory-mapped dataset vs resident on the device (target: within 10%)
      run --batch "$(bs 512,2048)" --precision bfloat16 --data resident,streamed --no-torch
      # the host gather alone, by reader threads: what streaming can deliver on this host
      "$PY" bench/bench_read_rows.py --batch "$(bs 2048)" --seconds "${BENCH_SECONDS:-3}" --rounds "${ROUNDS:-2}" \
          --json "$OUT/bench_read_rows.jsonl" 2>&1 | tee -a "$LOG" || PART_RC=$? ;;
    encoders)  # every encoder, bf16, batch 512 (torch has cnn and cnn_lstm: eager nhwc beside them)
      run --batch "$(bs 512)" --precision bfloat16 --encoder cnn,cnn_lstm,cnn_attn_lstm,cnn_transformer,res_cnn_lstm \
          --torch-args="--layout nhwc" ;;
    conv)      # stride-2 conv formulation on this GPU: strided (default off-CPU) vs paired, alternating
      for r in 1 2; do
        for c in strided paired; do
          run --batch "$(bs 512,2048)" --precision bfloat16 --conv "$c" --rounds 1 --no-torch
        done
      done ;;
    profile)   # where the step's time goes: ms per step by HLO op and by model scope (about a minute)
      for a in "--pair gaussian_noise:0.05+gaussian_noise:0.25" "--pair time_warp:4,0.2+dropout:0.1"; do
        # shellcheck disable=SC2086
        "$PY" bench/profile_step.py --batch "$(bs 2048)" --precision bfloat16 $a --top 30 \
            --trace-dir "$OUT/trace" --json "$OUT/profile_step.jsonl" 2>&1 | tee -a "$LOG" || PART_RC=$?
      done ;;
    scaling)   # 1, 2, 4, .. N devices, per-device batch fixed (needs more than one GPU)
      run --scaling --batch "$(bs 256,1024 2)" --precision bfloat16 --no-torch ;;
    *)
      echo "run_gpu.sh: unknown part '$1' (main profile fp32 pairs stream encoders conv scaling all)" >&2
      return 2 ;;
  esac
}
[ $# -eq 0 ] && set -- all
parts=()
for p in "$@"; do
  if [ "$p" = all ]; then parts+=(main profile fp32 pairs stream encoders conv scaling); else parts+=("$p"); fi
done
rc=0
for p in "${parts[@]}"; do  # a failed part is reported, and the next one still runs
  PART_RC=0
  part "$p"; r=$?
  [ "$r" -eq 0 ] && r=$PART_RC
  if [ "$r" -ne 0 ]; then rc=$r; echo "run_gpu.sh: part $p failed (exit $r)" | tee -a "$LOG" >&2; fi
done
echo "results: $OUT/bench_pretrain.jsonl, log: $LOG"
exit $rc
