#!/usr/bin/env bash
# The training-quality table of the storage modes (BENCHMARKS.md): exports
# scikit-learn's bundled digits, then trains three tasks (a regression on unnormalised
# features and a next-token model over Zipf tokens, both synthetic, and the digits MLP)
# with the CPU reference in every mode, counts the element-steps over AdaMax's step
# bound, and writes docs/quality/{quality.md,quality.json,quality.svg}. Needs Python 3
# and cargo; scikit-learn is installed into a virtual environment under ~/.cache. About
# 7 to 9 minutes on 2 busy cores, after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${HOME}/.cache/adamax-cuda-quality/venv"
if [ ! -x "${venv}/bin/python" ]; then
  python3 -m venv "${venv}"
  "${venv}/bin/pip" install --quiet scikit-learn
fi
data="$(mktemp -d)/digits.csv"
"${venv}/bin/python" scripts/export_digits.py "${data}"
# tools/quality is a crate of its own (not an example of the published package).
cargo run --release --locked --manifest-path tools/quality/Cargo.toml -- "${data}" docs/quality
