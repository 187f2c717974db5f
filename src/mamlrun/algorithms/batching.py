"""How the tasks of a meta-batch run: one at a time (``loop``), one at a time on each of
several threads (``threads``), or together (``vmap``, or ``vmap:C`` in chunks of C tasks).

``map_tasks`` is the one place the switch is written. Which mode is faster depends on the
model, the task shape and the device together (``vmap`` is ~9× faster for the sinusoid MLP on
a CPU but slower for conv4 with many query images on the same CPU, shared/MEASUREMENTS.md,
and expected to win on a GPU), so ``auto`` times the candidates on the actual workload
(``choose``) instead of guessing.

Why ``threads`` exists: the small convolutions of one task do not keep several cores busy
(intra-op parallelism splits each small operation, and most of them are too small to split
well), so on a CPU running whole tasks side by side, one intra-op thread each, does more with
the same cores. Each worker gets its own copy of the module structure (``functional_call``
swaps a module's attributes, so one module cannot serve two threads at once), and every task
is computed with one intra-op thread on whichever worker runs it, with the outputs returned in
task order: the result is the same whatever the number of workers, and the same on every run.

Why ``vmap:C``: ``vmap`` over a whole meta-batch turns every convolution with per-task weights
into one grouped convolution over all tasks, whose CPU kernels are slow for many groups and
large batches; chunks keep the batching (the first step's shared weights still make one
ordinary convolution per chunk) at a size the kernels handle well, and bound the memory
(a chunk's graph is freed before the next is built).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mamlrun.config.ranges import parse_batching as parse  # the modes are config choices
from mamlrun.data.tasks import TaskBatch
from mamlrun.models.layers import task_thread

#: Per-task function: ``fn(shared, x_support, y_support, x_query, y_query) -> outputs``.
TaskFn = Callable[..., Any]


def chunks(batch: TaskBatch, size: int | None) -> list[TaskBatch]:
    """The meta-batch cut into consecutive meta-batches of ``size`` tasks (the last one may
    be smaller); the whole batch for ``size=None``."""
    n = batch.num_tasks
    size = size or n
    return [TaskBatch(*(t[a : a + size] for t in batch)) for a in range(0, n, size)]


def map_tasks(
    make_fn: Callable[[nn.Module], TaskFn], model: nn.Module, shared: Any, batch: TaskBatch,
    mode: str,
) -> Any:  # fmt: skip
    """``fn(shared, x_support, y_support, x_query, y_query)`` for every task of ``batch``,
    outputs stacked over tasks (any tree of tensors), where ``fn = make_fn(model)``.

    ``shared`` (the meta-parameters) is the same for every task; ``vmap`` batches the rest.
    ``make_fn`` rather than ``fn``, because ``threads`` needs one per worker, each from its own
    copy of ``model``.
    """
    name, chunk = parse(mode)
    if name == "vmap":
        batched = torch.func.vmap(make_fn(model), in_dims=(None, 0, 0, 0, 0))
        parts = [batched(shared, *part) for part in chunks(batch, chunk)]
        return parts[0] if len(parts) == 1 else _tree(torch.cat, parts)
    if name == "threads":
        return _tree(torch.stack, list(in_threads(make_fn, model, shared, batch)))
    fn = make_fn(model)
    return _tree(torch.stack, [fn(shared, *task) for task in zip(*batch, strict=True)])


def in_threads(
    make_fn: Callable[[nn.Module], TaskFn], model: nn.Module, shared: Any, batch: TaskBatch
) -> Iterator[Any]:
    """Every task's outputs, yielded in task order as they are ready, computed on
    ``torch.get_num_threads()`` worker threads with one intra-op thread each (see the module
    docstring). A caller that reduces them as they come (the meta-gradient's sum) holds only
    the few that finished ahead of their turn.

    The workers inherit the caller's grad mode (it is per thread in torch).
    """
    workers = max(1, min(torch.get_num_threads(), batch.num_tasks))
    fns: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        fns.put(make_fn(copy.deepcopy(model)))
    tasks = list(zip(*batch, strict=True))
    grad_enabled, local = torch.is_grad_enabled(), threading.local()

    def start() -> None:  # once per worker thread: its own module copy, one intra-op thread
        torch.set_num_threads(1)  # this thread's OpenMP team too, before its first operation
        local.fn = fns.get()

    def run(i: int) -> Any:
        with torch.set_grad_enabled(grad_enabled), task_thread():
            return local.fn(shared, *tasks[i])

    with _one_intra_op_thread(), ThreadPoolExecutor(workers, initializer=start) as pool:
        for future in [pool.submit(run, i) for i in range(len(tasks))]:
            yield future.result()


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tree(combine: Callable, outputs: Sequence[Any]) -> Any:
    """``combine`` (stack or cat) applied leaf by leaf across ``outputs`` (trees of tensors)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return combine(list(outputs))
    if isinstance(first, dict):
        return {k: _tree(combine, [o[k] for o in outputs]) for k in first}
    if isinstance(first, tuple | list):
        return type(first)(_tree(combine, column) for column in zip(*outputs, strict=True))
    raise TypeError(f"map_tasks cannot combine outputs of type {type(first).__name__}")


def candidates(modes: Sequence[str], meta_batch: int, device: torch.device) -> list[str]:
    """What ``auto`` measures: the supported modes, ``threads`` only on a CPU with more than
    one thread to run on, and ``vmap`` also in chunks of half and a quarter of the meta-batch
    (at least 2 tasks), where the best chunk lay for every Omniglot preset on a 2-core CPU
    (docs/PERFORMANCE.md, issue 15)."""
    parallel = device.type == "cpu" and torch.get_num_threads() > 1
    out = [m for m in modes if m != "threads" or parallel]
    if "vmap" in modes:
        sizes = sorted({meta_batch // 2, meta_batch // 4} - {0, 1}, reverse=True)
        out += [f"vmap:{c}" for c in sizes if c < meta_batch]
    return out


def choose(
    modes: Sequence[str],
    step: Callable[[str], None],
    device: torch.device,
    repeats: int = 2,
) -> tuple[str, dict[str, float]]:
    """Time ``step(mode)`` (one meta-gradient) for each mode; the fastest.

    Every mode is warmed up once, then timed ``repeats`` times in rounds (A B C A B C), each
    keeping its best time: interleaving makes a slow spell of the machine hit all modes alike
    rather than whichever was being timed. A mode that fails (an operation without a batching
    rule, say) counts as infinitely slow. With a single mode there is nothing to measure: it
    is returned with no timings.
    """
    if len(modes) == 1:
        return modes[0], {}
    seconds = {mode: float("inf") for mode in modes}
    usable = [mode for mode in modes if _timed(step, mode, device) is not None]  # warm-up
    for _ in range(repeats):
        for mode in usable:
            seconds[mode] = min(seconds[mode], _timed(step, mode, device) or float("inf"))
    return min(seconds, key=seconds.__getitem__), seconds


def _timed(step: Callable[[str], None], mode: str, device: torch.device) -> float | None:
    """Seconds ``step(mode)`` took, None if it failed."""
    try:
        start = time.perf_counter()
        step(mode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    except RuntimeError:
        return None
