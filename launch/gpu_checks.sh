#!/usr/bin/env bash
# On one GPU: the attention kernels against the float64 reference and whole-model causality, run on the
# accelerator, then the GPU benchmarks of the README's table. Each step runs under its own time limit, so
# one that hangs or fails does not stop the rest; the script exits non-zero if any step failed. All steps
# together take about ten minutes; naming steps runs only those (e.g. in two shorter runs).
#
#   bash launch/gpu_checks.sh [LOG_DIR [STEP ...]]      # each step's output also goes to LOG_DIR/<step>.log
set -u
logs=${1:-gpu_checks}
selected=("${@:2}")
steps=(versions kernel_tests attention kernels train_pi_p train_pi_p_fast train_pi_p_tuned moe moe_9_experts
       train_pi_p_8k)
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
# The Pallas (Triton) kernel and the cuDNN path on the accelerator: every reference case, bf16, no queries,
# and causality in predictor-routed MoD mode.
kernel_tests="(reference or bf16 or no_queries or causal_on_every_path or cudnn) and (pallas or fused)"
step kernel_tests 120 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/test_flash_attention.py \
  -k "($kernel_tests and not pallas_tpu) or power_of_two_chunks"
step attention 120 python3 -m diffmoe_jax.bench attention --config=configs/pi_p.py --no-layer-ratio \
  --dtype=bfloat16 --impls pallas pallas_one_pass fused four_flash_calls standard_flash --lengths 2048 4096 8192 16384
# Each backward kernel alone over launch settings (rows per program, loop step, warps; two stages).
step kernels 150 python3 -m diffmoe_jax.bench kernels --config=configs/pi_p.py --seq-len 8192 \
  --kernels dq dkv dkv_dq --rows 32 64 128 --steps 32 64 --warps 4 8 --stages 2 --budget-s 120
step train_pi_p 90 python3 -m diffmoe_jax.bench train --config=configs/pi_p.py --layers 4 --seq-len 4096 \
  --batch 1 --steps 5 --data-batches 20
# The same stack keeping the flash residuals through remat, with the one-pass attention backward, and where
# its time goes (a profiler trace: per part of the model and pass, per kind of instruction, the slowest).
step train_pi_p_fast 100 python3 -m diffmoe_jax.bench train --config=configs/pi_p.py --layers 4 --seq-len 4096 \
  --batch 1 --steps 5 --data-batches 20 --remat-policy save_names --remat-save-names flash_residuals \
  --attention-gpu-backward one_pass --profile-top 30
# And with the one-pass kernel's fastest launch from the sweep above, if it found one.
tuned=$(sed -n 's/^dkv_dq .* --attention-gpu-launch \(dkv=[0-9,]*\) .*/\1/p' "$logs/kernels.log" 2>/dev/null)
if [ -n "$tuned" ]; then
  step train_pi_p_tuned 90 python3 -m diffmoe_jax.bench train --config=configs/pi_p.py --layers 4 --seq-len 4096 \
    --batch 1 --steps 5 --data-batches 20 --remat-policy save_names --remat-save-names flash_residuals \
    --attention-gpu-backward one_pass --attention-gpu-launch "$tuned"
elif wanted train_pi_p_tuned; then
  echo "=== train_pi_p_tuned: skipped: $logs/kernels.log names no fastest dkv_dq launch (run the kernels step)"
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
