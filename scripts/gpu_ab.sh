#!/usr/bin/env bash
# Builds of the kernel timed against each other on the GPU machine, for a kernel change
# that the build machine can check (no spills, the instruction audit, the host
# emulation) but not time. The throughput example embeds the kernel it was built with,
# so each build is its own binary; run in turn on one machine in one session, each
# beside a copy of its bytes, they compare without the drift between sessions.
#
#   bash scripts/gpu_ab.sh bundle REV...   (build machine) examples/throughput built at
#       each git commit (a temporary worktree each: commit the change first) into
#       .gpu/ab/NN-SHA/throughput, with this script as .gpu/ab/run.sh; `.gpu` travels
#       with `run`'s carry. About 2 minutes a build once the dependencies are built.
#   bash .gpu/ab/run.sh [MODE SHAPE]...    (GPU machine, from the repository root) every
#       build in turn for each MODE SHAPE pair of examples/throughput.rs, twice round,
#       in the opposite order the second time (default: f32, f32_q8, bf16_q8 and
#       bf16_sr_q8 at 124M parameters, and f32_q8 and bf16_sr_q8 at 2^24, where a
#       grid's last wave of units weighs most); its JSON lines, each tagged with the
#       build and round, to stdout and $OUT/ab.jsonl. Each build compiles its kernel
#       once (NVRTC, cached for its later runs); each run is limited to 120 s.
set -euo pipefail
if [ "${1:-}" = bundle ]; then
  shift
  [ $# -ge 1 ] || { echo "usage: $0 bundle REV..." >&2; exit 2; }
  self=$(realpath "$0")
  cd "$(git -C "$(dirname "$self")" rev-parse --show-toplevel)"
  target=${ADAMAX_AB_TARGET:-/tmp/adamax-ab-target}
  rm -rf .gpu/ab
  mkdir -p .gpu/ab
  n=0
  for rev in "$@"; do
    sha=$(git rev-parse --short "$rev^{commit}")
    tree=$(mktemp -d)
    git worktree add --quiet --detach "$tree" "$sha"
    built=0
    (cd "$tree" && cargo build --release --quiet --example throughput --target-dir "$target") &&
      built=1
    git worktree remove --force "$tree"
    [ $built = 1 ] || { echo "building the throughput example at $sha failed" >&2; exit 1; }
    n=$((n + 1))
    out=.gpu/ab/$(printf '%02d' "$n")-$sha
    mkdir -p "$out"
    cp "$target/release/examples/throughput" "$out/"
    echo "$out: $(git log -1 --format='%h %s' "$sha" | cut -c1-100)"
  done
  cp "$self" .gpu/ab/run.sh
  exit 0
fi
[ -d .gpu/ab ] || { echo "run from the repository root, after $0 bundle REV..." >&2; exit 2; }
[ $(($# % 2)) = 0 ] || { echo "usage: $0 [MODE SHAPE]... (pairs)" >&2; exit 2; }
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Each build compiles its own kernel source (the cache is keyed by the source's hash).
export ADAMAX_CUDA_CACHE_DIR=${ADAMAX_CUDA_CACHE_DIR:-/tmp/adamax-ab-cache}
[ $# -ge 2 ] || set -- f32 flat_124439808 f32_q8 flat_124439808 bf16_q8 flat_124439808 \
  bf16_sr_q8 flat_124439808 f32_q8 'flat_2^24' bf16_sr_q8 'flat_2^24'
pairs=("$@")
mapfile -t builds < <(ls -d .gpu/ab/*/)
rc=0
for round in 1 2; do
  order=("${builds[@]}")
  [ $round = 1 ] || mapfile -t order < <(printf '%s\n' "${builds[@]}" | sort -r)
  for ((i = 0; i < ${#pairs[@]}; i += 2)); do
    for build in "${order[@]}"; do
      name=$(basename "$build")
      # Each line is one JSON object: the build and round go in front of its fields.
      timeout --kill-after=5 120 "$build/throughput" "${pairs[i]}" "${pairs[i + 1]}" \
        2>>"$OUT/ab.log" | sed "s/^{/{\"build\":\"$name\",\"round\":$round,/" |
        tee -a "$OUT/ab.jsonl" || rc=1
    done
  done
done
exit $rc
