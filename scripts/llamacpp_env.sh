#!/usr/bin/env bash
# Create .venv-llamacpp: llama-cpp-python built from its PyPI source (no prebuilt wheel) beside this
# package, for the `llamacpp` baseline of `rcc eval --baselines full,llamacpp` and benchmarks/llamacpp.py.
# It runs the embedded backbone's GGUF (rcc.backbones.embedded_smollm2_file()) with llama.cpp,
# uncompressed. The environment holds llama-cpp-python and its few dependencies only (no torch):
# rcc runs it as a child process (rcc/eval/llamacpp_child.py, standard library + llama_cpp), so what
# the child's peak RSS shows is llama.cpp's own.
# The build compiles llama.cpp (C/C++, ggml for this CPU: GGML_NATIVE); on the 2-core VM it took
# 12 minutes (727 s, 2 jobs, under nice on the shared machine; see docs/benchmarks.md), so neither scripts/install.sh nor .ci/run makes it.
# Usage: nice -n 15 bash scripts/llamacpp_env.sh [VENV_DIR]   (default .venv-llamacpp; rcc finds it
# there, or give its python with --llamacpp-python / RCC_LLAMACPP_PYTHON)
# Environment: CMAKE_BUILD_PARALLEL_LEVEL (default 2), LLAMACPP_VERSION (default 0.3.36).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${1:-.venv-llamacpp}
VERSION=${LLAMACPP_VERSION:-0.3.36}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
quiet() {  # pip without its location warnings; its exit status kept
    local rc=0
    "$@" > >(grep -v "^WARNING: Location" >&2) 2>&1 || rc=$?
    return $rc
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet "$VENV/bin/python" -m pip install -q --upgrade pip
start=$(date +%s)
# --no-binary: the sdist from PyPI, compiled here for this CPU, as `pip install llama-cpp-python` does
quiet "$VENV/bin/python" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
echo "llama-cpp-python $VERSION built in $(( $(date +%s) - start )) s (CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL)" >&2
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md

import llama_cpp

print("llama-cpp-python", md.version("llama-cpp-python"), "llama.cpp system info:",
      llama_cpp.llama_print_system_info().decode().strip())
PYEOF
