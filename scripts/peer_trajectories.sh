#!/usr/bin/env bash
# Regenerates tests/data/*.json from real peers: installs PyTorch, Keras (JAX backend),
# JAX and optax from PyPI into a throwaway virtual environment, runs
# scripts/peer_trajectories.py, and removes the environment. CI never runs this: it
# replays the committed files. Usage, from the repository root:
#   bash scripts/peer_trajectories.sh [output-dir]      (default tests/data)
set -euo pipefail
out=${1:-tests/data}
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# The versions the committed data was made with; newer ones should agree within the
# tolerances the tests state.
"$venv/bin/pip" install --quiet torch==2.15.0 keras==3.15.1 jax==0.10.2 optax==0.2.8 numpy==2.4.6
KERAS_BACKEND=jax JAX_PLATFORMS=cpu "$venv/bin/python" scripts/peer_trajectories.py "$out"
