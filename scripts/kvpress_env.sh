#!/usr/bin/env bash
# Create .venv-kvpress: NVIDIA's kvpress 0.5.5 beside this package, for the kvpress baseline of
# `rcc eval --baselines kvpress:snapkv@16,...`. kvpress 0.5.5 declares transformers<5.3 while the
# main .venv runs a newer transformers, so kvpress gets an environment of its own (transformers
# 5.2.x) and `rcc eval` runs it there as a child process (rcc/eval/kvpress_child.py).
# PyTorch is pinned to the CPU build first, as in scripts/install.sh, so nothing pulls a CUDA build.
# Usage: bash scripts/kvpress_env.sh [VENV_DIR]   (default .venv-kvpress; rcc eval finds it there,
# or give its python with --kvpress-python / RCC_KVPRESS_PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${1:-.venv-kvpress}
quiet() {  # pip without its location warnings; its exit status kept
    local rc=0
    "$@" > >(grep -v "^WARNING: Location" >&2) 2>&1 || rc=$?
    return $rc
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet "$VENV/bin/python" -m pip install -q --upgrade pip
quiet "$VENV/bin/python" -m pip install -q "torch==2.13.0"
# one resolve: kvpress and its dependencies, transformers 5.2.x, and this package (transformers>=5.0)
quiet "$VENV/bin/python" -m pip install -q "torch==2.13.0" "transformers>=5.2,<5.3" "kvpress==0.5.5" -e .
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import kvpress, torch, transformers  # noqa: F401  (kvpress patches attention on import)
import rcc
print("kvpress", md.version("kvpress"), "torch", torch.__version__, "transformers", transformers.__version__,
      "rcc-llm", rcc.__version__)
EOF
