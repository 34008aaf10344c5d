#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the sources the pinned llama-cpp-python sdist vendors,
# so the project has one llama.cpp version for both worker backends. Does nothing when the
# binary at $DEST is current: same llama-cpp-python version, same CMake flags.
#
#   scripts/build_llama_server.sh [VENV]     (default .venv; the binary goes to VENV/bin)
#
# CMAKE_ARGS is passed on, as llama-cpp-python's own build takes it (the Dockerfile passes
# -DGGML_CUDA=on to both); on a host where nvidia-smi sees a GPU, CUDA is turned on too. A
# CUDA toolkit alone (nvcc without a GPU or cuBLAS, as on CPU-only CI) builds for the CPU.
set -euo pipefail

VENV=${1:-.venv}
PY="$VENV/bin/python"
DEST="$VENV/bin/llama-server"
STAMP="$DEST.build"
WORK=${LLAMA_SERVER_BUILD_DIR:-var/build/llama-server}
# Built binaries are also kept outside the checkout, as pip keeps the llama-cpp-python
# wheel: a fresh clone (CI) installs the cached one instead of compiling for minutes.
CACHE=${LLAMA_SERVER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/edison/llama-server}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')
FLAGS="-DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release"
if [[ "${CMAKE_ARGS:-}" != *GGML_CUDA* ]] && nvidia-smi -L >/dev/null 2>&1; then
  FLAGS="$FLAGS -DGGML_CUDA=on"
elif [[ "${CMAKE_ARGS:-}" != *GGML_CUDA* ]]; then
  FLAGS="$FLAGS -DGGML_CUDA=off"
fi
FLAGS="$FLAGS ${CMAKE_ARGS:-}"
WANT="llama-cpp-python==$VERSION $FLAGS"

if [ -x "$DEST" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

KEY=$(printf '%s' "$WANT" | sha256sum | cut -c1-16)
CACHED="$CACHE/$KEY/llama-server"
if [ -x "$CACHED" ] && [ -f "$CACHED.build" ] && [ "$(cat "$CACHED.build")" = "$WANT" ]; then
  install -m 0755 "$CACHED" "$DEST"
  printf '%s' "$WANT" > "$STAMP"
  echo "installed $DEST from the build cache ($CACHE/$KEY)"
  exit 0
fi

if ! command -v cmake >/dev/null 2>&1 || ! { command -v c++ || command -v g++ || command -v clang++; } >/dev/null 2>&1; then
  # Not an error: the llama-server backend is optional and its tests skip, saying why.
  echo "llama-server not built: cmake and a C++ compiler are needed (the llama-server backend is unavailable)" >&2
  exit 0
fi

mkdir -p "$WORK"
# One build at a time in $WORK (a `make test` beside a running `make install`).
exec 9>"$WORK/.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi
if [ -x "$DEST" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

echo "building llama-server from llama-cpp-python $VERSION's vendored llama.cpp ($FLAGS)"
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
fi
SRC="$WORK/llama_cpp_python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  tar -xzf "$SDIST" -C "$WORK"
fi
GEN=""
if command -v ninja >/dev/null 2>&1; then GEN="-G Ninja"; fi
BUILD="$WORK/build-$VERSION"
# shellcheck disable=SC2086  # FLAGS and GEN are lists of words
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" $GEN $FLAGS >/dev/null
cmake --build "$BUILD" --target llama-server -j "$JOBS"
install -m 0755 "$BUILD/bin/llama-server" "$DEST"
printf '%s' "$WANT" > "$STAMP"
if mkdir -p "$CACHE/$KEY" 2>/dev/null; then
  install -m 0755 "$BUILD/bin/llama-server" "$CACHED" && printf '%s' "$WANT" > "$CACHED.build"
fi
echo "installed $DEST"
