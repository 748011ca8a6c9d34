#!/usr/bin/env bash
# `make gpu-check`: the one command for the day a CUDA machine is available (issue 18, section 5).
#
#   tools/gpu_check.sh [--dry-run] [PYTHON]        (default PYTHON: .venv/bin/python)
#
# On a CUDA machine, in order, each step timed, then one table:
#   1. build   bdlkern for the local GPU's architecture only (TORCH_CUDA_ARCH_LIST from
#              torch.cuda.get_device_capability), with the SIMT test extension;
#   2. tests   every CUDA-parametrised test (the `cuda` ids of the backend fixtures) and the
#              GPU-only tests: the ops under set_sync_debug_mode("error") and CUDA-graph capture and
#              replay (tests/test_no_host_sync.py), the emulator's self-tests on the device;
#   3. sanitizer  compute-sanitizer racecheck, memcheck and synccheck over a representative subset
#              (the self-test kernels and the MC-dropout, Concrete, Gaussian-dropout and CSR ops), when
#              the tool is on PATH;
#   4. bench   python -m bdlkern.bench --device cuda --quick (with the eager, cuBLAS / cuDNN baselines
#              the cases define).
# Sized for one H100 in <= 10 min. `--dry-run` runs the same script on a machine without a GPU, so it
# stays working: no build (the existing one is used), the same tests on the SIMT emulator instead of
# the device (the `simt` ids of the emulator and no-host-read tests), no compute-sanitizer, and the
# benchmark on the CPU for two small cases. Exit status: 0 when every step that ran passed.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
dry=0
python=.venv/bin/python
for arg in "$@"; do
  case $arg in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) python=$arg ;;
  esac
done
export PYTHONSAFEPATH=1

names=() states=() seconds=() details=()
record() {  # name state seconds detail
  names+=("$1") states+=("$2") seconds+=("$3") details+=("$4")
}
run_step() {  # name detail command...
  local name=$1 detail=$2
  shift 2
  local start=$SECONDS log="build/gpu_check_${name}.log"
  mkdir -p build
  echo "== gpu-check: $name: $*" >&2
  if "$@" >"$log" 2>&1; then
    record "$name" pass $((SECONDS - start)) "$detail ($(tail -n 1 "$log" | cut -c1-80))"
  else
    record "$name" FAIL $((SECONDS - start)) "$detail: see $log"
    tail -n 20 "$log" >&2
  fi
}

if [[ $dry -eq 0 ]]; then
  if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: torch sees no CUDA device (use --dry-run to check the script without one)" >&2
    exit 2
  fi
  arch=$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  run_step build "sm_${arch/./} only" env TORCH_CUDA_ARCH_LIST="$arch" BDLKERN_CUDA=1 BDLKERN_SIMT=1 \
    "$python" -m pip install --quiet --no-build-isolation --no-deps -e .
  run_step tests "CUDA-parametrised tests, sync-debug and graph capture" \
    "$python" -m pytest -q -p no:cacheprovider -k "cuda" tests
  if command -v compute-sanitizer >/dev/null 2>&1; then
    subset=(tests/test_simt.py tests/test_mc_dropout.py tests/test_mc_dropout_paths.py tests/test_concrete_dropout.py
            tests/test_gaussian_dropout.py tests/test_sparse_linear.py)
    for tool in racecheck memcheck synccheck; do
      run_step "sanitizer-$tool" "compute-sanitizer --tool $tool" \
        compute-sanitizer --tool "$tool" --error-exitcode 1 "$python" -m pytest -q -p no:cacheprovider \
        -k "cuda and not gradcheck" "${subset[@]}"
    done
  else
    record sanitizer skipped 0 "compute-sanitizer not on PATH"
  fi
  run_step bench "bdlkern vs eager / cuBLAS / cuDNN baselines" \
    "$python" -m bdlkern.bench --device cuda --quick --no-progress
else
  run_step build "dry run: the existing build" \
    "$python" -c 'import bdlkern, json; print(json.dumps(bdlkern.build_info()))'
  run_step tests "dry run: the emulator and no-host-read tests on SIMT" \
    "$python" -m pytest -q -p no:cacheprovider -k "simt or not cuda" tests/test_simt.py tests/test_no_host_sync.py
  record sanitizer skipped 0 "dry run: compute-sanitizer needs a GPU"
  run_step bench "dry run: two quick CPU cases" \
    "$python" -m bdlkern.bench --quick --no-progress --case methods.ard_kl --case methods.gaussian_dropout
fi

failed=0
printf '\n%-18s %-8s %6s  %s\n' step result seconds detail
printf '%-18s %-8s %6s  %s\n' ------------------ -------- ------ ------
for i in "${!names[@]}"; do
  printf '%-18s %-8s %6s  %s\n' "${names[$i]}" "${states[$i]}" "${seconds[$i]}" "${details[$i]}"
  [[ ${states[$i]} == FAIL ]] && failed=1
done
exit $failed
