#!/usr/bin/env bash
# The candle crates on a GPU (../shared/GPU.md), from the repository root beside the
# candle bundle (.gpu/candle/, from `bash scripts/candle_adapter.sh bundle`), about
# three minutes:
#   1. the adapter's GPU tests: the adapter on the GPU against itself on the CPU (the
#      CPU reference), bit for bit, in every dtype and storage mode;
#   2. the spiral example: candle trains an MLP, f32 and bf16 with masters, its first
#      step checked against the CPU bit for bit, over 95% test accuracy expected;
#   3. the optimizer step of GPT-2 small with the adapter, with candle-optimisers 0.10's
#      Adamax, and a device-to-device copy of the adapter's bytes (criterion, short).
# The binaries link CUDA 13's cuBLAS, cuRAND, cudart and NVRTC: taken from PyTorch's
# wheels on the GPU machine. Logs go to $OUT: candle-device.txt, candle.log,
# candle-bench.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
start=$(date +%s)
lib=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="${lib:+$lib:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ADAMAX_CUDA_CACHE_DIR=${ADAMAX_CUDA_CACHE_DIR:-/tmp/adamax-kernel-cache}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  git log -1 --format='commit %h %cs' 2>/dev/null || true
  echo "CUDA libraries from: ${lib:-(none found in the PyTorch wheels)}"
} | tee "$OUT/candle-device.txt"
[ -f .gpu/candle/adapter-gpu-test.xz ] || { echo "no .gpu/candle/: run bash scripts/candle_adapter.sh bundle on the build machine" >&2; exit 2; }
# The binaries travel xz-compressed (candle embeds its kernels' PTX: about 50 MB each,
# 6 MB compressed); Python's lzma unpacks them, so no xz is needed here.
bin=${ADAMAX_CANDLE_BIN:-/tmp/adamax-candle-bin}
mkdir -p "$bin"
for f in .gpu/candle/*.xz; do
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "$bin/$(basename "$f" .xz)"
  chmod +x "$bin/$(basename "$f" .xz)"
done
rc=0
summary='^test result|FAILED|panicked|first step|test accuracy [0-9.]+%$|^\| ' summary_lines=8
. "$(dirname "$0")/gpu_step.sh"
step 60 candle.log "$bin/adapter-gpu-test" --include-ignored
step 90 candle.log "$bin/adamax-cuda-candle-spiral"
step 90 candle-bench.log "$bin/vs-candle-optimisers" --bench --warm-up-time 1 --measurement-time 3
grep -E "^gpt2|time:|thrpt:" "$OUT/candle-bench.log"
echo "gpu_candle exit: $rc after $(( $(date +%s) - start ))s"
exit $rc
