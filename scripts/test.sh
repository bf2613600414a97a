#!/usr/bin/env bash
# The README's test command: install what is missing, build in Release, run every test.
# Tests that need ../shared (reference outputs, datasets) run when LORA_SHARED_DIR is set
# and skip with a message otherwise. Extra arguments go to ctest.
set -euo pipefail
source "$(dirname "$0")/common.sh"

lora_install_packages
lora_build
ctest --test-dir "$LORA_BUILD_DIR" --output-on-failure --parallel "$(nproc)" "$@"
