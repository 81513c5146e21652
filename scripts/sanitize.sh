#!/usr/bin/env bash
# Builds the safetensors core with its test/fuzz driver under AddressSanitizer + UndefinedBehaviorSanitizer
# and runs it. Usage: scripts/sanitize.sh [fuzz_iterations]   (no Python, no external dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
iterations="${1:-20000}"
build="$(mktemp -d "${TMPDIR:-/tmp}/lora_fast_sanitize.XXXXXX")"
trap 'rm -rf "$build"' EXIT
"${CXX:-g++}" -std=c++17 -g -O1 -Wall -Wextra -Werror -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=all \
    -Icsrc csrc/safetensors.cpp csrc/tests/test_safetensors.cpp -o "$build/test_safetensors"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$build/test_safetensors" "$iterations" "$build"
