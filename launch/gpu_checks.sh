#!/usr/bin/env bash
# On one GPU: the attention kernels against the float64 reference and whole-model causality, run on the
# accelerator, then the GPU benchmarks of the README's table. Each step runs under its own time limit, so
# one that hangs or fails does not stop the rest; the script exits non-zero if any step failed. All steps
# together take about nineteen minutes on an H200; naming steps runs only those (e.g. in two shorter runs).
#
#   bash launch/gpu_checks.sh [LOG_DIR [STEP ...]]      # each step's output also goes to LOG_DIR/<step>.log
set -u
logs=${1:-gpu_checks}
selected=("${@:2}")
steps=(versions kernel_tests attention_mosaic train_pi_p_mosaic train_pi_p_batch4_dots train_pi_p_batch4_dots_saved
       attention kernels train_pi_p train_pi_p_batch4 train_pi_p_profile train_pi_p_saved train_pi_p_tuned moe
       moe_9_experts train_pi_p_8k)
# A misspelt step is refused before any step runs, not after the others have taken their minutes.
for name in "${selected[@]}"; do
  if [[ " ${steps[*]} " != *" $name "* ]]; then
    echo "error: there is no step $name; the steps: ${steps[*]}" >&2
    exit 2
  fi
done
mkdir -p "$logs"
failed=()

wanted() {  # wanted NAME: whether the command line asks for step NAME (all steps when it names none)
  if [[ " ${steps[*]} " != *" $1 "* ]]; then
    echo "error: step $1 is missing from the list of steps at the top of $0" >&2
    exit 2
  fi
  [ ${#selected[@]} -eq 0 ] || [[ " ${selected[*]} " == *" $1 "* ]]
}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  wanted "$name" || return 0
  echo "=== $name: $*"
  timeout "$limit" "$@" > >(tee "$logs/$name.log") 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || failed+=("$name")
}

step versions 30 python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"
# The Pallas kernels (Triton; Mosaic GPU's in the bf16 cases) and the cuDNN path on the accelerator:
# every reference case, bf16, no queries, and causality in predictor-routed MoD mode.
kernel_tests="(reference or bf16 or no_queries or causal_on_every_path or cudnn) and (pallas or fused)"
step kernel_tests 180 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/test_flash_attention.py \
  -k "($kernel_tests and not pallas_tpu) or power_of_two_chunks"
train_pi_p="python3 -m diffmoe_jax.bench train --config=configs/pi_p.py --layers 4 --seq-len 4096 --steps 5"
train_pi_p+=" --data-batches 20"
# The Mosaic GPU kernels (Hopper: TMA, wgmma; forward and backward, and the forward alone) beside Triton's and
# cuDNN, then in the PI-P stack; first, so that a short device session measures them (kernel_tests has run
# their reference tests on the GPU).
step attention_mosaic 90 python3 -m diffmoe_jax.bench attention --config=configs/pi_p.py --no-layer-ratio \
  --dtype=bfloat16 --impls pallas pallas_mosaic pallas_mosaic_forward standard_flash --lengths 4096 8192
step train_pi_p_mosaic 90 $train_pi_p --batch 1 --attention-gpu-forward mosaic --attention-gpu-backward mosaic
# Where the MFU target can be met: at batch 1 the compiled step's roofline allows at most 39.5% MFU on an H200
# (42.2% with "dots"; `bench gpu_compile --step`), at batch 4 with the matmul outputs kept through remat
# ("dots") 61.3%; then also keeping the attention kernels' outputs, so that the backward does not rerun them.
step train_pi_p_batch4_dots 150 $train_pi_p --batch 4 --remat-policy dots --attention-gpu-forward mosaic \
  --attention-gpu-backward mosaic
step train_pi_p_batch4_dots_saved 150 $train_pi_p --batch 4 --remat-policy dots --remat-save-names flash_residuals \
  --attention-gpu-forward mosaic --attention-gpu-backward mosaic
step attention 120 python3 -m diffmoe_jax.bench attention --config=configs/pi_p.py --no-layer-ratio \
  --dtype=bfloat16 --impls pallas pallas_one_pass fused four_flash_calls standard_flash --lengths 2048 4096 8192 16384
# Each kernel of the two-pass backward and the forward alone over launch settings (rows per program, loop step,
# warps; two stages). 32-row programs measured 3-10x slower than 64-row ones for every kernel.
step kernels 150 python3 -m diffmoe_jax.bench kernels --config=configs/pi_p.py --seq-len 8192 \
  --kernels forward dkv dq --rows 64 128 --steps 32 64 --warps 4 8 --stages 2 --budget-s 120
step train_pi_p 90 $train_pi_p --batch 1
# Four sequences a step: the optimizer's pass over the weights (memory-bound, a fixed cost per step) is shared
# by 4x the tokens, as in a run with several sequences per device or gradient accumulation.
step train_pi_p_batch4 120 $train_pi_p --batch 4
# Where the step's time goes: a profiler trace, per part of the model and pass, per kind of instruction, the
# slowest instructions.
step train_pi_p_profile 100 $train_pi_p --batch 1 --profile-top 30
# Keeping the flash residuals through remat, and then also the fastest launches of the sweep above, if it found them.
step train_pi_p_saved 90 $train_pi_p --batch 1 --remat-policy save_names --remat-save-names flash_residuals
tuned=$(sed -n 's/^\(forward\|dq\|dkv\) .* --attention-gpu-launch \([a-z]*=[0-9,]*\) .*/\2/p' "$logs/kernels.log" \
  2>/dev/null | tr '\n' ' ')
if [ -n "$tuned" ]; then
  step train_pi_p_tuned 90 $train_pi_p --batch 1 --remat-policy save_names --remat-save-names flash_residuals \
    --attention-gpu-launch $tuned
elif wanted train_pi_p_tuned; then
  echo "=== train_pi_p_tuned: skipped: $logs/kernels.log names no fastest launch (run the kernels step)"
fi
step moe 45 python3 -m diffmoe_jax.bench moe --dtype bfloat16 --variants dropless-padded dropless-ragged \
  --batch 2 --seq-len 4096 --d-model 2592 --ffn-dim 6912 --experts 4 --top-k 2
step moe_9_experts 45 python3 -m diffmoe_jax.bench moe --dtype bfloat16 --variants dropless-padded dropless-ragged \
  --batch 2 --seq-len 4096 --d-model 2592 --ffn-dim 6912 --experts 9 --top-k 2
step train_pi_p_8k 75 python3 -m diffmoe_jax.bench train --config=configs/pi_p.py --layers 2 --seq-len 8192 \
  --batch 1 --steps 3 --data-batches 10

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
