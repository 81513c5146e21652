#!/usr/bin/env bash
# Builds the C++ core's test drivers under sanitizers and runs them (no Python, no external dependencies):
#   1. safetensors parser/writer test + fuzz driver under AddressSanitizer + UndefinedBehaviorSanitizer;
#   2. stream reader driver (threads, ring, faults, abandonment) under ASan + UBSan;
#   3. the same stream reader driver under ThreadSanitizer;
#   4. CPU merge kernel driver (fuse against a reference, unfuse exactness, every ISA, 1 and 4 threads) under
#      ASan + UBSan and under TSan.
# Usage: scripts/sanitize.sh [fuzz_iterations] [stream_rounds] [merge_rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
iterations="${1:-20000}"
rounds="${2:-200}"
merge_rounds="${3:-2}"
build="$(mktemp -d "${TMPDIR:-/tmp}/lora_fast_sanitize.XXXXXX")"
trap 'rm -rf "$build"' EXIT
cxx="${CXX:-g++}"
common=(-std=c++17 -g -O1 -Wall -Wextra -Werror -fno-omit-frame-pointer -pthread -Icsrc)
asan=(-fsanitize=address,undefined -fno-sanitize-recover=all)
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1

"$cxx" "${common[@]}" "${asan[@]}" csrc/safetensors.cpp csrc/tests/test_safetensors.cpp -o "$build/test_safetensors"
"$build/test_safetensors" "$iterations" "$build"

mkdir -p "$build/stream_asan" "$build/stream_tsan"
"$cxx" "${common[@]}" "${asan[@]}" csrc/safetensors.cpp csrc/stream_reader.cpp csrc/tests/test_stream_reader.cpp \
    -o "$build/test_stream_reader_asan"
"$build/test_stream_reader_asan" "$rounds" "$build/stream_asan"

"$cxx" "${common[@]}" -fsanitize=thread csrc/safetensors.cpp csrc/stream_reader.cpp csrc/tests/test_stream_reader.cpp \
    -o "$build/test_stream_reader_tsan"
"$build/test_stream_reader_tsan" "$(( rounds / 2 ))" "$build/stream_tsan"

"$cxx" "${common[@]}" "${asan[@]}" csrc/merge_cpu.cpp csrc/tests/test_merge_cpu.cpp -o "$build/test_merge_cpu_asan"
"$build/test_merge_cpu_asan" "$merge_rounds"
"$cxx" "${common[@]}" -fsanitize=thread csrc/merge_cpu.cpp csrc/tests/test_merge_cpu.cpp -o "$build/test_merge_cpu_tsan"
"$build/test_merge_cpu_tsan" 1
echo "sanitize: all drivers passed"
