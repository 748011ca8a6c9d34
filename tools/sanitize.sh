#!/usr/bin/env bash
# `make sanitize`: build bdlkern's extensions with sanitizers and run the op tests under them.
#
#   tools/sanitize.sh [PYTHON] [address|thread ...]     (default: .venv/bin/python, both runs)
#
# * address: the CPU-only operator library and the SIMT extension, built with AddressSanitizer and
#   UndefinedBehaviorSanitizer (-fno-sanitize-recover, so any report fails the run), run the op
#   tests. This copy is also a real CPU-only build of bdlkern._C (BDLKERN_CUDA=0).
# * thread: the SIMT extension built with ThreadSanitizer, which sees the emulated CUDA threads (one
#   host thread per CUDA thread) racing on __shared__ memory or global memory; it runs every SIMT
#   test. Only _C_simt is instrumented: the CPU kernels run on OpenMP, whose barriers TSan cannot
#   see (libgomp is not instrumented), so instrumenting them would only report false races. The
#   uninstrumented _C of the normal build (`make build`) is linked in next to it.
#
# Each copy lives in build/sanitize/<run>/bdlkern: the sanitized .so files plus links to the
# package's Python sources, found first through PYTHONPATH. Objects are kept in
# build/temp-<sanitizers>, so a second run only recompiles what changed. The sanitizer runtime is
# LD_PRELOADed into Python (it must come first); a report makes the test process exit non-zero.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${1:-.venv/bin/python}
shift || true
runs=("$@")
[[ ${#runs[@]} -gt 0 ]] || runs=(address thread)
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")
# Without this, Python puts the working directory (the repository root, holding the normal build's
# bdlkern/) in front of PYTHONPATH.
export PYTHONSAFEPATH=1
export PATH="$(dirname "$python"):$PATH"  # ninja from the venv
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

# The op tests: every kernel family, the SIMT emulator itself, the property and bad-input suites.
op_tests=(tests/test_rng.py tests/test_simt.py tests/test_mc_dropout.py tests/test_mc_dropout_paths.py tests/test_mc_dropout_conv.py tests/test_lrt_conv.py tests/test_sparse_conv.py tests/test_concrete_dropout.py
  tests/test_sparse_vd.py tests/test_sparse_linear.py tests/test_ard.py
  tests/test_variance_networks.py tests/test_gaussian_dropout.py)
for extra in tests/test_properties_*.py tests/test_bad_input.py tests/test_serialization.py tests/test_autocast.py \
  tests/test_double_backward.py tests/test_autograd_paths.py tests/test_fuzz_modules.py; do
  [[ -f $extra ]] && op_tests+=("$extra")
done

# stage DIR: a package directory whose Python sources are the tree's, for the .so files built there:
# links to its modules and to its subpackages (every folder with an __init__.py: bench, testing,
# uncertainty, ...). Links left by an earlier run to sources that have since moved are removed.
stage() {
  local pkg=$1/bdlkern f d
  mkdir -p "$pkg"
  find "$pkg" -maxdepth 1 -xtype l -delete
  for f in bdlkern/*.py; do ln -sfn "$root/$f" "$pkg/"; done
  for d in bdlkern/*/; do
    d=${d%/}
    if [[ -f $d/__init__.py ]]; then ln -sfn "$root/$d" "$pkg/$(basename "$d")"; fi
  done
}

# build DIR SANITIZERS [ENV...]: the extensions with -fsanitize=SANITIZERS into DIR/bdlkern.
build() {
  local dir=$1 sanitizers=$2
  shift 2
  echo "sanitize.sh: building with -fsanitize=$sanitizers into $dir" >&2
  env BDLKERN_CUDA=0 BDLKERN_SIMT=1 BDLKERN_SANITIZE="$sanitizers" "$@" \
    "$python" setup.py --quiet build_ext --build-lib "$dir" >/dev/null
  stage "$dir"
}

# check_copy DIR: the interpreter imports bdlkern from DIR (not the editable install).
check_copy() {
  local got
  got=$(PYTHONPATH="$1" "${@:2}" "$python" -c 'import bdlkern; print(bdlkern.__file__)')
  if [[ $got != "$1/bdlkern/__init__.py" ]]; then
    echo "sanitize.sh: expected bdlkern from $1, got $got" >&2
    exit 1
  fi
}

# A folder with CUDA's host-compilable headers (cuda_fp16.h, ...) for the torch-free SIMT test.
cuda_headers() {
  local inc
  for inc in ${CUDA_HOME:+$CUDA_HOME/include} $("$python" -c 'import glob, nvidia, os
for base in nvidia.__path__: print(*sorted(glob.glob(os.path.join(base, "cu*", "include")), reverse=True))' 2>/dev/null) \
    /usr/local/cuda/include; do
    if [[ -f $inc/cuda_fp16.h && -f $inc/crt/host_defines.h ]]; then
      echo "$inc"
      return
    fi
  done
  echo "sanitize.sh: no CUDA headers (cuda_fp16.h) found for the SIMT C++ test" >&2
  exit 1
}

# cpp_test NAME SANITIZERS SOURCE [ARGS...]: compile a torch-free C++ test with the sanitizers, run it.
cpp_test() {
  local name=$1 sanitizers=$2 source=$3
  shift 3
  local exe=$root/build/sanitize/$name
  echo "sanitize.sh: $source with -fsanitize=$sanitizers" >&2
  g++ -std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize="$sanitizers" -pthread \
    -I"$root/csrc/include" -I"$(cuda_headers)" "$root/$source" -o "$exe"
  "$exe" "$@"
}

# Fewer hypothesis examples (BDLKERN_FUZZ_DIVISOR, tests/_properties.py): a sanitized run is
# 3-20x slower, and its point is the instrumented code paths, which a few examples reach.
pytest_args=(-q -p no:cacheprovider -m "not slow" -o addopts="--strict-markers" --durations=10)
start=$SECONDS
for run in "${runs[@]}"; do
  case $run in
    address)
      dir=$root/build/sanitize/address
      build "$dir" address,undefined
      preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
      # detect_leaks=0: CPython and torch keep allocations alive until exit by design.
      # protect_shadow_gap=0: torch's CUDA libraries map memory where ASan's gap guard would be.
      export ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0
      export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
      cpp_test counter_test address,undefined tests/cpp/counter_test.cpp
      check_copy "$dir" env LD_PRELOAD="$preload"
      echo "sanitize.sh: ASan+UBSan op tests" >&2
      PYTHONPATH=$dir LD_PRELOAD=$preload BDLKERN_FUZZ_DIVISOR=3 "$python" -m pytest "${pytest_args[@]}" "${op_tests[@]}"
      # This copy is a real CPU-only build: it must load what the normal build (CUDA in CI) saved
      # with CUDA storage locations.
      echo "sanitize.sh: a checkpoint saved by the normal build, loaded by the CPU-only copy" >&2
      LD_PRELOAD=$preload BDLKERN_TEST_LOADER_PYTHONPATH=$dir "$python" -m pytest "${pytest_args[@]}" \
        tests/test_serialization.py -k cuda_saved
      ;;
    thread)
      dir=$root/build/sanitize/thread
      build "$dir" thread BDLKERN_MAIN=0
      main_lib=$root/bdlkern/_C$suffix
      if [[ ! -f $main_lib ]]; then
        echo "sanitize.sh: $main_lib missing: run 'make build' first" >&2
        exit 1
      fi
      ln -sfn "$main_lib" "$dir/bdlkern/_C$suffix"
      preload=$(gcc -print-file-name=libtsan.so)
      # One OpenMP thread: the reference CPU kernels the SIMT results are compared with stay on
      # the calling thread; the emulated CUDA threads are the only concurrency TSan watches.
      export OMP_NUM_THREADS=1
      export TSAN_OPTIONS="halt_on_error=1:abort_on_error=1:report_signal_unsafe=0:second_deadlock_stack=1"
      # The SIMT MC-dropout GEMM (shared-memory tiles) against its float64 reference, float32 only:
      # each dtype costs minutes under TSan, and the Python SIMT tests below run the 16-bit (WMMA)
      # path too.
      cpp_test mc_dropout_simt_test thread tests/cpp/mc_dropout_simt_test.cpp --quick float32
      check_copy "$dir" env LD_PRELOAD="$preload"
      echo "sanitize.sh: TSan SIMT tests" >&2
      # Not the double-backward tests: their create_graph path adds no kernel code (it differentiates
      # ATen composites around the stream ops), and gradgradcheck's hundreds of launches take minutes
      # under TSan; ASan runs them.
      PYTHONPATH=$dir LD_PRELOAD=$preload BDLKERN_FUZZ_DIVISOR=10 "$python" -m pytest "${pytest_args[@]}" \
        -k "simt and not test_double_backward" \
        "${op_tests[@]}"
      ;;
    *)
      echo "sanitize.sh: unknown run '$run' (address or thread)" >&2
      exit 2
      ;;
  esac
done
echo "sanitize.sh: ${runs[*]} passed in $((SECONDS - start)) s"
