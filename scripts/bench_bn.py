#!/usr/bin/env python
"""Task batch norm as one ``autograd.Function`` against the plain operations it replaced
(issue 26), on the Omniglot presets' own workloads, interleaved in one process.

    python scripts/bench_bn.py                                   # every preset, loop and vmap
    python scripts/bench_bn.py --presets omniglot_5w1s --modes loop --repeats 5
    python scripts/bench_bn.py --presets omniglot_20w5s --modes loop --profile
    python scripts/bench_bn.py --query-layers     # the fused kernel or the Function for queries

Three ways of running the same meta-gradient, timed A B C A B C after a float64 check on two
tasks that they agree:
- ``plain``: ``layers.reference_batch_norm`` (mean, variance, rsqrt, scale, shift), the query
  passes of loop and threads through torch's fused kernel, as before issue 26;
- ``function``: ``layers.task_batch_norm``, the query passes still through the fused kernel;
- ``function-query``: ``layers.task_batch_norm`` for the query passes too.
Only ratios mean anything on a shared machine: the speed of each against ``plain``, in CPU
time (``timed``).

``--query-layers`` times only one batch-norm layer differentiated once (what a query pass
needs), against torch's fused kernel. ``--memory`` adds each variant's peak heap over one warm
meta-gradient; ``--profile``, per variant, the share of self CPU time (torch.profiler) in
convolutions, in element-wise passes and reductions (the arithmetic batch norm and its
derivatives are made of), and in everything else (copies, autograd and functorch
bookkeeping, the loss).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the presets' workloads are bench.py's)

from mamlrun.models import layers  # noqa: E402

VARIANTS = ("plain", "function", "function-query")


class _NeverFused:
    """Stands in for ``layers._FUSED`` so that ``fused_batch_norm()`` blocks change nothing."""

    def get(self) -> bool:
        return False

    def set(self, value: bool) -> None:
        return None

    def reset(self, token: None) -> None:
        return None


@contextmanager
def variant(name: str):
    saved = layers.task_batch_norm, layers._FUSED
    if name == "plain":
        layers.task_batch_norm = layers.reference_batch_norm
    if name == "function-query":
        layers._FUSED = _NeverFused()
    try:
        yield
    finally:
        layers.task_batch_norm, layers._FUSED = saved


def meta_gradient(s: bench.Setting, mode: str, model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    bench.mamlrun_step(bench.make_algo(s, s.order == "first"), mode)(model, batch, s, False)
    return bench.flat_grad(model)


def check(s: bench.Setting, mode: str) -> float:
    """Largest difference to ``plain``'s float64 meta-gradient on two tasks, relative."""
    torch.manual_seed(0)
    model = bench.build_model(s, torch.device("cpu")).double()
    batch = bench.make_batch(s, s.query, torch.device("cpu"))
    batch = type(batch)(*(t[:2].double() if t.is_floating_point() else t[:2] for t in batch))
    grads = []
    for name in VARIANTS:
        with variant(name):
            grads.append(meta_gradient(s, mode, model, batch))
    scale = grads[0].abs().max()
    return max(float((g - grads[0]).abs().max() / scale) for g in grads[1:])


def timed(s: bench.Setting, mode: str, repeats: int) -> dict[str, float]:
    """Median CPU seconds of one meta-gradient per variant, interleaved, after one warm-up
    each. CPU time of the process, not wall time: on a machine shared with other jobs the wall
    clock mostly measures the neighbours (with one intra-op thread, as by default here, the
    CPU time is the work done)."""
    torch.manual_seed(0)
    model = bench.build_model(s, torch.device("cpu"))
    batch = bench.make_batch(s, s.query, torch.device("cpu"))
    seconds = {name: [] for name in VARIANTS}
    for rep in range(repeats + 1):
        for name in VARIANTS:
            with variant(name):
                start = time.process_time()
                meta_gradient(s, mode, model, batch)
                if rep:
                    seconds[name].append(time.process_time() - start)
    return {name: statistics.median(t) for name, t in seconds.items()}


#: aten operators counted as element-wise passes or reductions (by name, without ``aten::``).
ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "rsqrt", "pow", "square",
    "addcmul", "addcmul_", "addcdiv", "mean", "sum", "var_mean", "sqrt", "reciprocal", "where",
    "threshold_backward", "relu", "clamp_min", "native_batch_norm",
    "native_batch_norm_backward", "fill_", "zero_", "lerp_",
}  # fmt: skip


def shares(s: bench.Setting, mode: str) -> dict[str, dict[str, float]]:
    """Per variant: share of self CPU time in convolutions, element-wise passes, the rest."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = bench.build_model(s, torch.device("cpu"))
    batch = bench.make_batch(s, s.query, torch.device("cpu"))
    result = {}
    for name in VARIANTS:
        with variant(name):
            meta_gradient(s, mode, model, batch)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                meta_gradient(s, mode, model, batch)
        kinds = {"convolution": 0.0, "element-wise": 0.0, "other": 0.0}
        for e in prof.key_averages():
            op = e.key.removeprefix("aten::")
            kind = (
                "convolution" if "conv" in op else "element-wise" if op in ELEMENTWISE else "other"
            )
            kinds[kind] += e.self_cpu_time_total
        total = sum(kinds.values())
        result[name] = {k: v / total for k, v in kinds.items()}
    return result


def peak_heaps(s: bench.Setting, mode: str) -> dict[str, float]:
    """Per variant, MiB of peak malloc'd bytes above the start of one warm meta-gradient
    (``bench.PeakMemory``; in this process, so warm, unlike bench.py's cold probes)."""
    torch.manual_seed(0)
    model = bench.build_model(s, torch.device("cpu"))
    batch = bench.make_batch(s, s.query, torch.device("cpu"))
    peaks = {}
    for name in VARIANTS:
        with variant(name):
            meta_gradient(s, mode, model, batch)
            model.zero_grad(set_to_none=True)
            with bench.PeakMemory() as peak:
                meta_gradient(s, mode, model, batch)
            peaks[name] = peak.heap_growth
    return peaks


def query_layers(repeats: int = 60) -> None:
    """One batch-norm layer differentiated once (a query pass), per shape of conv4's four
    layers with 5, 25 and 100 images: median CPU µs of forward + backward for the plain
    operations, torch's fused kernel and the Function."""
    from torch.nn import functional as F

    def fused(x, w, b, eps):
        return F.batch_norm(x, None, None, w, b, True, 0.0, eps)

    kinds = {
        "plain": layers.reference_batch_norm,
        "fused": fused,
        "function": layers.task_batch_norm,
    }
    print("images, side: median CPU µs (plain, fused, function); function / fused")
    for n, side in ((n, side) for n in (5, 25, 100) for side in (14, 7, 4, 2)):
        x = torch.randn(n, 64, side, side, requires_grad=True)
        w, b = torch.rand(64, requires_grad=True), torch.zeros(64, requires_grad=True)
        seed, times = torch.randn_like(x), {k: [] for k in kinds}
        for _ in range(repeats):
            for kind, fn in kinds.items():
                start = time.process_time()
                torch.autograd.grad(fn(x, w, b, 1e-5), (x, w, b), seed)
                times[kind].append(time.process_time() - start)
        med = {k: 1e6 * statistics.median(t) for k, t in times.items()}
        row = ", ".join(f"{v:.0f}" for v in med.values())
        print(f"{n}, {side}: {row}; {med['function'] / med['fused']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(bench.PRESETS))
    parser.add_argument("--modes", nargs="+", default=["loop", "vmap"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--profile", action="store_true", help="shares of time by kind of op")
    parser.add_argument("--memory", action="store_true", help="peak heap of each variant")
    parser.add_argument("--query-layers", action="store_true", help="only: one layer, once")
    parser.add_argument("--tasks", type=int, default=None, help="a smaller meta-batch (quicker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.query_layers:
        return query_layers()
    print("preset, mode: float64 check; CPU seconds per meta-gradient; speed against plain")
    for name in args.presets:
        s = bench.PRESETS[name]
        s = replace(s, meta_batch=args.tasks) if args.tasks else s
        for mode in args.modes:
            if mode not in bench.make_algo(s, s.order == "first").batching_modes:
                continue
            error = check(s, mode)
            t = timed(s, mode, args.repeats)
            ratios = "  ".join(f"{v} {t['plain'] / t[v]:.2f}x" for v in VARIANTS[1:])
            times = " ".join(f"{t[v]:.3f}" for v in VARIANTS)
            print(f"{name}, {mode}: rel. diff {error:.1e}; {times} CPU s; {ratios}", flush=True)
            if args.memory:
                heaps = peak_heaps(s, mode)
                print("    peak heap MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in heaps.items()))
            for variant_name, kinds in (shares(s, mode) if args.profile else {}).items():
                parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in kinds.items())
                print(f"    {variant_name}: {parts}", flush=True)


if __name__ == "__main__":
    main()
