#!/usr/bin/env bash
# Cross-builds the torch-free core, its C++ tests and the C example for aarch64 and runs them under
# qemu-aarch64, twice: on a CPU model with the fp16/bf16 extensions (QEMU_CPU=max) and on one without
# them (QEMU_CPU=cortex-a72), so the run-time fallback is exercised. Emulated runs check correctness
# only; their timings mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++-aarch64-linux-gnu qemu-user cmake ninja-build >/dev/null
fi
CMAKE=${CMAKE:-cmake}; [ -x .venv/bin/cmake ] && CMAKE=.venv/bin/cmake
NINJA_DIR=""; [ -x .venv/bin/ninja ] && NINJA_DIR=$(pwd)/.venv/bin
BUILD=build-aarch64
PATH="${NINJA_DIR:+$NINJA_DIR:}$PATH" "$CMAKE" -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake \
  -DGLASS_BUILD_PYTHON=OFF -DGLASS_BUILD_TESTS=ON
PATH="${NINJA_DIR:+$NINJA_DIR:}$PATH" "$CMAKE" --build "$BUILD" -j 2
export OMP_NUM_THREADS=2 GLASS_NUM_THREADS=2
# The kernels the automatic choice must run on each CPU model (the C++ tests check it): "max" has
# FEAT_FHM and FEAT_BF16, so fp16 and bf16 take the extension kernels; cortex-a72 (ARMv8.0) has
# neither and must fall back to plain NEON.
declare -A EXPECT=(
  [max]="f32_sparse_ffn__neon,f16_sparse_ffn__neon_fhm,bf16_sparse_ffn__neon_bf16"
  [cortex-a72]="f32_sparse_ffn__neon,f16_sparse_ffn__neon,bf16_sparse_ffn__neon"
)
for cpu in max cortex-a72; do
  echo "== aarch64 under qemu, QEMU_CPU=$cpu =="
  QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu "$BUILD/glass_tests" --isa-report
  (cd "$BUILD" && QEMU_CPU=$cpu GLASS_EXPECT_KERNELS="${EXPECT[$cpu]}" ctest --output-on-failure)
done
