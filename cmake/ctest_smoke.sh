#!/usr/bin/env bash
# Configure, build and run the C++ smoke test of the CMake build (CPU-only library by default):
#
#   cmake/ctest_smoke.sh [PYTHON]      PYTHON: the interpreter whose torch to build against
#                                      (default python3)
#
# Builds out of the source tree in build/cmake. Needs only torch (and optionally the `ninja` pip
# package) in PYTHON's environment, CMake >= 3.25 and a C++20 compiler. Extra arguments for the
# configure step can be passed in $BDLKERN_CMAKE_ARGS (e.g. "-DBDLKERN_CUDA=ON").
set -euo pipefail

python=${1:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="$root/build/cmake"

if ! prefix=$("$python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)'); then
  echo "ctest_smoke.sh: '$python' cannot import torch; pass the venv's python as the first argument" >&2
  exit 1
fi

# Ninja: the one on PATH, else the `ninja` pip package next to PYTHON.
ninja=$(command -v ninja || true)
if [[ -z "$ninja" ]]; then
  ninja=$("$python" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))' 2>/dev/null || true)
fi
if [[ -z "$ninja" || ! -x "$ninja" ]]; then
  echo "ctest_smoke.sh: ninja not found (install the ninja pip package or put ninja on PATH)" >&2
  exit 1
fi

# A build directory configured by another generator cannot be reused.
if [[ -f "$build/CMakeCache.txt" ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$build/CMakeCache.txt"; then
  rm -rf "$build"
fi

start=$SECONDS
# shellcheck disable=SC2086  # BDLKERN_CMAKE_ARGS is a list of words on purpose
cmake -S "$root" -B "$build" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$ninja" \
  -DCMAKE_PREFIX_PATH="$prefix" \
  -DTorch_DIR="$prefix/Torch" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBDLKERN_CUDA=OFF \
  ${BDLKERN_CMAKE_ARGS:-}
cmake --build "$build" -j2
ctest --test-dir "$build" --output-on-failure
echo "ctest_smoke.sh: CMake build and smoke test passed in $((SECONDS - start)) s"
