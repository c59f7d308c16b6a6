#!/usr/bin/env bash
# Builds the candle adapter (integrations/adamax-cuda-candle) with its `cuda` feature,
# and the example on it (integrations/candle-spiral), on a machine without CUDA or a
# GPU: candle's CUDA backend needs nvcc and the CUDA libraries at build time, taken here
# from PyPI's CUDA 13.0 wheels (about 1.2 GB; candle's kernels take about 10 minutes of
# nvcc on 2 cores, once).
#
#   usage, from the repository root:
#     bash scripts/candle_adapter.sh test     the adapter's tests, built with `cuda`:
#                                             the CPU ones run, the GPU ones report
#                                             ignored without a GPU (CI runs this)
#     bash scripts/candle_adapter.sh bundle   release builds of the adapter's GPU test,
#                                             the spiral example and the bench against
#                                             candle-optimisers (integrations/candle-bench,
#                                             which builds candle 0.10 too), gathered in
#                                             .gpu/candle/ for a GPU machine
#                                             (../shared/GPU.md)
#     bash scripts/candle_adapter.sh spiral   the spiral example alone, in release
#   then, on a machine with an NVIDIA GPU (driver 580 or newer for CUDA 13.0):
#     LD_LIBRARY_PATH=<the printed lib directory> integrations/target/release/adamax-cuda-candle-spiral
#
# Environment: ADAMAX_CANDLE_CUDA (where the wheels go; default ~/.cache/adamax-cuda-candle),
# CUDA_COMPUTE_CAP (candle's kernels' architecture; default 90, an H100 or H200).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}
root=${ADAMAX_CANDLE_CUDA:-$HOME/.cache/adamax-cuda-candle}
venv=$root/venv
# The candle crates are one workspace (one lockfile, one target directory, so candle's
# kernels are compiled once per profile).
manifest=integrations/Cargo.toml
target=integrations/target
ws=(--locked --manifest-path "$manifest")

if ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  echo "== installing the CUDA 13.0 toolchain and libraries from PyPI into $venv"
  python3 -m venv "$venv"
  # 13.0 throughout: a newer nvvm emits PTX too new for driver 580 (CUDA 13.0).
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' \
    'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' \
    'nvidia-cublas==13.0.*' 'nvidia-curand<10.5'
fi
cuda=$(cd "$venv"/lib/python3*/site-packages/nvidia/cu13 && pwd)

# The linker looks for unversioned names; the wheels ship versioned ones.
for lib in cublas cublasLt cudart curand nvrtc; do
  real=$(cd "$cuda/lib" && ls "lib$lib.so."* | grep -v builtins | head -n 1)
  ln -sf "$real" "$cuda/lib/lib$lib.so"
done

# libcuda comes with the driver, not the toolkit wheels: a stub with the driver API's
# symbols (as cudarc declares them) to link against, in lib/stubs, where cudarc's
# build script looks and the run-time loader does not. Every function of the stub
# returns CUDA_ERROR_NO_DEVICE (100), so that the tests, run against it (lib/nodriver),
# see a machine without a GPU: candle's Device::new_cuda fails, CPU tests run, GPU
# tests report ignored. On a GPU machine the binaries load the real driver's
# libcuda.so.1.
cargo fetch --locked --manifest-path "$manifest"
# Every cudarc in the workspace (candle 0.10, for the bench, has its own): the union of
# their driver symbols.
cudarc=$(cargo metadata --locked --format-version 1 --manifest-path "$manifest" |
  python3 -c 'import json, os, sys; m = json.load(sys.stdin); print("\n".join(os.path.dirname(p["manifest_path"]) + "/src/driver/sys/mod.rs" for p in m["packages"] if p["name"] == "cudarc"))')
mkdir -p "$cuda/lib/stubs"
echo "$cudarc" | xargs grep -ohE "fn (cu[A-Za-z0-9_]+)\(" | sed 's/fn //; s/(//' | sort -u |
  sed 's/.*/int &(void) { return 100; }/' > "$cuda/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/libcuda_stub.c"
mkdir -p "$cuda/lib/nodriver"
ln -sf ../stubs/libcuda.so "$cuda/lib/nodriver/libcuda.so.1"

export CUDA_ROOT=$cuda CUDA_PATH=$cuda PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} NVCC_CCBIN=${NVCC_CCBIN:-g++}
echo "== nvcc $(nvcc --version | tail -n 1), compute capability $CUDA_COMPUTE_CAP"
case $what in
  test)
    echo "== adamax-cuda-candle: clippy and tests with the cuda feature"
    cargo clippy "${ws[@]}" -p adamax-cuda-candle --all-targets --features cuda -- -D warnings
    LD_LIBRARY_PATH="$cuda/lib/nodriver:$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
      cargo test "${ws[@]}" -p adamax-cuda-candle --features cuda
    echo "== candle-spiral and candle-bench: clippy with the cuda feature (they run on a GPU only)"
    cargo clippy "${ws[@]}" -p adamax-cuda-candle-spiral -p adamax-cuda-candle-bench \
      --all-targets --features adamax-cuda-candle-bench/cuda -- -D warnings
    ;;
  spiral | bundle)
    cargo build --release "${ws[@]}" -p adamax-cuda-candle-spiral
    echo "built $target/release/adamax-cuda-candle-spiral"
    echo "run it on a GPU with LD_LIBRARY_PATH=$cuda/lib"
    ;;&
  bundle)
    out=.gpu/candle
    mkdir -p "$out"
    exe=$(cargo test --release "${ws[@]}" -p adamax-cuda-candle --features cuda --no-run \
      --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
    cp "$exe" "$out/adapter-gpu-test"
    cp "$target/release/adamax-cuda-candle-spiral" "$out/"
    exe=$(cargo bench "${ws[@]}" -p adamax-cuda-candle-bench --features cuda --no-run \
      --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["executable"])')
    cp "$exe" "$out/vs-candle-optimisers"
    strip --strip-debug "$out"/* 2>/dev/null || true
    # candle embeds its kernels' PTX: about 50-70 MB a binary, a sixth of that with xz.
    # scripts/gpu_candle.sh unpacks them on the GPU machine.
    xz -T0 -6 -f "$out"/adapter-gpu-test "$out"/adamax-cuda-candle-spiral "$out"/vs-candle-optimisers
    du -sh "$out" | awk '{print "candle bundle: " $1 " (the bundle travels with the working tree: 64 MiB in all)"}'
    # The CUDA libraries they link (cuBLAS, cuRAND, cudart, NVRTC) are not carried: the
    # GPU machine has them in PyTorch's wheels (../shared/GPU.md), where
    # scripts/gpu_candle.sh finds them.
    echo "on the GPU machine: bash scripts/gpu_candle.sh"
    ;;
  spiral) ;;
  *) echo "usage: $0 test|bundle|spiral" >&2; exit 2 ;;
esac
