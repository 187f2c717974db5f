"""Reptile's meta-step before and after issue 26 (item 5), interleaved in one process.

"before" is Reptile as it was: the functional inner loop (``functional.adapt`` with
``adam_direction``, a dozen element-wise ops per parameter and step) and one more forward
pass per task for the logged loss (φ on the query set). "after" is ``reptile.Reptile``: the
in-place loop on torch's fused Adam kernel per task, and the last inner step's loss logged.
"no-fwd" is "after" with "before"'s functional inner Adam: the two changes apart.
They run on the same model and tasks, in float64 first to check that their meta-updates
agree, then timed A B A B (median of the per-rep ratios: only ratios from interleaved reps
mean anything on a shared machine), then profiled once each (``torch.profiler``) for the
number of operator calls.

    python scripts/bench_reptile.py                       # omniglot_5w1s_reptile, loop
    python scripts/bench_reptile.py --modes loop threads vmap --repeats 7
    python scripts/bench_reptile.py --threads 1 --repeats 9   # on a shared, loaded machine

``threads`` runs its workers on threads the profiler does not follow: its operator counts
are the main thread's only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mamlrun.algorithms.base import Part
from mamlrun.algorithms.batching import map_tasks
from mamlrun.algorithms.functional import Record, autograd_grad, functional_grad
from mamlrun.algorithms.reptile import Reptile
from mamlrun.data.tasks import TaskBatch
from mamlrun.models.layers import tell_training_step
from mamlrun.training.episodes import backward


def _bench_module():
    path = Path(__file__).with_name("bench.py")
    spec = importlib.util.spec_from_file_location("bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class ReptileBefore(Reptile):
    """Reptile's ``meta_objective`` and ``_task`` as they were before issue 26."""

    def meta_objective(self, model: nn.Module, batch: TaskBatch, step=None) -> Iterator[Part]:
        task_type, batching = self.bound()
        plan = self.plan(model)
        if plan.changes_over_training:
            tell_training_step(model, step)
        theta = dict(plan.backbone.named_parameters())
        meta = {"theta": {k: p.detach() for k, p in theta.items()}}
        x = torch.cat([batch.x_support, batch.x_query], dim=1)
        y = torch.cat([batch.y_support, batch.y_query], dim=1)
        per_task = self.mode != "vmap"
        grad = autograd_grad(False) if per_task else functional_grad(True)
        tasks = TaskBatch(x, y, batch.x_query, batch.y_query)
        phis, losses, metrics = map_tasks(
            lambda m: self._task(m, task_type, grad, per_task), model, meta, tasks, batching
        )
        with torch.no_grad():
            directions = {k: p.detach() - phis[k].mean(0) for k, p in theta.items()}
        objective = sum((p * directions[k]).sum() for k, p in theta.items())
        yield Part(objective, losses.mean(), metrics.mean(), batch.num_tasks)

    def _task(self, model: nn.Module, task_type: str, grad, per_task: bool):
        inner = self.adaptation(model, task_type, self.inner_steps, grad)
        loss, metric, per_output = self.losses_of(task_type)

        def task(meta, x, y, xq, yq):
            if per_task:
                meta = {"theta": {k: t.clone().requires_grad_() for k, t in meta["theta"].items()}}
            trajectory, forwards = inner(meta, x, y)
            with torch.no_grad():
                phi = {k: t.detach() for k, t in trajectory[-1].items()}
                out = forwards[-1](phi, xq)
                scale = out.shape[-1] if per_output else 1
                return phi, loss(out, yq) / scale, metric(out, yq)

        return task


class ReptileFunctionalAdam(Reptile):
    """The two changes apart: "after"'s logged loss (no extra forward pass), "before"'s
    functional inner Adam (``functional.adapt``, ``adam_direction``)."""

    def _task(self, model: nn.Module, task_type: str, grad, per_task: bool):
        inner = self.adaptation(model, task_type, self.inner_steps, grad, whole=False)
        loss, metric, per_output = self.losses_of(task_type)

        def measure(out, y):
            return loss(out, y) / (out.shape[-1] if per_output else 1), metric(out, y)

        def task(meta, x, y, xq, yq):
            if per_task:
                meta = {"theta": {k: t.clone().requires_grad_() for k, t in meta["theta"].items()}}
            record = Record(measure)
            trajectory, _ = inner(meta, x, y, record=record)
            return {k: t.detach() for k, t in trajectory[-1].items()}, record.value

        return task


def engines(s, mode: str) -> dict[str, Reptile]:
    settings = {"inner_lr": s.inner_lr, "inner_steps": s.inner_steps}
    kinds = {"before": ReptileBefore, "no-fwd": ReptileFunctionalAdam, "after": Reptile}
    return {n: kind(**settings).bind("classification", mode) for n, kind in kinds.items()}


def meta_update(algo: Reptile, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    backward(algo.meta_objective(model, batch, None))
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def check(bench, s, mode: str) -> float:
    """max |before − after| of the float64 meta-update on one task of the workload,
    outside the convolutions' biases before batch norm (zero gradients that Adam's ε turns
    into noise in both)."""
    model = bench.build_model(s, torch.device("cpu")).double()
    batch = bench.make_batch(s, s.query, torch.device("cpu"))
    batch = TaskBatch(*(t[:1].double() if t.is_floating_point() else t[:1] for t in batch))
    runs = {n: meta_update(a, model, batch) for n, a in engines(s, mode).items()}
    runs.pop("no-fwd")
    mask = torch.cat([
        torch.full((p.numel(),), not (n.endswith("bias") and p.dim() == 1 and
                                      dict(model.named_parameters())[n[:-4] + "weight"].dim() == 4))
        for n, p in model.named_parameters()
    ])  # fmt: skip
    return float((runs["before"] - runs["after"])[mask].abs().max())


def timed(bench, s, mode: str, repeats: int) -> dict[str, list[float]]:
    model = bench.build_model(s, torch.device("cpu"))
    batch = bench.make_batch(s, s.query, torch.device("cpu"))
    algos = engines(s, mode)
    for algo in algos.values():  # warm-up
        meta_update(algo, model, batch)
    seconds: dict[str, list[float]] = {n: [] for n in algos}
    for _ in range(repeats):
        for name, algo in algos.items():
            start = time.perf_counter()
            meta_update(algo, model, batch)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def op_counts(bench, s, mode: str) -> dict[str, dict[str, int]]:
    model = bench.build_model(s, torch.device("cpu"))
    batch = bench.make_batch(s, s.query, torch.device("cpu"))
    counts = {}
    for name, algo in engines(s, mode).items():
        meta_update(algo, model, batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            meta_update(algo, model, batch)
        calls = {e.key: e.count for e in prof.key_averages()}
        counts[name] = {
            "all aten ops": sum(c for k, c in calls.items() if k.startswith("aten::")),
            **{k: calls.get(k, 0) for k in ("aten::mul", "aten::div", "aten::sqrt",
                                             "aten::convolution", "aten::_fused_adam_")},
        }  # fmt: skip
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="omniglot_5w1s_reptile")
    parser.add_argument("--modes", nargs="+", default=["loop"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch's intra-op threads (default: torch's own); 1 keeps OpenMP's spinning "
        "workers out of the timing on a machine that others load",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bench = _bench_module()
    s = bench.SETTINGS[args.config]
    print(f"{s.name}: {s.meta_batch} tasks of {s.ways}-way {s.shots}+{s.query}-shot, "
          f"{s.inner_steps} inner Adam steps, {s.model}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for mode in args.modes:
        difference = check(bench, s, mode)
        print(f"\n[{mode}] float64 max |before - after| of the meta-update: {difference:.2e}")
        seconds = timed(bench, s, mode, args.repeats)
        for name, times in seconds.items():
            print(f"  {name:6s} median {statistics.median(times):.3f} s per meta-step "
                  f"({', '.join(f'{t:.3f}' for t in times)})")  # fmt: skip
        for name in ("no-fwd", "after"):
            ratios = [b / a for b, a in zip(seconds["before"], seconds[name], strict=True)]
            print(f"  speed-up {name}/before: median {statistics.median(ratios):.2f}x "
                  f"(per rep: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
        for name, counts in op_counts(bench, s, mode).items():
            print(f"  ops {name:6s} " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
