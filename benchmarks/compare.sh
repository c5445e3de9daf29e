#!/usr/bin/env bash
# The comparison of issue 16: the bundled RCC model (rcc-smollm2-135m: window 512, ratio 8, 1/8 of the
# context's positions as slots) against the plain SmolLM2 backbone with the full context, with its most
# recent tokens (RCC's budget), and with kvpress presses keeping 1/16 and 1/32 of the context's KV
# positions; pass key and needle at 2k, 8k and 32k tokens, every method with the chat prompt and the
# continuation prompt ("... The pass key is"), the table at each method's better prompt.
# Needs the kvpress environment (bash scripts/kvpress_env.sh; scripts/install.sh makes it).
# Usage: bash benchmarks/compare.sh [OUT_DIR]
# Few samples by default (2 per length at 2k and 8k, 1 at 32k: one per needle depth), because a shared
# 2-core CPU pre-fills 8k tokens of SmolLM2 in one to two minutes; on a faster machine give more depths,
# e.g. SHORT_DEPTHS=0,0.25,0.5,0.75,1 LONG_DEPTHS=0,0.25,0.5,0.75,1.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
# one torch thread per process: on a shared 2-core machine two threads wait on each other (measured at a
# load of 9: 16 greedy tokens of SmolLM2 took 22 s with two threads, 2.4 s with one); OMP_NUM_THREADS=2 on an idle one
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TASKS=${TASKS:-passkey needle}   # TASKS=passkey and TASKS=needle may run side by side, then the table alone:
                                 # TASKS= bash benchmarks/compare.sh
OUT=${1:-benchmarks/results}
SHORT_DEPTHS=${SHORT_DEPTHS:-0.25,0.75}   # one sample per depth at 2k and 8k
LONG_DEPTHS=${LONG_DEPTHS:-0.5}          # at 32k
PY=${PY:-.venv/bin/python}
BASELINES=${BASELINES:-full,recent,kvpress:snapkv@16,kvpress:snapkv@32,kvpress:expected_attention@16,kvpress:expected_attention@32}
LONG_BASELINES=${LONG_BASELINES:-$BASELINES}   # at 32k (full and kvpress read the 8192 positions SmolLM2 has)
COMMON=(--model rcc-smollm2-135m --device cpu --modes manual --prompts chat,continuation --max-new-tokens 16
        --samples 1 --no-plot)
NEEDLE=(--haystack /usr/share/common-licenses/GPL-3 --needle "The secret ingredient of the cake is cardamom."
        --question "What is the secret ingredient of the cake?" --answer cardamom)
mkdir -p "$OUT"
for part in "2k,8k $SHORT_DEPTHS short $BASELINES" "32k $LONG_DEPTHS long $LONG_BASELINES"; do
    read -r lengths depths name baselines <<< "$part"
    for task in $TASKS; do
        extra=(); [ "$task" = needle ] && extra=("${NEEDLE[@]}")
        "$PY" -m rcc.cli eval "$task" "${COMMON[@]}" "${extra[@]}" --lengths "$lengths" --depths "$depths" \
            --baselines "$baselines" -o "$OUT/compare-$task-$name.json"
    done
done
[ -n "$TASKS" ] && [ "$TASKS" != "passkey needle" ] && exit 0  # one task of two running side by side
"$PY" benchmarks/compare_table.py "$OUT"/compare-passkey-*.json "$OUT"/compare-needle-*.json \
    -o "$OUT/compare.md"
