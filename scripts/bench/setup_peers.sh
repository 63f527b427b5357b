#!/usr/bin/env bash
# Peers for the batching benchmark (scripts/bench/): NVIDIA PyTriton 0.7.0 (which bundles tritonserver and
# runs it on CPU here), Triton's perf_analyzer (shipped as a binary inside the tritonclient 2.51.0 wheel),
# onnxruntime and numpy, in their own virtualenv .venv-peers so none of it touches .venv.
#
#     scripts/bench/setup_peers.sh            # idempotent: a second run only checks and prints
#
# UNIMODEL_PEERS_VENV picks another venv folder; UNIMODEL_PEERS_PYTHON another interpreter.
#
# Needs: Python 3.8-3.12 (PyTriton 0.7.0 wheels), glibc >= 2.35, the libb64 shared library (apt), and the CUDA
# runtime library that perf_analyzer links against (pip nvidia-cuda-runtime-cu12; no GPU is needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${UNIMODEL_PEERS_VENV:-.venv-peers}   # perf.py reads the same variable

find_python() {
  for py in "${UNIMODEL_PEERS_PYTHON:-}" python3.11 python3.12 python3.10 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(0 if (3, 8) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "setup_peers: PyTriton 0.7.0 needs Python 3.8-3.12 (set UNIMODEL_PEERS_PYTHON to its path)" >&2
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

# The same onnxruntime release as UniModel's worker (.venv), so the comparison is engine-for-engine.
ORT_PIN=$(sed -n 's/^onnxruntime==\(.*\)$/==\1/p' requirements/constraints.txt 2>/dev/null | head -1)
PACKAGES=(
  "tritonclient[all]==2.51.0"
  "nvidia-cuda-runtime-cu12"
  "nvidia-pytriton==0.7.0"
  "onnxruntime${ORT_PIN}"
  "numpy"
  "pyyaml"
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
  quiet_pip "${PACKAGES[@]}"
  echo "$want" > "$stamp"
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

cat <<EOF
setup_peers: ready ($VENV, $("$VENV/bin/python" --version), perf_analyzer from tritonclient 2.51.0)
  perf_analyzer by hand:
    LD_LIBRARY_PATH=$CUDART:$PYLIB $VENV/bin/perf_analyzer -m mlp -u 127.0.0.1:PORT -i http ...
  from Python (any venv): scripts/bench/perf.py (run_perf_analyzer / measure sets LD_LIBRARY_PATH itself)
  PyTriton peer:
    $VENV/bin/python scripts/bench/pytriton_server.py --repository DIR --http-port P --grpc-port Q
EOF
