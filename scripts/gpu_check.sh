#!/usr/bin/env bash
# Short, prepared GPU checks, run from the repository root on a machine with a GPU; results
# land in ${OUT:-.}/*.json and on stdout. Each part is meant to fit one 10-minute call (not yet
# timed on a GPU):
#   scripts/gpu_check.sh base       the CUDA tests, a smoke run, the Omniglot-shaped benchmark
#   scripts/gpu_check.sh resnet12   issue 11: the precision tests, a bf16 smoke run, bf16
#                                   against fp32, the peak-memory table (fp32, bf16) and the
#                                   miniImageNet-shaped benchmark rows (conv4-32, ResNet-12)
#   scripts/gpu_check.sh            both
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
part="${1:-all}"
# GPU machines may have no network: use what is installed, install only what is missing.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, hydra, omegaconf, pytest, tensorboard" 2>/dev/null \
    || python -m pip install -q -c constraints.txt -e ".[dev]"
nvidia-smi --query-gpu=name,memory.total --format=csv
if [[ $part == all || $part == base ]]; then
python -m pytest -q -m gpu tests/test_cuda.py
(cd "$(mktemp -d)" && python -m mamlrun.cli train debug=smoke device=cuda | tail -3)
python scripts/bench.py --device cuda --configs 5w1s 20w1s --orders second first --repeats 5 \
    --json "$out/bench_cuda.json"
fi
if [[ $part == all || $part == resnet12 ]]; then
python -m pytest -q -m gpu tests/test_precision.py
(cd "$(mktemp -d)" && python -m mamlrun.cli train debug=smoke device=cuda precision=bf16 | tail -3)
python scripts/bench_precision.py --device cuda --workloads conv4 resnet12 --repeats 5
python scripts/memory.py --device cuda --json "$out/memory_cuda.json"
python scripts/memory.py --device cuda --precision bf16 --json "$out/memory_cuda_bf16.json"
python scripts/bench.py --device cuda --configs mini-conv4 mini-resnet12 --orders second first \
    --repeats 3 --json "$out/bench_cuda_mini.json"
fi
