#!/usr/bin/env bash
# The MAML paper's Omniglot 5-way 1-shot run (preset omniglot_5w1s, 60,000 iterations), with a
# 600-task test of best.pt every 5,000 iterations, as far as the time allows.
#
#   scripts/reproduce_omniglot.sh RUN_DIR [EVERY] [EXTRA OVERRIDES...]
#
# It trains in segments of EVERY (5000) iterations: each segment resumes the run
# (resume=true) with `iterations` raised to the next multiple, which changes nothing the
# training computes (the preset has no schedule that depends on `iterations`; resume is
# bitwise), then tests best.pt into RUN_DIR/periodic_test/<step>/ on the fixed test tasks
# (seed 2002). Rerunning the script continues where it stopped: a finished segment or test is
# skipped, so an interrupted run loses nothing that was saved. Each best.pt is also tested
# with the paper's 3 inner steps (Finn et al. 2017 evaluated 5-way Omniglot with 3; the
# original code and the preset use 10) into RUN_DIR/periodic_test_3steps/<step>/. The last
# segment also runs the preset's final test. `scripts/plot_test_curve.py RUN_DIR` draws the
# curve.
set -euo pipefail
run_dir="${1:?usage: scripts/reproduce_omniglot.sh RUN_DIR [EVERY] [OVERRIDES...]}"
every="${2:-5000}"
shift $(( $# >= 2 ? 2 : 1 ))
total=60000
mamlrun="${MAMLRUN:-mamlrun}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

step_done() {  # the step of RUN_DIR/checkpoints/last.pt, 0 without one
    python - "$run_dir/checkpoints/last.pt" <<'EOF'
import sys, pathlib, torch
p = pathlib.Path(sys.argv[1])
print(torch.load(p, weights_only=True, map_location="cpu")["progress"]["step"] if p.exists() else 0)
EOF
}

for (( target = every; target <= total; target += every )); do
    done_steps=$(step_done)
    if (( done_steps < target )); then
        resume=false; (( done_steps > 0 )) && resume=true
        final=false; (( target == total )) && final=true
        echo "$(date -Is) training to step $target (from $done_steps)"
        "$mamlrun" train experiment=omniglot_5w1s iterations="$target" resume="$resume" \
            final_test="$final" hydra.run.dir="$run_dir" "$@"
    fi
    test_dir="$run_dir/periodic_test/$target"
    if [[ ! -f "$test_dir/results.json" ]]; then
        echo "$(date -Is) testing best.pt at step $target"
        "$mamlrun" test checkpoint="$run_dir/checkpoints/best.pt" test_tasks=600 test_seed=2002 \
            hydra.run.dir="$test_dir"
    fi
    paper_dir="$run_dir/periodic_test_3steps/$target"
    if [[ ! -f "$paper_dir/results.json" && $(step_done) -eq $target ]]; then  # same best.pt
        "$mamlrun" test checkpoint="$run_dir/checkpoints/best.pt" test_tasks=600 test_seed=2002 \
            inner_steps=3 hydra.run.dir="$paper_dir"
    fi
done
echo "$(date -Is) done: $run_dir"
