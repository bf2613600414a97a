#!/usr/bin/env bash
# The test suite under AddressSanitizer + UndefinedBehaviorSanitizer (GCC, -DLORA_SANITIZE=ON),
# built in build-sanitize/ beside the normal build. Extra arguments go to ctest.
#   bash scripts/sanitize.sh           every ctest case (unit tests, examples end to end)
#   bash scripts/sanitize.sh --fast    the unit tests of what reads untrusted input (CI runs this)
set -euo pipefail
source "$(dirname "$0")/common.sh"

LORA_BUILD_DIR=${LORA_SANITIZE_BUILD_DIR:-$LORA_ROOT/build-sanitize}
# -O1: instrumented LibTorch-heavy files compile about twice as fast as at -O3, and asserts stay on.
LORA_CMAKE_OPTIONS=(-DLORA_SANITIZE=ON -DLORA_BUILD_BENCHMARKS=OFF -DCMAKE_CXX_FLAGS_RELEASE=-O1)
targets=()
if [ "${1:-}" = "--fast" ]; then
  shift
  LORA_BUILD_DIR=${LORA_SANITIZE_BUILD_DIR:-$LORA_ROOT/build-sanitize-fast}
  LORA_CMAKE_OPTIONS+=(-DLORA_BUILD_EXAMPLES=OFF "-DLORA_TEST_SUBSET=safetensors;tokenizer;data")
  targets=(lora_tests)
  set -- -R '^unit_tests$' "$@"
else
  LORA_CMAKE_OPTIONS+=(-DLORA_BUILD_EXAMPLES=ON "-DLORA_TEST_SUBSET=")
fi

# A report is a failure: stop at the first one, with a stack; leaks are checked at exit.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

lora_install_packages
lora_build ${targets[@]+"${targets[@]}"}
ctest --test-dir "$LORA_BUILD_DIR" --output-on-failure --parallel "$(nproc)" "$@"
