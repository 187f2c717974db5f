"""Meta-training as small named steps, and the loop that strings them together (``fit``).

``Trainer`` holds one run: its components (the algorithm bound to the run's task type and
batching), its ``TrainState`` (everything the run's future depends on, and the one checkpoint
schema), the logger and the run directory. Its methods are the steps: ``step`` (one outer
update), ``log_train``, ``validate``, ``save`` and ``stop_requests``; ``fit`` is the algorithm
as a paper would write it, and ``commands.train`` writes the results after it.

The step counter is ``TrainState.step``, and only that: the algorithm is told it on every outer
step. The optimizer and the scheduler belong to the ``OuterStep`` that uses them; the state
reaches them there for the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mamlrun import config
from mamlrun.algorithms.losses import METRIC, better
from mamlrun.errors import MamlrunError, SweepConfigError
from mamlrun.results import checkpoint
from mamlrun.results.pictures import task_grid
from mamlrun.results.stats import format_ci, mean_ci95
from mamlrun.results.tensorboard import NullLogger, TensorBoardLogger, hparams_of
from mamlrun.training import auto_batching, distributed, provenance, resume, threads, transfer
from mamlrun.training.components import Components, build, component_config
from mamlrun.training.episodes import Evaluation, OuterStep, episodes, evaluate
from mamlrun.training.progress import Progress
from mamlrun.training.signals import Interrupted, StopFlag
from mamlrun.training.speed import WARMUP_ITERATIONS, SpeedMeter, shown

log = logging.getLogger("mamlrun")


@dataclass(frozen=True)
class Launch:
    """How the run was started, as only the CLI knows it; plain Python callers keep the
    defaults."""

    #: On resume, the keys this command asks to change; None: the whole config is meant.
    changed: frozenset[str] | None = None
    #: ``maximize`` or ``minimize`` when a sweeper optimises what ``train`` returns.
    sweep_direction: str | None = None
    #: The experiment preset the config was composed from (``experiment=``), if any.
    preset: str | None = None


@dataclass
class TrainState:
    """Everything a run's future depends on. ``state_dict`` is the checkpoint's schema."""

    model: nn.Module
    update: OuterStep  # owns the optimizer and the scheduler
    generator: torch.Generator
    batching: str  # the mode the run's tasks run in (``auto`` resolved before the first step)
    step: int = 0  # outer steps done: the run's one step counter
    best: float | None = None
    best_ci95: float | None = None
    best_step: int | None = None
    history: list[list[float]] = field(default_factory=list)  # [step, mean, ci95]
    init: dict[str, str] | None = None  # backbone.init's file (warm_start.Init.record)
    probe: dict[str, Any] | None = None  # what task_batching=auto measured (auto_batching)

    def state_dict(self) -> dict[str, Any]:
        scheduler = self.update.scheduler
        return {
            "model": self.model.state_dict(),
            "optimizer": self.update.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": self.generator.get_state(),
            "rng": checkpoint.rng_state(),
            "progress": {
                "step": self.step,
                "best": self.best,
                "best_ci95": self.best_ci95,
                "best_step": self.best_step,
                "history": self.history,
            },
            "task_batching": self.batching,
            "init": self.init,
            "task_batching_probe": self.probe,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.update.optimizer.load_state_dict(saved["optimizer"])
        if self.update.scheduler is not None:
            self.update.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        checkpoint.set_rng_state(saved["rng"])
        progress = saved["progress"]
        self.step, self.best, self.best_ci95 = (
            progress["step"],
            progress["best"],
            progress["best_ci95"],
        )
        self.best_step, self.history = progress["best_step"], progress["history"]
        self.batching = saved["task_batching"]
        self.init = saved.get("init")  # checkpoints from before backbone.init: none
        self.probe = saved.get("task_batching_probe")  # from before issue 26: none


def fit(t: Trainer, flag: StopFlag) -> str:
    """Meta-train until the iterations are done, the time budget is spent or a signal comes.

    Returns what stopped it (``iterations`` or ``max_minutes``); a signal saves ``last.pt``
    and raises ``Interrupted``.
    """
    cfg = t.cfg
    with t.progress() as bar, flag.deferring():
        while t.state.step < cfg.iterations:
            out = t.step()  # one outer update on a fresh meta-batch
            bar.update(1, **t.log_train(out))
            out_of_time, signalled = t.stop_requests(flag)
            last = out_of_time or t.state.step == cfg.iterations
            if t.main and (t.state.step % cfg.val_every == 0 or last):
                t.validate()  # on fixed tasks; best.pt when it improves
            if t.main and (t.state.step % cfg.checkpoint_every == 0 or last or signalled):
                t.save(t.last_path)
            if signalled:
                raise t.interruption(flag.signal)
            if out_of_time:
                t.out_of_time()
                return "max_minutes"
    return "iterations"


class Trainer:
    """One training run: built by ``Trainer.start``, closed (logger) on leaving ``with``."""

    def __init__(self, cfg: DictConfig, run_dir: Path, built: Components, state: TrainState,
                 ctx: distributed.Context, preset: str | None = None) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.state, self.ctx = cfg, run_dir, state, ctx
        self.components = built
        self.main = ctx.is_main
        self.several = ctx.enabled  # processes, agreeing on when to stop (``stop_requests``)
        self.preset = preset  # the experiment preset, as the CLI composed it
        self.metric_name = METRIC[built.source.task_type][0]
        self.last_path = run_dir / resume.LAST
        self.best_path = run_dir / "checkpoints" / "best.pt"
        self.logger = TensorBoardLogger(run_dir / "tb") if self.main else NullLogger()
        self.validation = Evaluation(
            "val",
            cfg.val_seed,
            cfg.val_tasks,
            cfg.eval_batch_size,
            built.algorithm.inner_steps_test,
        )
        self.batches = episodes(built.source, "train", state.generator, cfg.meta_batch_size)
        self.started = time.monotonic()
        device = torch.device(built.source.device)
        self.speed = SpeedMeter(device, WARMUP_ITERATIONS, state.step, "tasks")

    # ------------------------------------------------------------------ setting up
    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, launch: Launch, ctx: distributed.Context,
              device: torch.device) -> Trainer:  # fmt: skip
        """Build the run, or rebuild it from ``last.pt`` with ``resume`` (``resume.prepare``
        decides which, and what the resumed run continues with)."""
        resumed = ctx.on_main(lambda: resume.prepare(cfg, run_dir, launch.changed))
        if resumed is not None:
            cfg = resumed.cfg
            log.info(
                f"resumed from step {resumed.step} of {cfg.iterations} ({run_dir / resume.LAST})"
            )
            for line in resumed.changes:
                log.info(f"resume changes {line}")
        threads.use(cfg.threads)  # before the `auto` probe, which times them
        built = build(cfg, device, cfg.seed, cfg.precision, warm=resumed is None)
        _check_direction(launch.sweep_direction, built.source.task_type)
        _check_baseline(cfg, built.source)
        mode = resumed.batching if resumed is not None else built.algorithm.task_batching
        probe = None
        if mode == "auto":  # may turn checkpoint_inner on in the run's config (auto_batching)
            mode, cfg, built, probe = auto_batching.choose(cfg, built, ctx)
        built = replace(built, algorithm=built.algorithm.bind(built.source.task_type, mode))
        optimizer = built.make_optimizer(built.model.parameters())
        update = OuterStep(built.algorithm, optimizer, built.make_scheduler(optimizer), ctx)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        init = built.init.record() if built.init is not None else None
        state = TrainState(built.model, update, generator, mode, init=init, probe=probe)
        if resumed is not None:
            state.load_state_dict(resumed.saved)
        trainer = cls(cfg, run_dir, built, state, ctx, launch.preset)
        trainer.record_start()
        return trainer

    def record_start(self) -> None:
        if not self.main:
            return
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
        self.components.source.save_splits(self.run_dir)
        if self.components.source.task_type == "classification" and self.state.step == 0:
            source = self.components.source
            generator = torch.Generator(device=source.device).manual_seed(self.cfg.seed)
            example = source.sample("train", 1, generator)
            self.logger.log_image(
                "data/train_task (rows: labels; support | query)", task_grid(example)
            )

    # ------------------------------------------------------------------ the steps
    def step(self) -> dict[str, torch.Tensor]:
        """One outer update on the next meta-batch, at iteration ``state.step`` (a resumed run
        goes on from where it stopped); counts it, and times its sampling and meta-step."""
        s, meter = self.state, self.speed
        meter.begin()
        batch = next(self.batches)
        meter.sampled()
        out = s.update(s.model, batch, s.step)
        meter.stepped(batch.num_tasks)
        s.step += 1
        return out

    def log_train(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        """Every ``log_every`` steps: the training loss and metric to TensorBoard (and the
        progress display, which says from which step they are, since it shows them until the
        next); the interval's speed and the peak memory (``speed.SpeedMeter``) beside them; a
        loss that is no longer finite stops the run."""
        step = self.state.step
        if step % self.cfg.log_every and step != self.cfg.iterations:
            return {}
        loss, metric = float(out["loss"]), float(out["metric"])
        if not math.isfinite(loss):
            raise self.diverged(f"train loss is {loss}")
        speed = self.speed.flush()
        scalars = {"train/loss": loss, f"train/{self.metric_name}": metric, **speed}
        self.logger.log_dict(scalars, step)
        return {"loss": loss, self.metric_name: metric, "at step": step} | shown(speed)

    def validate(self) -> None:
        """Evaluate on the fixed validation tasks; ``best.pt`` when the metric improves."""
        built = self.components
        curves = evaluate(built.algorithm, self.state.model, built.source, self.validation)
        mean, ci = mean_ci95(curves["metric"][:, -1])
        if not math.isfinite(mean):
            raise self.diverged(f"validation {self.metric_name} is {mean}")
        s = self.state
        s.history.append([s.step, mean, ci])
        val_loss = float(curves["loss"][:, -1].mean())
        self.logger.log_dict({f"val/{self.metric_name}": mean, "val/loss": val_loss}, s.step)
        log.info(
            f"step {s.step}: val {self.metric_name} {format_ci(mean, ci)}, loss {val_loss:.4g}"
        )
        if better(self.components.source.task_type, mean, s.best):
            s.best, s.best_ci95, s.best_step = mean, ci, s.step
            self.save(self.best_path)

    def save(self, path: Path) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.state.model.parameters()):
            raise self.diverged("a meta-parameter is not finite")
        config = {
            "components": component_config(self.cfg),
            "run": OmegaConf.to_container(self.cfg, resolve=True),
        }
        task_type = self.components.source.task_type
        data = provenance.record(self.cfg.dataset, self.components.source)
        state = {**self.state.state_dict(), "task_type": task_type, "config": config, "data": data}
        checkpoint.save(path, state)

    def stop_requests(self, flag: StopFlag) -> tuple[bool, bool]:
        """(time budget spent, signal received), agreed by every rank: rank 0's clock and
        any rank's signal decide for all, so they stop after the same step."""
        budget = self.cfg.max_minutes
        out_of_time = budget is not None and time.monotonic() - self.started >= 60 * budget
        signalled = flag.signal is not None
        if self.several:
            signalled, out_of_time = self.ctx.any(signalled, self.main and out_of_time)
        return out_of_time, signalled

    # ------------------------------------------------------------------ ending
    def interruption(self, signum: int | None) -> Interrupted:
        self.ctx.barrier()  # the others wait until rank 0 has saved
        return Interrupted(
            signum or 15,
            f"saved {self.last_path} at step {self.state.step}; continue with "
            f"`mamlrun train resume=true hydra.run.dir={self.run_dir}`",
        )

    def out_of_time(self) -> None:
        """Say why a run stopped short, as a signal's stop says it (``interruption``):
        otherwise only results.json's ``stopped_by`` would tell."""
        if self.main:
            minutes = (time.monotonic() - self.started) / 60
            log.info(
                f"stopped after {minutes:.1f} minutes (max_minutes={self.cfg.max_minutes:g}) at "
                f"step {self.state.step:,} of {self.cfg.iterations:,}; saved {self.last_path}; "
                f"continue with `mamlrun train resume=true hydra.run.dir={self.run_dir}`"
            )

    def diverged(self, what: str) -> MamlrunError:
        """A NaN run must not end as a "best" result, nor overwrite a good checkpoint."""
        kept = (
            f"; checkpoints saved before it are in {self.last_path.parent}"
            if self.last_path.exists()
            else ""
        )
        return MamlrunError(
            f"{what} at step {self.state.step}: the run diverged; lower meta_optimizer.inner_lr "
            f"or meta_optimizer.optimizer.lr{kept}"
        )

    def progress(self) -> Progress:
        return Progress(
            "train",
            self.cfg.iterations,
            initial=self.state.step,
            every_s=self.cfg.progress_seconds,
            enabled=self.main,
        )

    def results(self, stopped_by: str) -> dict[str, Any]:
        s = self.state
        return {
            "metric": self.metric_name,
            "best_val": s.best,
            "best_val_ci95": s.best_ci95,
            "best_step": s.best_step,
            "steps": s.step,
            "iterations": self.cfg.iterations,
            "stopped_by": stopped_by,
            "val_tasks": self.cfg.val_tasks,
            "val_inner_steps": self.validation.steps,
            "task_batching": s.batching,
            "task_batching_probe": s.probe,  # auto's candidates: speed, peak, the choice
            "precision": self.cfg.precision,
            "threads": torch.get_num_threads(),
            **self.components.algorithm.describe(),
            "processes": self.ctx.world_size,
            "val_history": [{"step": st, "mean": m, "ci95": c} for st, m, c in s.history],
            "dataset": self.components.source.describe(),
            "init": s.init,  # backbone.init's file (path, sha256, kind); null: the factory's
            "preset": self.preset,
            "reference": _plain(self.cfg.reference),
            "speed": self.speed.summary(),  # this process's segment: ``speed.SpeedMeter``
        }

    def log_hparams(self, results: dict[str, Any]) -> None:
        """The HParams row. Every metric in it is this run's own; the paper's numbers are
        settings beside them (``paper.value``), so the two cannot be read for one another:
        ``test_<metric>_at_paper_steps`` is our test with the paper's inner steps (the
        separate test when the preset's differ, else the test itself)."""
        name = self.metric_name
        finals = {f"hparam/best_val_{name}": self.state.best}
        if results.get("test"):
            finals[f"hparam/test_{name}"] = results["test"]["mean"]
        at_paper_steps = results.get("reference_test") or results.get("test")
        if self.cfg.reference is not None and at_paper_steps:
            finals[f"hparam/test_{name}_at_paper_steps"] = at_paper_steps["mean"]
        speed = results.get("speed") or {}
        finals |= {f"hparam/{k}": speed[k] for k in ("tasks_per_s", "peak_mib") if k in speed}
        run = {k: self.cfg[k] for k in ("seed", "meta_batch_size", "iterations", "precision")}
        hparams = hparams_of(component_config(self.cfg)) | run | {"processes": self.ctx.world_size}
        hparams["preset"] = self.preset or "none"
        hparams["backbone.init_sha256"] = (self.state.init or {}).get("sha256", "null")
        if self.cfg.reference is not None:
            hparams |= hparams_of({"paper": _plain(self.cfg.reference)})
        self.logger.log_hparams(hparams, finals)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.close()


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node) if node is not None else None


def _check_baseline(cfg: DictConfig, source: Any) -> None:
    """The final test's transfer baseline (``baseline.checkpoint``) is refused before the
    training, not after it."""
    b = cfg.baseline
    final = cfg.final_test or cfg.final_adapt
    if not (b.enabled and b.checkpoint and final) or source.task_type != "classification":
        return
    dataset = config.choice("dataset", cfg.dataset).removeprefix("dataset=")
    transfer.read_pretrained(b.checkpoint, tuple(source.input_shape), dataset)


def _check_direction(direction: str | None, task_type: str) -> None:
    """An Optuna sweep that maximises MSE would search for the worst settings, silently."""
    if direction not in ("maximize", "minimize"):
        return
    metric_name, larger_is_better = METRIC[task_type]
    wanted = "maximize" if larger_is_better else "minimize"
    if direction != wanted:
        raise SweepConfigError(
            f"the sweeper would {direction} {metric_name}, which this dataset wants to "
            f"{wanted}: set hydra.sweeper.direction={wanted}"
        )
