"""Meta-training throughput and peak memory of mamlrun's engine against a reference loop.

The reference is written the way learn2learn's ``MAML`` works: per task, deep-copy the model,
replace its parameters by differentiable clones, adapt the copy with ``autograd.grad``, and
backpropagate that task's query loss. Both run in the same process, interleaved A B A B, after
a check that they compute the same meta-gradient, so the ratios hold even on a noisy machine.

    python scripts/bench.py                      # CPU, all configs, both orders
    python scripts/bench.py --configs 5w1s --orders second --repeats 5 --json bench.json

Peak memory is measured in a fresh subprocess per (engine, config): peak RSS growth on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from mamlrun.algorithms import batching as batching_probe
from mamlrun.algorithms.maml import MAML
from mamlrun.data.tasks import TaskBatch
from mamlrun.models.conv4 import conv4


@dataclass(frozen=True)
class Setting:
    name: str
    ways: int
    shots: int
    meta_batch: int
    inner_steps: int
    inner_lr: float


SETTINGS = {
    "5w1s": Setting("5w1s", 5, 1, 32, 1, 0.4),
    "5w5s": Setting("5w5s", 5, 5, 32, 1, 0.4),
    "20w1s": Setting("20w1s", 20, 1, 16, 5, 0.1),
}


def make_batch(s: Setting, query: int, device: torch.device, seed: int = 0) -> TaskBatch:
    """Omniglot-shaped random tasks (28×28, one channel); the data do not change the cost."""
    g = torch.Generator(device=device).manual_seed(seed)

    def images(per_class: int) -> torch.Tensor:
        n = s.ways * per_class
        return torch.rand(s.meta_batch, n, 1, 28, 28, generator=g, device=device)

    def labels(per_class: int) -> torch.Tensor:
        y = torch.arange(s.ways, device=device).repeat_interleave(per_class)
        return y.expand(s.meta_batch, -1).contiguous()

    return TaskBatch(images(s.shots), labels(s.shots), images(query), labels(query))


def reference_meta_gradient(model: nn.Module, batch: TaskBatch, s: Setting, first_order: bool):
    """learn2learn-style: clone the module per task, adapt it, backward the task's query loss."""
    loss_fn = nn.functional.cross_entropy
    n = batch.num_tasks
    for xs, ys, xq, yq in zip(*batch, strict=True):
        learner = _clone(model)
        for _ in range(s.inner_steps):
            params = [p for _, p in _named_tensors(learner)]
            loss = loss_fn(learner(xs), ys) * s.ways  # the original code's normalisation
            grads = torch.autograd.grad(loss, params, create_graph=not first_order)
            _update(learner, [p - s.inner_lr * g for p, g in zip(params, grads, strict=True)])
        (loss_fn(learner(xq), yq) * s.ways / n).backward()


def _clone(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    originals = dict(model.named_parameters())
    for name, module in clone.named_modules():
        for key in list(module._parameters):
            full = f"{name}.{key}" if name else key
            del module._parameters[key]
            setattr(module, key, originals[full].clone())  # differentiable w.r.t. the original
    return clone


def _named_tensors(module: nn.Module):
    for name, sub in module.named_modules():
        for key, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and value.requires_grad:
                yield f"{name}.{key}", value


def _update(module: nn.Module, new: list[torch.Tensor]) -> None:
    targets = [
        (sub, key)
        for _, sub in module.named_modules()
        for key, v in vars(sub).items()
        if isinstance(v, torch.Tensor) and v.requires_grad
    ]
    for (sub, key), value in zip(targets, new, strict=True):
        setattr(sub, key, value)


def mamlrun_step(algo: MAML, mode: str):
    def step(model: nn.Module, batch: TaskBatch, s: Setting, first_order: bool) -> None:
        algo.meta_gradient(model, batch, "classification", mode)

    return step


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def bench_setting(s, first_order, query, device, repeats):
    torch.manual_seed(0)
    model = conv4((1, 28, 28), s.ways).to(device)
    batch = make_batch(s, query, device)
    algo = MAML(
        inner_lr=s.inner_lr,
        inner_steps=s.inner_steps,
        first_order=first_order,
        loss_normalization="tf_maml",
    )
    chosen, probe_seconds = batching_probe.probe(
        algo, model, _Source(batch, device), s.meta_batch, seed=0, repeats=1
    )
    engines = {"reference": reference_meta_gradient, "mamlrun": mamlrun_step(algo, chosen)}

    # Same meta-gradient first, in float64 so that float32 rounding (amplified by the large
    # inner steps) cannot hide or fake a difference.
    model64, batch64 = (
        copy.deepcopy(model).double(),
        TaskBatch(*(t.double() if t.is_floating_point() else t for t in batch)),
    )
    grads = {}
    for name, fn in engines.items():
        model64.zero_grad(set_to_none=True)
        fn(model64, batch64, s, first_order)
        grads[name] = flat_grad(model64)
    rel = float((grads["mamlrun"] - grads["reference"]).norm() / grads["reference"].norm())
    if rel > 1e-8:
        raise SystemExit(f"{s.name}: meta-gradients differ (relative {rel:.2e}); not timing")

    seconds = {name: [] for name in engines}
    for _ in range(repeats):  # interleaved A B A B: drift on the machine hits both alike
        for name, fn in engines.items():
            model.zero_grad(set_to_none=True)
            sync(device)
            t = time.perf_counter()
            fn(model, batch, s, first_order)
            sync(device)
            seconds[name].append(time.perf_counter() - t)
    flops = count_flops(lambda: engines["reference"](model, batch, s, first_order))
    rows = {}
    for name in engines:
        median = statistics.median(seconds[name])
        rows[name] = {
            "tasks_per_s": s.meta_batch / median,
            "seconds": median,
            "gflops": flops / median / 1e9,
        }
    return rows, rel, chosen, probe_seconds


class _Source:
    """The slice of the TaskSource interface that the batching probe needs."""

    kind = "classification"

    def __init__(self, batch: TaskBatch, device: torch.device) -> None:
        self.batch, self.device = batch, device

    def sample(self, split, num_tasks, generator):
        return self.batch


def peak_memory(engine: str, setting: str, first_order: bool, query: int, device: str) -> float:
    """MiB of peak memory growth for one cold meta-gradient, measured in a fresh process.

    ``engine`` is ``reference`` or ``loop``/``vmap`` (mamlrun's mode, as the timing run chose).
    """
    args = [
        sys.executable,
        __file__,
        "--memory-probe",
        engine,
        "--configs",
        setting,
        "--query",
        str(query),
        "--device",
        device,
    ]
    if first_order:
        args.append("--first-order-probe")
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_probe(args) -> None:
    device = torch.device(args.device)
    s = SETTINGS[args.configs[0]]
    torch.manual_seed(0)
    model = conv4((1, 28, 28), s.ways).to(device)
    batch = make_batch(s, args.query, device)
    algo = MAML(
        inner_lr=s.inner_lr,
        inner_steps=s.inner_steps,
        first_order=args.first_order_probe,
        loss_normalization="tf_maml",
    )
    if args.memory_probe == "reference":
        fn = reference_meta_gradient
    else:
        fn = mamlrun_step(algo, args.memory_probe)
    if device.type == "cuda":
        fn(model, batch, s, args.first_order_probe)  # warm-up: allocator caches, lazy init
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(model, batch, s, args.first_order_probe)
        print((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    else:
        # A cold call for every engine: after a warm-up the CPU allocator keeps freed pages, so
        # a second call's growth says more about allocator reuse than about the engine.
        base = _rss_mib()
        with _PeakRss() as peak:
            fn(model, batch, s, args.first_order_probe)
        print(peak.mib - base)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _PeakRss:
    """Highest RSS seen while the block runs (polled every millisecond)."""

    def __enter__(self) -> _PeakRss:
        self.mib, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.mib = max(self.mib, _rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mib = max(self.mib, _rss_mib())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--orders", nargs="+", default=["second", "first"], choices=["second", "first"]
    )
    parser.add_argument("--query", type=int, default=15, help="query images per class")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--first-order-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args)

    device = torch.device(args.device)
    peak = matmul_gflops(device)
    print(
        f"device {device} ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}; 2048² matmul {peak:.0f} GFLOP/s"
    )
    header = (
        f"{'config':<7}{'order':<8}{'engine':<11}{'batching':<9}{'tasks/s':>9}{'ratio':>7}"
        f"{'GFLOP/s':>9}{'%peak':>7}{'peak MiB':>10}{'mem ratio':>10}"
    )
    print(header)
    results = {
        "device": str(device),
        "torch": torch.__version__,
        "matmul_gflops": peak,
        "query": args.query,
        "rows": [],
    }
    for name in args.configs:
        s = SETTINGS[name]
        for order in args.orders:
            first_order = order == "first"
            rows, rel, chosen, probe = bench_setting(
                s, first_order, args.query, device, args.repeats
            )
            mem = {}
            if not args.no_memory:
                for engine in rows:
                    probe = "reference" if engine == "reference" else chosen
                    mem[engine] = peak_memory(probe, name, first_order, args.query, args.device)
            ref = rows["reference"]
            for engine, row in rows.items():
                ratio = row["tasks_per_s"] / ref["tasks_per_s"]
                mem_ratio = mem[engine] / mem["reference"] if mem else float("nan")
                print(
                    f"{name:<7}{order:<8}{engine:<11}"
                    f"{(chosen if engine == 'mamlrun' else 'loop'):<9}"
                    f"{row['tasks_per_s']:>9.2f}{ratio:>7.2f}{row['gflops']:>9.1f}"
                    f"{100 * row['gflops'] / peak:>6.0f}%"
                    f"{mem.get(engine, float('nan')):>10.0f}{mem_ratio:>10.2f}"
                )
                results["rows"].append(
                    {
                        "config": name,
                        "order": order,
                        "engine": engine,
                        "batching": chosen if engine == "mamlrun" else "loop",
                        **row,
                        "ratio": ratio,
                        "peak_mib": mem.get(engine),
                        "grad_rel_diff": rel,
                        "probe_seconds": probe,
                    }
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
