"""``task_batching=auto``: the fastest way of running a meta-batch's tasks whose memory fits.

Speed costs memory: every mode that beats the per-task loop by much holds more of the
meta-batch's graph at once (``threads`` one task per worker, ``vmap`` a chunk or the whole
batch), 2 to 37 times the loop's peak on the Omniglot presets (issue 26). On a GPU memory
decides the batch and the backbone; on a shared CPU it decides whether the machine swaps. So
``auto`` measures, for each candidate (``candidates``), its time AND its peak memory for one
meta-batch of the run's own model, tasks and device (``measure``), and takes the fastest
whose peak fits ``meta_optimizer.max_memory`` (``pick``, a pure function of the numbers):

- ``Nx_loop`` (the YAML's ``2x_loop``): at most N times the loop's own peak (or the loop's
  peak + ``NEGLIGIBLE``, whichever is more). The loop keeps one task's graph at a time, so it
  is the yardstick a user can reason about on any device;
- a size (``2GiB``): at most that;
- ``auto``: at most ``FREE_SHARE`` of the memory the device has free before the probe;
- null: no bound, the fastest (what ``auto`` did before issue 26).

Where even the least memory-hungry candidate does not fit, the run stops with one line
(exit 2) rather than run past a bound the user set.

Where MAML is second order with several inner steps, the per-task modes with
``checkpoint_inner`` (the inner steps recomputed in the outer backward: less memory, more
time) are candidates too. The setting is MAML's, so a choice of it is written into the run's
config (``meta_optimizer.checkpoint_inner: true`` in ``config.yaml`` and every checkpoint):
a resumed run and ``test`` rebuild the algorithm the run trained with from there, and the
result comparison ignores it (``results/reference.NEUTRAL``: same meta-gradient).

Every candidate's numbers are logged (one line each), with the choice and why, and kept as
``task_batching_probe`` in the checkpoint and ``results.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mamlrun import config
from mamlrun.algorithms import batching
from mamlrun.config import ranges
from mamlrun.errors import MamlrunError
from mamlrun.models.precision import Precision
from mamlrun.training.components import Components, in_precision
from mamlrun.training.distributed import Context
from mamlrun.training.episodes import backward
from mamlrun.training.memory import free_bytes, peak_growth, show

log = logging.getLogger("mamlrun")

#: ``max_memory=auto``: the share of the device's free memory a meta-batch's peak may take;
#: the rest is for what the probe does not see (data, optimizer state, other processes).
FREE_SHARE = 0.8
#: ``Nx_loop`` allows at least this much more than the loop: below it, peaks differ by what the
#: allocator and the polling resolve (tens of KiB for the sinusoid's MLP), not by what a user's
#: memory can tell apart.
NEGLIGIBLE = 16 * 2**20
#: The suffix of a candidate that recomputes the inner steps (``checkpoint_inner``).
RECOMPUTED = "+checkpoint_inner"


@dataclass(frozen=True)
class Measured:
    """One candidate's numbers for one meta-batch: ``seconds`` (its best round, ``inf`` when
    it cannot run, with ``error`` saying why) and ``peak`` (bytes it allocated above what was
    allocated before it; NaN where that cannot be measured)."""

    name: str  # the batching mode, with ``RECOMPUTED`` when it recomputes the inner steps
    seconds: float
    peak: float
    error: str | None = None

    @property
    def mode(self) -> str:
        return self.name.removesuffix(RECOMPUTED)

    @property
    def recomputes(self) -> bool:
        return self.name.endswith(RECOMPUTED)

    @property
    def ran(self) -> bool:
        return math.isfinite(self.seconds)


@dataclass(frozen=True)
class Choice:
    """What ``pick`` chose, why, and the bound it applied (bytes; None: no bound)."""

    chosen: Measured
    reason: str
    bound: float | None


def bound_of(max_memory: str | None, loop_peak: float, free: float | None) -> float | None:
    """The bytes a candidate's peak may reach under ``max_memory`` (None: no bound), given the
    loop's peak and the device's free memory (only ``auto`` needs it)."""
    kind, value = ranges.parse_max_memory(max_memory)
    if kind == "unbounded":
        return None
    if kind == "times_loop":
        return max(value * loop_peak, loop_peak + NEGLIGIBLE)
    if kind == "bytes":
        return value
    if free is None:
        raise ValueError("max_memory=auto needs the device's free memory")
    return FREE_SHARE * free


def pick(measured: Sequence[Measured], max_memory: str | None, free: float | None) -> Choice:
    """The fastest candidate whose peak fits ``max_memory`` (see the module docstring).

    ``Nx_loop`` is relative to the plain loop's peak (to the smallest peak measured where the
    loop is no candidate). Where peaks cannot be measured (a CPU without glibc), a bound picks
    the loop, which needs the least. Raises MamlrunError when no candidate ran or none fits.
    """
    ran = [m for m in measured if m.ran]
    if not ran:
        reasons = "; ".join(f"{m.name}: {m.error}" for m in measured)
        raise MamlrunError(f"task_batching=auto: no task batching could run ({reasons})")
    fastest = min(ran, key=lambda m: m.seconds)
    loop = next((m for m in ran if m.name == "loop"), min(ran, key=lambda m: m.peak))
    bound = bound_of(max_memory, loop.peak, free)
    if bound is None:
        return Choice(fastest, "the fastest (max_memory=null: no bound)", None)
    if any(math.isnan(m.peak) for m in ran):
        why = "peak memory cannot be measured here, and the loop needs the least"
        return Choice(loop, f"max_memory={max_memory}: {why}", bound)
    fits = [m for m in ran if m.peak <= bound]
    within = f"max_memory={max_memory} ({_bound_text(max_memory, bound, loop)})"
    if not fits:
        least = min(ran, key=lambda m: m.peak)
        raise MamlrunError(
            f"task_batching=auto: no task batching fits {within}: the least memory, "
            f"{least.name}'s, peaks at {show(least.peak)} for one meta-batch; raise "
            "meta_optimizer.max_memory (null: no bound) or lower meta_batch_size"
        )
    chosen = min(fits, key=lambda m: m.seconds)
    reason = f"the fastest within {within}"
    if fastest is not chosen:
        reason += (
            f"; {fastest.name} would be {chosen.seconds / fastest.seconds:.2g}x faster but "
            f"peaks at {show(fastest.peak)}: meta_optimizer.max_memory={_size_above(fastest.peak)}"
            " or null allows it"
        )
    return Choice(chosen, reason, bound)


def _bound_text(max_memory: str | None, bound: float, loop: Measured) -> str:
    kind, value = ranges.parse_max_memory(max_memory)
    if kind == "times_loop":
        least = " (at least the loop's + 16 MiB)" if bound > value * loop.peak else ""
        return f"{value:g} x the loop's {show(loop.peak)}{least} = {show(bound)}"
    if kind == "free":
        return f"{FREE_SHARE:.0%} of the free memory = {show(bound)}"
    return show(bound)


def _size_above(size: float) -> str:
    """A size a user can type that is at least ``size`` bytes (``3.2GiB``, ``700MiB``)."""
    if size >= 2**30:
        return f"{math.ceil(size / 2**30 * 10) / 10:g}GiB"
    return f"{math.ceil(size / 2**20)}MiB"


def lines(measured: Sequence[Measured], choice: Choice, tasks: int) -> list[str]:
    """The log: one line per candidate (its speed and its peak, against the loop's and the
    bound), then the choice and why."""
    loop_peak = next((m.peak for m in measured if m.name == "loop" and m.ran), float("nan"))
    out = []
    for m in measured:
        if not m.ran:
            out.append(f"task_batching=auto: {m.name} cannot run ({m.error})")
            continue
        over = choice.bound is not None and not m.peak <= choice.bound
        relative = f", {m.peak / loop_peak:.2g}x the loop's" if loop_peak > 0 else ""
        out.append(
            f"task_batching=auto: {m.name} {m.seconds:.3g} s per meta-batch "
            f"({tasks / m.seconds:.3g} tasks/s), peak {show(m.peak)}{relative}"
            f"{', over max_memory' if over else ''}"
        )
    out.append(f"task_batching=auto chose {choice.chosen.name}: {choice.reason}")
    return out


def candidates(
    modes: Sequence[str], node: DictConfig, tasks: int, device: torch.device
) -> list[str]:
    """``batching.candidates``, and where MAML is second order with several inner steps and
    does not recompute its steps already, its per-task modes with ``checkpoint_inner``
    (``loop``, and ``threads`` where that is a candidate)."""
    plain = batching.candidates(modes, tasks, device)
    recomputable = (
        node.get("checkpoint_inner") is False
        and node.get("first_order") is False
        and node.get("inner_steps", 1) > 1
        and node.get("bn_mode") != "per_step"
    )
    if not recomputable:
        return plain
    return plain + [f"{m}{RECOMPUTED}" for m in ("loop", "threads") if m in plain]


def recomputing(cfg: DictConfig, built: Components) -> tuple[DictConfig, Components]:
    """The run's config and components with ``checkpoint_inner`` on: what a recomputing
    candidate runs with, and what the run records when one is chosen (module docstring)."""
    cfg = OmegaConf.merge(cfg, {"meta_optimizer": {"checkpoint_inner": True}})
    algorithm, _ = config.build_meta_optimizer(cfg.meta_optimizer)
    precision = Precision(cfg.precision, built.source.device.type)  # checked by build already
    return cfg, replace(built, algorithm=in_precision(algorithm, precision))


def choose(cfg: DictConfig, built: Components, ctx: Context) -> tuple[str, DictConfig,
                                                                     Components, dict]:  # fmt: skip
    """``auto`` resolved on this model, device and meta-batch (each rank's share of it): the
    mode, the config and components to run it with (``checkpoint_inner`` on when a
    recomputing candidate won) and the probe's record. Rank 0 measures, every rank takes its
    choice; the lines are logged on rank 0."""
    node, source = cfg.meta_optimizer, built.source
    max_memory = max_memory_of(node)
    share = -(-cfg.meta_batch_size // ctx.world_size)
    modes = built.algorithm.batching_modes

    def probe() -> dict[str, Any]:
        names = candidates(modes, node, share, source.device)
        if len(names) == 1:
            return {"chosen": names[0], "reason": "the only mode these settings support"}
        free = free_memory(max_memory, source.device)
        generator = torch.Generator(device=source.device).manual_seed(cfg.seed + 1)
        batch = source.sample("train", share, generator)
        algorithms = {False: built.algorithm}
        if any(n.endswith(RECOMPUTED) for n in names):
            algorithms[True] = recomputing(cfg, built)[1].algorithm
        bound = {
            n: algorithms[n.endswith(RECOMPUTED)].bind(source.task_type, n.removesuffix(RECOMPUTED))
            for n in names
        }

        def one_step(name: str) -> None:
            try:
                backward(bound[name].meta_objective(built.model, batch, None))
            finally:
                built.model.zero_grad(set_to_none=True)

        log.info(
            f"task_batching=auto: measuring {', '.join(names)} on a meta-batch of {share} "
            f"tasks (max_memory={max_memory})"
        )
        measured = measure(names, one_step, source.device)
        choice = pick(measured, max_memory, free)
        for line in lines(measured, choice, share):
            log.info(line)
        return record(measured, choice, max_memory, free, share)

    found = ctx.on_main(probe)
    if "candidates" not in found:
        log.info(f"task_batching=auto chose {found['chosen']}, {found['reason']}")
    chosen = found["chosen"]
    if chosen.endswith(RECOMPUTED):
        cfg, built = recomputing(cfg, built)
    return chosen.removesuffix(RECOMPUTED), cfg, built, found


def measure(
    names: Sequence[str], step: Callable[[str], None], device: torch.device, repeats: int = 2
) -> list[Measured]:
    """Each candidate's peak and best time for one meta-batch ``step(name)``.

    A warm-up call first (lazy initialisation and one-time allocations are no candidate's
    cost; a candidate that fails there is recorded as unable to run, never retried), then
    one call whose peak is measured (polling the CPU's heap would slow the timed ones), then
    ``repeats`` timed rounds A B C A B C, each keeping its best: interleaving makes a slow
    spell of the machine hit every candidate alike.
    """
    errors: dict[str, str] = {}
    peaks = {}
    for name in names:
        try:
            step(name)
            peaks[name] = peak_growth(lambda: step(name), device)  # noqa: B023
        except RuntimeError as ex:  # no batching rule, out of memory, ...
            errors[name] = str(ex).strip().splitlines()[0] if str(ex).strip() else repr(ex)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    seconds = {name: math.inf for name in names}
    for _ in range(repeats):
        for name in peaks:
            start = time.perf_counter()
            step(name)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return [Measured(n, seconds[n], peaks.get(n, math.nan), errors.get(n)) for n in names]


def free_memory(max_memory: str | None, device: torch.device) -> float | None:
    """The device's free memory, where ``max_memory=auto`` needs it (else None)."""
    if ranges.parse_max_memory(max_memory)[0] != "free":
        return None
    try:
        return free_bytes(device)
    except OSError as ex:
        raise MamlrunError(
            f"meta_optimizer.max_memory=auto cannot read this machine's free memory ({ex}); "
            "give a size (2GiB) or Nx_loop"
        ) from None


def max_memory_of(node: DictConfig) -> str | None:
    """``meta_optimizer.max_memory``, which ``auto`` needs: an algorithm's YAML of one's own
    that does not extend base/learner.yaml must set it to use ``auto``."""
    if "max_memory" not in node:
        raise MamlrunError(
            "meta_optimizer.task_batching=auto needs meta_optimizer.max_memory (2x_loop, a "
            "size such as 2GiB, auto or null; see conf/meta_optimizer/base/learner.yaml)"
        )
    return node.max_memory


def record(measured: Sequence[Measured], choice: Choice, max_memory: str | None,
           free: float | None, tasks: int) -> dict[str, Any]:  # fmt: skip
    """What the probe found, for the checkpoint and ``results.json`` (bytes, seconds; null
    where a candidate could not run or its peak could not be measured)."""

    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "max_memory": max_memory,
        "bound_bytes": choice.bound,
        "free_bytes": free,
        "tasks": tasks,
        "chosen": choice.chosen.name,
        "reason": choice.reason,
        "candidates": [
            {
                "name": m.name,
                "seconds": finite(m.seconds),
                "peak_bytes": finite(m.peak),
                "tasks_per_s": tasks / m.seconds if m.ran else None,
                "error": m.error,
            }
            for m in measured
        ],  # fmt: skip
    }
