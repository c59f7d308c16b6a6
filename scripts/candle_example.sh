#!/usr/bin/env bash
# Builds integrations/candle-spiral (candle trains an MLP on the GPU, adamax-cuda steps
# its parameters) on a machine without CUDA or a GPU: candle's CUDA backend needs nvcc
# and the CUDA libraries at build time, taken here from PyPI's CUDA 13.0 wheels. CI does
# not run this (about 10 minutes of nvcc on 2 cores, and 1.2 GB of wheels).
#
#   usage, from the repository root: bash scripts/candle_example.sh
#   then, on a machine with an NVIDIA GPU (driver 580 or newer for CUDA 13.0):
#     LD_LIBRARY_PATH=<the printed lib directory> integrations/candle-spiral/target/release/adamax-cuda-candle-spiral
#
# Environment: ADAMAX_CANDLE_CUDA (where the wheels go; default ~/.cache/adamax-cuda-candle),
# CUDA_COMPUTE_CAP (candle's kernels' architecture; default 90, an H100).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${ADAMAX_CANDLE_CUDA:-$HOME/.cache/adamax-cuda-candle}
venv=$root/venv
manifest=integrations/candle-spiral/Cargo.toml

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
# build script looks and the run-time loader does not. The binary needs libcuda.so.1,
# the real driver, when it runs.
cargo fetch --locked --manifest-path "$manifest"
cudarc=$(cargo metadata --locked --format-version 1 --manifest-path "$manifest" |
  python3 -c 'import json, os, sys; m = json.load(sys.stdin); print(os.path.dirname([p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc"][0]))')
mkdir -p "$cuda/lib/stubs"
grep -oE "fn (cu[A-Za-z0-9_]+)\(" "$cudarc/src/driver/sys/mod.rs" | sed 's/fn //; s/(//' | sort -u |
  sed 's/.*/void &(void) {}/' > "$cuda/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/libcuda_stub.c"

export CUDA_ROOT=$cuda CUDA_PATH=$cuda PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} NVCC_CCBIN=${NVCC_CCBIN:-g++}
echo "== building $manifest with nvcc $(nvcc --version | tail -n 1)"
cargo build --release --locked --manifest-path "$manifest"
echo "built integrations/candle-spiral/target/release/adamax-cuda-candle-spiral"
echo "run it on a GPU with LD_LIBRARY_PATH=$cuda/lib"
