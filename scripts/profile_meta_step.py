#!/usr/bin/env python
"""Where one meta-iteration's time goes, by operator: torch.profiler over one meta-gradient
of a ``scripts/bench.py`` setting (a preset's own workload), for mamlrun in a given task
batching and for the learn2learn-style reference.

    python scripts/profile_meta_step.py omniglot_20w5s --mode threads [--top 15]
    python scripts/profile_meta_step.py omniglot_20w1s --mode vmap --convolutions 12

Prints each engine's wall time and the operators with the most self CPU time (their share of
the total), so the convolutions' share (what a faster kernel could win) and the rest
(autograd bookkeeping, element-wise passes, copies) can be read off. ``--convolutions N``
lists mamlrun's first N ``aten::convolution`` calls in order with their input and weight
shapes: under ``vmap`` the first support pass (θ shared by every task) is one ordinary
convolution over all tasks' images, and the later ones are grouped (weight ``T·O`` rows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the settings, models and engines are bench.py's)


def profiled(fn, top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """Wall seconds of one call, and the ``top`` operators by self CPU time (name, share,
    calls)."""
    fn()  # warm-up
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    seconds = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return seconds, [(e.key, e.self_cpu_time_total / total, e.count) for e in events[:top]]


def convolution_calls(fn, first: int) -> None:
    """Print the first ``first`` ``aten::convolution`` calls of one ``fn()``, in order:
    input shape, weight shape and groups (issue 26: which ones vmap groups)."""
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    calls = [e for e in prof.events() if e.name == "aten::convolution"]
    calls.sort(key=lambda e: e.time_range.start)
    print(f"\n{len(calls)} aten::convolution calls; the first {first}:")
    for i, e in enumerate(calls[:first]):
        groups = e.concrete_inputs[-1] if e.concrete_inputs else "?"
        shapes = e.input_shapes
        print(f"  {i:3d}  input {shapes[0]}  weight {shapes[1]}  groups {groups}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", choices=list(bench.SETTINGS))
    parser.add_argument("--mode", default="loop", help="mamlrun's task batching")
    parser.add_argument("--query", type=int, default=15, help="unless the setting fixes it")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--convolutions", type=int, default=0, help="list the first N convs")
    args = parser.parse_args()
    s = bench.SETTINGS[args.setting]
    first_order = (s.order or "second") == "first"
    torch.manual_seed(0)
    model = bench.build_model(s, torch.device("cpu"))
    batch = bench.make_batch(s, s.query or args.query, torch.device("cpu"))
    engines = {
        "reference": bench.reference_meta_gradient,
        f"mamlrun {args.mode}": bench.mamlrun_step(bench.make_algo(s, first_order), args.mode),
    }
    print(f"{s.name}, {torch.get_num_threads()} threads; self CPU time summed over threads")
    for name, engine in engines.items():

        def one(engine=engine):
            model.zero_grad(set_to_none=True)
            engine(model, batch, s, first_order)

        if args.convolutions and name.startswith("mamlrun"):
            convolution_calls(one, args.convolutions)
        seconds, ops = profiled(one, args.top)
        print(f"\n{name}: {seconds:.3f} s per meta-gradient ({s.meta_batch / seconds:.1f} tasks/s)")
        for op, share, calls in ops:
            print(f"  {100 * share:5.1f}%  {calls:>6}  {op}")


if __name__ == "__main__":
    main()
