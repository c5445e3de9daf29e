#!/usr/bin/env bash
# The paper's memory figure (Pythia-1.4B encoder and decoder, bfloat16) on a CPU without a GPU:
# depth-reduced Pythia-1.4B (same width, heads, vocabulary; random weights, two separate
# models as the paper's fully fine-tuned encoder and decoder) at 1 and 2 layers, then a
# per-layer extrapolation to 24 layers (benchmarks/pythia_memory.py). About 40 minutes on 2 idle cores
# (bfloat16 matrix products are emulated on a CPU without avx512_bf16 / AMX: ~6x slower than float32).
# On a GPU, the whole model in one call (not run here: no GPU in the session that wrote this):
#   rcc bench --model random:pythia-1.4b --device cuda --dtype bfloat16 --lengths 32k,64k,1m,2m \
#       --backbone-max-length 64k --new-tokens 4 -o runs/bench-pythia-1.4b-gpu.json
set -euo pipefail
export HF_HUB_OFFLINE=1
R=benchmarks/results
rcc bench --model random:pythia-1.4b:layers=1 --device cpu --dtype bfloat16 --lengths 4k,8k,16k,32k \
    --backbone-max-length 16k --new-tokens 4 -o $R/bench-pythia-1.4b-L1-cpu.json
rcc bench --model random:pythia-1.4b:layers=2 --device cpu --dtype bfloat16 --lengths 4k \
    --new-tokens 4 -o $R/bench-pythia-1.4b-L2-cpu.json
python benchmarks/pythia_memory.py $R/bench-pythia-1.4b-L1-cpu.json $R/bench-pythia-1.4b-L2-cpu.json
