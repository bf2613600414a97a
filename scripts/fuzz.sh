#!/usr/bin/env bash
# Builds the libFuzzer targets (clang-14, AddressSanitizer + UndefinedBehaviorSanitizer) in
# build-fuzz/ and runs each for SECONDS (default 60), or for RUNS executions, from the seed
# corpora in fuzz/corpus/. New inputs go to build-fuzz/corpus/<target>, crashes to
# build-fuzz/crashes/, each run's log to build-fuzz/<target>.log.
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]        (targets: safetensors config tokenizer tsv)
#   bash scripts/fuzz.sh --runs RUNS [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
limit=(-max_total_time="${1:-60}")
if [ "${1:-}" = "--runs" ]; then
  limit=(-runs="$2")
  shift
fi
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors config tokenizer tsv)
if ! command -v clang++-14 > /dev/null || [ ! -e /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer-x86_64.a ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get install -y clang-14 libclang-rt-14-dev
fi
cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 -DLORA_BUILD_FUZZERS=ON \
  -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF -DLORA_BUILD_BENCHMARKS=OFF -DLORA_INSTALL=OFF > /dev/null
cmake --build build-fuzz --parallel "$(nproc)" --target $(printf 'lora-fuzz-%s ' "${targets[@]}")
mkdir -p build-fuzz/crashes
status=0
for target in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$target"
  echo "== $target: ${limit[*]}"
  if ! ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 "build-fuzz/fuzz/lora-fuzz-$target" \
      "${limit[@]}" -print_final_stats=1 -rss_limit_mb=4096 -max_len=4096 -timeout=10 \
      -artifact_prefix="build-fuzz/crashes/$target-" "build-fuzz/corpus/$target" "fuzz/corpus/$target" \
      2> "build-fuzz/$target.log"; then
    status=1
    echo "   FAILED: see build-fuzz/$target.log and build-fuzz/crashes/"
  fi
  grep -E "^Done |stat::peak_rss_mb" "build-fuzz/$target.log" | sed 's/^/   /'
done
exit $status
