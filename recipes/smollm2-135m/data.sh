#!/usr/bin/env bash
# Rebuild the training and evaluation data of the bundled model from Debian
# documentation packages (no download beyond apt). Generated data is not committed.
#   bash recipes/smollm2-135m/data.sh [OUT=data/smollm2-135m]
set -euo pipefail
OUT=${1:-data/smollm2-135m}
RCC=${RCC:-rcc}
if [ ! -d /usr/share/doc/python3.11/html/_sources ] || [ ! -d /usr/share/doc/linux-doc-6.1 ] \
   || [ ! -f /usr/share/debian-reference/debian-reference.en.txt.gz ]; then
  apt-get install -y --no-install-recommends python3.11-doc linux-doc-6.1 debian-reference-en
fi
python3 "$(dirname "$0")/prose.py" "$OUT/prose"
export HF_HUB_OFFLINE=1
# stage 1: token folder of the training prose (2% of documents held out for the eval loss)
$RCC prepare-data "$OUT/prose/train" -o "$OUT/tokens" --tokenizer embedded:smollm2 \
    --min-tokens 64 --eval-fraction 0.02 --overwrite --quiet
# stage 2: synthetic pass-key / needle / extract records from the same prose
$RCC synth "$OUT/prose/train" -o "$OUT/tasks.jsonl" --tokenizer embedded:smollm2 \
    --count 6000 --min-tokens 300 --max-tokens 12k --seed 1
# stage 3: short pass-key and needle records for the CPU stage
$RCC synth "$OUT/prose/train" -o "$OUT/passkey.jsonl" --tokenizer embedded:smollm2 \
    --count 3000 --kinds passkey=0.7,needle=0.3 --min-tokens 300 --max-tokens 1500 --seed 2
# stage 4: pass-key and needle records of 1 to 32 windows for the second CPU stage
$RCC synth "$OUT/prose/train" -o "$OUT/passkey-long.jsonl" --tokenizer embedded:smollm2 \
    --count 4000 --kinds passkey=0.7,needle=0.3 --min-tokens 300 --max-tokens 16k --seed 4
# v3 (issue 23): copy any value at ratio 16: values of every shape under labels with distractors,
# in five haystacks (rcc.data.synth `copy`), mixed with pass keys, free-value facts, extraction,
# reconstruction and continuation of prose; contexts of 1 to 64 windows of 512 (the curriculum
# of v3.yaml reads the lengths it wants from one file)
$RCC synth "$OUT/prose/train" -o "$OUT/v3.jsonl" --tokenizer embedded:smollm2 \
    --count 12000 --min-tokens 300 --max-tokens 32k --seed 7 \
    --kinds copy=0.35,passkey=0.05,multikey=0.1,fact=0.1,extract=0.1,reconstruct=0.2,continue=0.1
