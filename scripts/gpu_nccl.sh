#!/usr/bin/env bash
# The sharded optimizer through real NCCL (issue #20) on the GPU machine.
#   bash scripts/gpu_nccl.sh bundle   here, after ../shared/gpu/bundle.sh: release builds of
#                                     tests/nccl.rs and examples/zero1.rs (feature `nccl`)
#                                     into .gpu/nccl/nccl-test and .gpu/examples/zero1
#                                     (not .gpu/tests/: `run.sh check` runs what is there
#                                     with --include-ignored, which would force the
#                                     two-rank tests on an NCCL that refuses them)
#   bash scripts/gpu_nccl.sh run      there, from the repository root (about a minute)
# `run`: NCCL from PyTorch's wheel (nvidia-nccl-cu13 installs libnccl.so.2 only, and
# cudarc loads libnccl.so, so a link named libnccl.so goes into a directory of its own on
# LD_LIBRARY_PATH); then the NCCL tests, which must run (ADAMAX_REQUIRE_NCCL=1: no
# silent ignore), world 1 and, with NCCL 2.30 or later, two ranks on the one GPU; then
# the example with one rank and, likewise, two. Logs go to $OUT/nccl.log.
set -uo pipefail
case "${1:-}" in
  bundle)
    mkdir -p .gpu/nccl .gpu/examples
    collect() {  # the executable of cargo's JSON messages for target $1 -> $2
      python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] == sys.argv[1]:
        shutil.copy2(msg["executable"], sys.argv[2])
        print("  " + sys.argv[2])
' "$1" "$2"
    }
    cargo test --release --features nccl --test nccl --no-run --message-format=json-render-diagnostics \
      | collect nccl .gpu/nccl/nccl-test
    cargo build --release --features nccl --example zero1 --message-format=json-render-diagnostics \
      | collect zero1 .gpu/examples/zero1
    strip --strip-debug .gpu/nccl/nccl-test .gpu/examples/zero1 2>/dev/null || true
    ;;
  run)
    OUT=${OUT:-/tmp/gpu-out}
    mkdir -p "$OUT"
    start=$(date +%s)
    rc=0
    summary='^test result|FAILED|panicked|Error|error|NCCL \(|bit for bit|differs|ignored' summary_lines=6
    . "$(dirname "$0")/gpu_step.sh"
    export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export ADAMAX_CUDA_CACHE_DIR=${ADAMAX_CUDA_CACHE_DIR:-/tmp/adamax-kernel-cache}
    lib=$(python3 -c 'import nvidia, os; print(next(os.path.join(p, "nccl", "lib") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "nccl", "lib"))))' 2>/dev/null)
    if [ -n "$lib" ] && [ -e "$lib/libnccl.so.2" ]; then
      mkdir -p /tmp/nccl-link && ln -sf "$lib/libnccl.so.2" /tmp/nccl-link/libnccl.so
      export LD_LIBRARY_PATH="/tmp/nccl-link:$lib:$LD_LIBRARY_PATH"
    fi
    { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
      git log -1 --format='commit %h %cs' 2>/dev/null || true
      echo "NCCL from ${lib:-the system}"; } | tee -a "$OUT/nccl.log"
    # Not --include-ignored: the test ignores what this NCCL cannot do (two ranks on
    # one GPU before 2.30) and runs the rest, which ADAMAX_REQUIRE_NCCL makes fail
    # rather than skip when NCCL does not load.
    export NCCL_MULTI_RANK_GPU_ENABLE=1
    ADAMAX_REQUIRE_NCCL=1 step 150 nccl.log .gpu/nccl/nccl-test
    step 60 nccl.log .gpu/examples/zero1 --save /tmp/zero1-shard
    if grep -q "NCCL (2, \(3[0-9]\|[4-9][0-9]\)," "$OUT/nccl.log"; then
      id=/tmp/zero1-$$.id
      (timeout 60 .gpu/examples/zero1 --rank 1 --world-size 2 --id-file "$id" >>"$OUT/nccl.log" 2>&1 || echo "rank 1 failed" >>"$OUT/nccl.log") &
      step 60 nccl.log .gpu/examples/zero1 --rank 0 --world-size 2 --id-file "$id"
      wait
    fi
    echo "gpu_nccl exit: $rc after $(( $(date +%s) - start ))s" | tee -a "$OUT/nccl.log"
    exit $rc
    ;;
  *) echo "usage: $0 bundle|run" >&2; exit 2 ;;
esac
