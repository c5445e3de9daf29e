#!/usr/bin/env bash
# Train the bundled model: stages 1 and 2 (pretrain.yaml, finetune.yaml: run on
# one H100 for the shipped model), then stages 3 and 4 (cpu-finetune.yaml,
# cpu-longer.yaml: run on the 2-core CPU). Extra KEY=VALUE arguments go to every stage.
#   bash recipes/smollm2-135m/train.sh
#   LAUNCH="accelerate launch -m rcc.cli" bash recipes/smollm2-135m/train.sh   # several GPUs
# STAGE1=... / STAGE2=... / STAGE3=... / STAGE4=... pass options to one stage only (e.g. STAGE1="optim.max_steps=1500").
set -euo pipefail
HERE=$(dirname "$0")
LAUNCH=${LAUNCH:-rcc}
export HF_HUB_OFFLINE=1
$LAUNCH train "$HERE/pretrain.yaml" ${STAGE1:-} "$@"
$LAUNCH train "$HERE/finetune.yaml" ${STAGE2:-} "$@"
$LAUNCH train "$HERE/cpu-finetune.yaml" ${STAGE3:-} "$@"
$LAUNCH train "$HERE/cpu-longer.yaml" ${STAGE4:-} "$@"
