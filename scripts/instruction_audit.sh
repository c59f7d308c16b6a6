#!/usr/bin/env bash
# The static instruction audit's budgets (tests/sass_audit.rs, issue #19): compiles every
# update with CI's NVRTC (the newest 13.x), reads the instructions per parameter of each
# hot loop from nvdisasm's SASS, prints the tables for BENCHMARKS.md and rewrites
# tests/audit/instruction_budgets.json (today's figures + 0.5 per parameter), then does
# the same under the GPU machine's NVRTC (CUDA 13.0) into the file's `also` section. Run it after
# a kernel change that moves the figures, and commit the file with the change. Installs
# NVRTC and nvdisasm from PyPI into ~/.cache/adamax-cuda-ci/ as .ci/run does, when
# missing. No GPU; about 10 seconds once built.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${ADAMAX_NVRTC_ROOT:-$HOME/.cache/adamax-cuda-ci/nvrtc}
tools=${ADAMAX_NVDISASM_ROOT:-$HOME/.cache/adamax-cuda-ci/nvdisasm}
pip_install() {  # target dir, pip requirement
  [ -x "$root/venv/bin/pip" ] || python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --target "$1" "$2"
}
find_or_install_nvrtc() {  # dir under $root, pip requirement -> libnvrtc.so.13's path
  local lib
  lib=$(find "$root/$1" -name libnvrtc.so.13 2>/dev/null | head -n 1)
  if [ -z "$lib" ]; then
    pip_install "$root/$1" "$2" >&2
    lib=$(find "$root/$1" -name libnvrtc.so.13 | head -n 1)
  fi
  echo "$lib"
}
nvrtc=$(find_or_install_nvrtc 13 'nvidia-cuda-nvrtc>=13,<14')
nvrtc_gpu=$(find_or_install_nvrtc 13.0 'nvidia-cuda-nvrtc==13.0.*')
nvdisasm=$(find "$tools/13" -path '*/bin/nvdisasm' -type f 2>/dev/null | head -n 1)
if [ -z "$nvdisasm" ]; then
  pip_install "$tools/13" 'nvidia-cuda-nvdisasm>=13,<14'
  nvdisasm=$(find "$tools/13" -path '*/bin/nvdisasm' -type f | head -n 1)
fi
export ADAMAX_NVDISASM="$nvdisasm"
# CI's NVRTC first (the file's own budgets), then the GPU machine's (CUDA 13.0, `also`)
LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  ADAMAX_AUDIT_WRITE=1 cargo test --test sass_audit
LD_LIBRARY_PATH="$(dirname "$nvrtc_gpu")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  ADAMAX_AUDIT_WRITE=also cargo test --test sass_audit
git diff --stat -- tests/audit/instruction_budgets.json
