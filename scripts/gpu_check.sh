#!/usr/bin/env bash
# Short, prepared GPU checks, run from the repository root on a machine with a GPU. Every step
# is time-boxed (STEP_LIMIT seconds, default 150) so that one slow step cannot eat a lease; a
# step that fails or runs out is reported and the next one runs. One log (gpu_check.log) and
# a few JSON files land in ${OUT:-.}/; the exit status is non-zero if any step failed.
#   scripts/gpu_check.sh base       the CUDA tests, a smoke run, the Omniglot-shaped benchmark
#   scripts/gpu_check.sh omniglot   a real Omniglot 5w1s training run on CUDA (needs
#                                   $MAMLRUN_DATA/omniglot/ with the two official zips)
#   scripts/gpu_check.sh resnet12   the precision tests, a bf16 smoke run, bf16 against fp32,
#                                   the peak-memory table (fp32, bf16) and the miniImageNet-shaped
#                                   benchmark rows (conv4-32, ResNet-12)
#   scripts/gpu_check.sh presets    every preset's own workload in every task batching on CUDA
#                                   (tasks/s, peak memory, ratios to the learn2learn-style
#                                   reference with torch's BatchNorm2d): issue 26's table
#   scripts/gpu_check.sh            all four, in that order (the first three took about 9 minutes
#                                   on an H200 with STEP_LIMIT=120 on 2026-12-04)
# A GPU machine may have no network: what is installed is used; wheels in .whl/ (hydra-core,
# omegaconf, antlr4, built where pip works) are installed if hydra is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
part="${1:-all}"
limit="${STEP_LIMIT:-150}"
py="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$py" -c "import torch, hydra, omegaconf, pytest, tensorboard" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        "$py" -m pip install -q -c constraints.txt -e ".[dev]"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
failed=()
step() {  # step NAME COMMAND...: run one time-boxed step, its output in $out/gpu_check.log too
    local name=$1 start=$SECONDS; shift
    echo "=== $name" | tee -a "$out/gpu_check.log"
    timeout "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$out/gpu_check.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/gpu_check.log"
    [[ $rc == 0 ]] || failed+=("$name")
}
smoke() { (cd "$(mktemp -d)" && "$py" -m mamlrun.cli train debug=smoke device=cuda "$@"); }
export -f smoke; export py  # `timeout` runs a program, so the steps run under `bash -c`
if [[ $part == all || $part == base ]]; then
    step cuda_tests "$py" -m pytest -q -m gpu tests/test_cuda.py
    step smoke smoke
    step bench "$py" scripts/bench.py --device cuda --configs 5w1s 20w1s --orders second first \
        --repeats 2 --json "$out/bench_cuda.json"
fi
if [[ $part == all || $part == omniglot ]]; then
    # 1,000 meta-steps of the paper's 5w1s preset, validated and tested: the throughput a user
    # sees end to end on real data, and a sanity check on the accuracy it reaches.
    step omniglot "$py" -m mamlrun.cli train experiment=omniglot_5w1s device=cuda \
        iterations=1000 val_every=500 checkpoint_every=500 final_test=true test_tasks=600 \
        progress_seconds=15 hydra.run.dir=/tmp/gpu_check_omniglot
    cp /tmp/gpu_check_omniglot/results.json "$out/omniglot_results.json" 2>/dev/null
    cp /tmp/gpu_check_omniglot/test/results.json "$out/omniglot_test.json" 2>/dev/null
fi
if [[ $part == all || $part == resnet12 ]]; then
    step precision_tests "$py" -m pytest -q -m gpu tests/test_precision.py
    step smoke_bf16 smoke precision=bf16
    step bench_precision "$py" scripts/bench_precision.py --device cuda \
        --workloads conv4 resnet12 --repeats 5
    step memory "$py" scripts/memory.py --device cuda --json "$out/memory_cuda.json"
    step memory_bf16 "$py" scripts/memory.py --device cuda --precision bf16 \
        --json "$out/memory_cuda_bf16.json"
    step bench_mini "$py" scripts/bench.py --device cuda --configs mini-conv4 mini-resnet12 \
        --orders second first --repeats 2 --json "$out/bench_cuda_mini.json"
fi
if [[ $part == all || $part == presets ]]; then
    step bench_presets "$py" scripts/bench.py --device cuda --presets --all-modes --repeats 2 \
        --json "$out/bench_cuda_presets.json"
fi
echo "failed steps: ${failed[*]:-none}"
[[ ${#failed[@]} == 0 ]]
