#!/usr/bin/env bash
# The README's demo: install what is missing, build in Release, run the sentiment program's
# built-in demo (no downloads).
# Arguments are passed to the program. Safe to run again: it only rebuilds what changed.
set -euo pipefail
source "$(dirname "$0")/common.sh"

lora_install_packages
lora_build lora-sentiment
exec "$LORA_BUILD_DIR/examples/lora-sentiment" "$@"
