#!/usr/bin/env bash
# Builds the torch-free core, its C++ tests and the C example with AddressSanitizer and
# UndefinedBehaviorSanitizer (no recovery: the first report fails the run) and runs them. The tests
# walk every ISA path this CPU supports (and the SIMDe-emulated AVX-512 path where SIMDe is
# installed), every decode setting, and the error cases with out-of-range enums, sizes and indices.
set -euo pipefail
cd "$(dirname "$0")/.."
CMAKE=${CMAKE:-cmake}; [ -x .venv/bin/cmake ] && CMAKE=.venv/bin/cmake
NINJA_DIR=""; [ -x .venv/bin/ninja ] && NINJA_DIR=$(pwd)/.venv/bin
BUILD=build-sanitizers
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
PATH="${NINJA_DIR:+$NINJA_DIR:}$PATH" "$CMAKE" -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DGLASS_BUILD_PYTHON=OFF -DGLASS_BUILD_TESTS=ON \
  -DCMAKE_C_FLAGS="$SAN" -DCMAKE_CXX_FLAGS="$SAN" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
PATH="${NINJA_DIR:+$NINJA_DIR:}$PATH" "$CMAKE" --build "$BUILD" -j 2
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export GLASS_NUM_THREADS=2
for exe in glass_tests glass_tests_avx512_emulated; do
  if [ -x "$BUILD/$exe" ]; then
    echo "== $exe under ASan + UBSan =="
    "$BUILD/$exe"
  fi
done
echo "== glass_example under ASan + UBSan =="
"$BUILD/csrc/examples/glass_example"
