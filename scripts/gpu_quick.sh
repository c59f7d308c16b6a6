#!/usr/bin/env bash
# A short GPU check for what is left of a session's device time after
# `bash .gpu/run.sh check` (../shared/GPU.md), run from the repository root beside the
# bundle (.gpu/, from ../shared/gpu/bundle.sh), about three minutes:
#   1. the GPU tests (every mode against the CPU reference, graphs, raw entry points);
#   2. the instruction audit under the machine's NVRTC;
#   3. every mode's throughput beside a copy of its bytes (examples/throughput.rs);
#   4. Nsight Compute's issue-slot use, DRAM throughput and occupancy for f32, f32_q8 and
#      bf16_sr_q8 on 2^24 elements (one launch each, after warm-up);
#   5. racecheck on GPU tests that reach the update, reduce and finalize kernels on
#      small tensors (a few seconds): the full matrix, one test at a time, took about
#      1.5 s a test under racecheck on an H200 (an estimated 175-180 s, at the edge of
#      run.sh's 180 s step).
# Logs go to $OUT: device.txt, quick.log, throughput.jsonl, ncu.txt, racecheck.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
start=$(date +%s)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ADAMAX_CUDA_CACHE_DIR=${ADAMAX_CUDA_CACHE_DIR:-/tmp/adamax-kernel-cache}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  git log -1 --format='commit %h %cs' 2>/dev/null || true
} | tee "$OUT/device.txt"
rc=0
summary='^test result|FAILED|panicked|ERROR SUMMARY|RACECHECK SUMMARY' summary_lines=3
. "$(dirname "$0")/gpu_step.sh"
step 120 quick.log .gpu/tests/gpu-test --include-ignored
step 45 quick.log .gpu/tests/sass_audit-test --include-ignored
echo "== throughput ($(( $(date +%s) - start ))s)"
timeout 70 .gpu/examples/throughput >"$OUT/throughput.jsonl" 2>>"$OUT/quick.log" || rc=1
python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("%-10s %-24s %8.4f ms %7.0f GB/s  copy %7.0f GB/s  ratio %.3f" % (r["storage"], r["shape"], r["ms"], r["gbps"], r["copy_gbps"], r["ratio_to_copy"]))
' "$OUT/throughput.jsonl"
if command -v ncu >/dev/null; then
  for mode in f32 f32_q8 bf16_sr_q8; do
    step 40 ncu.txt ncu --kernel-name "adamax_step_$mode" --launch-skip 5 --launch-count 1 \
      --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__inst_issued.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum \
      .gpu/examples/throughput "$mode" 'flat_2^24'
  done
  grep -E "adamax_step|gpu__time|dram__|sm__inst|sm__warps|smsp__inst" "$OUT/ncu.txt"
fi
if command -v compute-sanitizer >/dev/null; then
  # One filter per run (the test binary takes one): every update entry point but the
  # f32/f16 8-bit ones (the bf16 ones share their template), then reduce and finalize.
  for filter in nan_and_inf fused_clipping_alone; do
    step 60 racecheck.log compute-sanitizer --tool racecheck --error-exitcode 9 .gpu/tests/gpu-test \
      --include-ignored --test-threads=1 "$filter"
  done
fi
echo "gpu_quick exit: $rc after $(( $(date +%s) - start ))s"
exit $rc
