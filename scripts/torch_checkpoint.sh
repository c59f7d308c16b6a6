#!/usr/bin/env bash
# Regenerates tests/data/checkpoint/ from PyTorch: installs torch and safetensors into a
# throwaway virtual environment and runs scripts/torch_checkpoint.py (three 1-D tensors)
# and scripts/torch_model.py generate (a CNN with a transformer encoder, N-D state, f32
# and bf16). CI never runs this. scripts/torch_model.py also converts any Adamax state
# dict to the crate's files and back: run it with the same packages.
#   usage, from the repository root: bash scripts/torch_checkpoint.sh [output-dir]
set -euo pipefail
out=${1:-tests/data/checkpoint}
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch==2.15.0 safetensors==0.8.0 numpy==2.4.6
"$venv/bin/python" scripts/torch_checkpoint.py "$out"
"$venv/bin/python" scripts/torch_model.py generate "$out"
