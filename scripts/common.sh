# Shared by scripts/demo.sh and scripts/test.sh: install what lora needs, then build.
# Sourced, not run.

LORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LORA_BUILD_DIR=${LORA_BUILD_DIR:-$LORA_ROOT/build}

# Debian 12 packages. libopenblas0-openmp: without it LibTorch falls back to the reference
# BLAS, ~20x slower on matmuls. clang-14: the headers are also checked under clang (ctest
# headers_clang), and the fuzzers (scripts/fuzz.sh) need it. libgloo-dev: the headers of the
# Gloo library that libtorch_cpu already links, for lora::distributed.
LORA_PACKAGES=(g++ make cmake libtorch-dev libopenblas0-openmp libgtest-dev libbenchmark-dev nlohmann-json3-dev libutf8proc-dev pkg-config libcli11-dev libcurl4-openssl-dev libcpp-httplib-dev python3 clang-14 libgloo-dev)

lora_install_packages() {
  local missing=() package
  for package in "${LORA_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0

  local install="apt-get install -y --no-install-recommends ${missing[*]}"
  echo "lora: installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive $install
  elif command -v sudo > /dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive $install
  else
    echo "lora: cannot install packages (not root, no sudo). As root, run:" >&2
    echo "  apt-get update && $install" >&2
    return 1
  fi
}

# lora_build [target...]: configure (Release, plus the options in the LORA_CMAKE_OPTIONS array)
# and build the given targets, or everything.
lora_build() {
  cmake -S "$LORA_ROOT" -B "$LORA_BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${LORA_CMAKE_OPTIONS[@]+"${LORA_CMAKE_OPTIONS[@]}"} > /dev/null || return 1
  local targets=()
  [ $# -gt 0 ] && targets=(--target "$@")
  cmake --build "$LORA_BUILD_DIR" --parallel "$(nproc)" "${targets[@]}"
}
