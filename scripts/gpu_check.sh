#!/usr/bin/env bash
# One short, prepared GPU check (under 5 minutes on an H100): the CUDA tests, then the
# benchmark on CUDA. Run from the repository root on a machine with a GPU; results land in
# ${OUT:-.}/bench_cuda.json and on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
# GPU machines may have no network: use what is installed, install only what is missing.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, hydra, omegaconf, pytest, tensorboard" 2>/dev/null \
    || python -m pip install -q -c constraints.txt -e ".[dev]"
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest -q -m gpu tests/test_cuda.py
(cd "$(mktemp -d)" && python -m mamlrun.cli train debug=smoke device=cuda | tail -3)
python scripts/bench.py --device cuda --configs 5w1s 20w1s --orders second first --repeats 5 \
    --json "$out/bench_cuda.json"
