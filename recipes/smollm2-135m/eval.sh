#!/usr/bin/env bash
# The model card's measurements (MODEL_CARD.md), each on the same samples with the
# uncompressed SmolLM2 (cut to its 8k window) and the equal-memory recent-tokens baseline.
#   bash recipes/smollm2-135m/eval.sh [MODEL=rcc-smollm2-135m] [OUT=runs/smollm2-135m/eval]
# Needs the held-out prose of data.sh (data/smollm2-135m/prose/heldout). On the 2-core CPU
# machine it takes about two hours.
set -euo pipefail
MODEL=${1:-rcc-smollm2-135m}
OUT=${2:-runs/smollm2-135m/eval}
RCC=${RCC:-rcc}
HELD=${HELD:-data/smollm2-135m/prose/heldout/linux-admin-guide.txt}
MODES=${MODES:-manual}                      # the bundled model's own mode (stages 3 and 4 trained only it)
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
# a needle unlike the training templates, hidden in held-out prose
NEEDLE=(--haystack "$HELD" --needle "The secret ingredient of the harbour soup is smoked paprika."
        --question "What is the secret ingredient of the harbour soup?" --answer "smoked paprika")
$RCC eval passkey --model "$MODEL" --modes "$MODES" --lengths "${PASSKEY_LENGTHS:-2k,8k,32k}" \
    --samples "${SAMPLES:-2}" --baselines full,recent -o "$OUT/passkey.json"
# 128k on its own: one sample a depth (about 4 minutes each for RCC on the 2-core CPU)
$RCC eval passkey --model "$MODEL" --modes "$MODES" --lengths "${LONG_LENGTHS:-128k}" \
    --baselines full,recent -o "$OUT/passkey-long.json"
# reconstruct mode (trained in stage 2 only), RCC alone: the baselines have no modes
$RCC eval passkey --model "$MODEL" --modes reconstruct --lengths "${PASSKEY_LENGTHS:-2k,8k,32k}" \
    --samples "${SAMPLES:-2}" -o "$OUT/passkey-reconstruct-mode.json"
$RCC eval needle --model "$MODEL" --modes "$MODES" --lengths "${NEEDLE_LENGTHS:-2k,8k,32k}" \
    --samples "${SAMPLES:-2}" \
    --baselines full,recent "${NEEDLE[@]}" \
    -o "$OUT/needle.json"
$RCC eval needle --model "$MODEL" --modes "$MODES" --lengths "${LONG_LENGTHS:-128k}" \
    --baselines full,recent "${NEEDLE[@]}" \
    -o "$OUT/needle-long.json"
$RCC eval reconstruct --model "$MODEL" --lengths 512 --samples 10 --baselines full,recent --text "$HELD" \
    -o "$OUT/reconstruct.json"
