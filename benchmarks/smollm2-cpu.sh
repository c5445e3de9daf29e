#!/usr/bin/env bash
# The measurements of docs/benchmarks.md: the embedded SmolLM2-135M-Instruct
# backbone (fresh, UNTRAINED RCC: window 2048, ratio 32) on a CPU.
# Results go to runs/ (JSON + PNG). Takes about an hour on 2 cores.
set -euo pipefail
export HF_HUB_OFFLINE=1
M=(--model embedded:smollm2 --device cpu)
HAY=/usr/share/common-licenses/GPL-3   # any long English prose works

rcc bench "${M[@]}" --lengths 2k,4k,8k,16k,32k -o runs/bench-smollm2-cpu.json
rcc eval passkey "${M[@]}" --lengths 1k,4k --depths 0,0.5,1 --baseline -o runs/passkey-smollm2.json
rcc eval needle "${M[@]}" --haystack "$HAY" --needle "The secret ingredient of the cake is cardamom." \
    --question "What is the secret ingredient of the cake?" --answer cardamom \
    --lengths 2k --depths 0,0.5,1 --baseline -o runs/needle-smollm2.json
rcc eval reconstruct "${M[@]}" --text "$HAY" --lengths 2k,4k --samples 2 --baseline -o runs/reconstruct-smollm2.json
rcc eval qa "${M[@]}" --data benchmarks/lighthouse-qa.jsonl --baseline -o runs/qa-smollm2.json
