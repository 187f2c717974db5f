"""``mamlrun pretrain``: the backbone trained as one classifier over every training class.

Modern MAML results start from such a backbone (UNICORN-MAML starts from FEAT's pre-trained
ResNet-12), and the transfer baseline every few-shot paper compares against is one. The
training split is read as one labelled pool through the data layer that serves the tasks
(``EpisodicImages.pool_labels``/``pool_images``): the same storage, normalisation and
training augmentation, no second reader. Omniglot's rotations are classes there, as in MAML.

The run is small named steps, as ``trainer.Trainer``'s: ``step`` (one SGD step on the next
batch), ``validate`` (few-shot tasks of the validation split, fixed by ``val_seed``, each
classified by the nearest centroid of its support features: no inner loop, so a model is
judged by its features alone), ``save``. Everything the run's future depends on is in
``PretrainState`` (the checkpoint), and nothing else is random: the order of the images of
epoch ``e`` is a permutation drawn from a generator seeded by ``(seed, e)``, the augmentation
draws from the state's generator, the learning rate is a function of the step. A resumed run
is therefore bitwise the run that was never stopped.

The checkpoint (``best.pt``, ``last.pt``) is the contract the readers rely on (``train
backbone.init=``, the transfer baseline): ``kind: "pretrain"``, ``model`` (the backbone's
``state_dict``, built by its factory as ``train`` builds it, with ``classes`` outputs),
``head`` (the name of its classification layer), ``classes``, ``input_shape``, ``backbone``
(the resolved config node), ``dataset`` (the choice's name) and ``config`` (the whole resolved
run config), beside the resume state.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from mamlrun import config
from mamlrun.algorithms.selection import head as head_name
from mamlrun.data.episodic import EpisodicImages
from mamlrun.data.tasks import TaskBatch, TaskSource
from mamlrun.errors import MamlrunError
from mamlrun.models.layers import changes_over_training, tell_training_step
from mamlrun.results import checkpoint
from mamlrun.results.stats import format_ci, mean_ci95
from mamlrun.results.tensorboard import NullLogger, TensorBoardLogger
from mamlrun.training import provenance, resume, threads
from mamlrun.training.episodes import episodes
from mamlrun.training.progress import Progress
from mamlrun.training.signals import Interrupted, StopFlag
from mamlrun.training.speed import WARMUP_ITERATIONS, SpeedMeter, shown

log = logging.getLogger("mamlrun")

KIND = "pretrain"
#: Validation tasks are drawn this many at a time (the stream, and so the tasks, depend on it).
VAL_DRAW = 25


# ---------------------------------------------------------------------------- the data
def labelled_pool(source: TaskSource, dataset: str) -> EpisodicImages:
    """The image store behind ``source``, which serves its training split as one pool; a
    dataset without classes, or not served by the image layer, is refused in one line."""
    if source.task_type != "classification":
        raise MamlrunError(
            f"pretrain classifies images, and {dataset} is {source.task_type}: there are no "
            "classes to pre-train on (choose an image dataset: omniglot, miniimagenet, ...)"
        )
    store = source if isinstance(source, EpisodicImages) else getattr(source, "episodes", None)
    if not isinstance(store, EpisodicImages):
        raise MamlrunError(
            f"pretrain reads datasets served by the image layer (data/episodic.py "
            f"EpisodicImages); {dataset} ({type(source).__name__}) is not one"
        )
    return store


def dataset_name(node: Any) -> str:
    """``omniglot`` for the config ``dataset=omniglot`` built (``config.choice``)."""
    return config.choice("dataset", node).removeprefix("dataset=")


def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    """The order of the pool's images in ``epoch``: a permutation from a generator seeded by
    the run's seed and the epoch alone, so a resumed run needs no saved order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator)


def learning_rate(cfg: DictConfig, step: int, total: int, per_epoch: int) -> float:
    """The rate of ``step`` (from 0): ``cosine`` anneals it to 0 over the ``total`` steps;
    ``step`` multiplies it by ``gamma`` once for every milestone epoch (from 1, as FEAT counts)
    that has begun."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
    epoch = step // per_epoch + 1
    return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)


# ---------------------------------------------------------------------------- validation
def penultimate(model: nn.Module, head: str, x: torch.Tensor) -> torch.Tensor:
    """What the head sees: the input of the module ``head`` in a forward pass of ``x``."""
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(head).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0])
    )
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0].flatten(1)


def nearest_centroid(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int
) -> torch.Tensor:
    """The label of each query feature: the class whose mean support feature is nearest
    (Euclidean), as ProtoNet and FEAT's pre-training validation classify."""
    centroids = torch.stack([support[support_y == c].mean(0) for c in range(ways)])
    return torch.cdist(query, centroids).argmin(1)


def task_accuracy(model: nn.Module, head: str, batch: TaskBatch, ways: int) -> torch.Tensor:
    """Query accuracy of each task by nearest centroid. A task's support and query go through
    the network in one batch, so batch norm sees that task's statistics (transductive, as the
    MAML family evaluates), never another task's."""
    out = []
    for t in range(batch.num_tasks):
        shots = batch.x_support.shape[1]
        features = penultimate(model, head, torch.cat([batch.x_support[t], batch.x_query[t]]))
        predicted = nearest_centroid(features[:shots], batch.y_support[t], features[shots:], ways)
        out.append((predicted == batch.y_query[t]).float().mean())
    return torch.stack(out)


# ---------------------------------------------------------------------------- the state
@dataclass
class PretrainState:
    """Everything a pre-training run's future depends on; ``state_dict`` is its part of the
    checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the augmentation's numbers
    step: int = 0
    best: float | None = None
    best_ci95: float | None = None
    best_step: int | None = None
    history: list[list[float]] = field(default_factory=list)  # [step, mean, ci95]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "rng": checkpoint.rng_state(),
            "progress": {"step": self.step, "best": self.best, "best_ci95": self.best_ci95,
                         "best_step": self.best_step, "history": self.history},
        }  # fmt: skip

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        checkpoint.set_rng_state(saved["rng"])
        p = saved["progress"]
        self.step, self.best, self.best_ci95 = p["step"], p["best"], p["best_ci95"]
        self.best_step, self.history = p["best_step"], p["history"]


def continued(cfg: DictConfig, run_dir: Path, changed: Any) -> tuple[DictConfig, dict | None]:
    """The config to run with and, with ``resume``, the ``last.pt`` read back (the run's own
    config with the changes ``resume.MAY_CHANGE`` allows); without, the folder checked free."""
    if not cfg.resume:
        resume.check_fresh(run_dir)
        return cfg, None
    if not resume.holds_run(run_dir):
        raise MamlrunError(
            f"resume=true but {run_dir} holds no {resume.LAST.as_posix()}: nothing to continue"
        )
    saved = checkpoint.load(run_dir / resume.LAST, map_location="cpu")
    if saved.get("kind") != KIND:
        raise MamlrunError(f"{run_dir} holds a mamlrun train run; continue it with mamlrun train")
    merged, changes = resume.continued_config(saved["config"], cfg, changed)
    merged = config.validate(merged, config.PretrainConfig)
    for line in changes:
        log.info(f"resume changes {line}")
    return merged, saved


# ---------------------------------------------------------------------------- the run
class Pretraining:
    """One pre-training run: built by ``Pretraining.start``, its logger closed on leaving."""

    def __init__(self, cfg: DictConfig, run_dir: Path, source: TaskSource, model: nn.Module,
                 state: PretrainState) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.source, self.state = cfg, run_dir, source, state
        self.model = model
        self.dataset = dataset_name(cfg.dataset)
        self.pool = labelled_pool(source, self.dataset)
        self.labels = self.pool.pool_labels("train")
        self.classes = len(self.pool.classes["train"])
        self.head = head_name(model)
        self.ramps = changes_over_training(model)
        self.per_epoch = max(self.labels.shape[0] // cfg.batch_size, 1)
        self.total = cfg.iterations or cfg.epochs * self.per_epoch
        self.last_path = run_dir / resume.LAST
        self.best_path = run_dir / "checkpoints" / "best.pt"
        self.logger: TensorBoardLogger | NullLogger = NullLogger()  # until the run is checked
        self.started = time.monotonic()
        self._order: tuple[int, torch.Tensor] | None = None
        device = torch.device(self.labels.device)
        self.speed = SpeedMeter(device, WARMUP_ITERATIONS, state.step, "images")

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, changed: Any, device: torch.device):
        """Data → pool check → backbone with one output per training class → SGD; or all of
        it read back from ``last.pt`` (``resume``)."""
        cfg, saved = continued(cfg, run_dir, changed)
        threads.use(cfg.threads)
        torch.manual_seed(cfg.seed)
        source = config.instantiate(cfg.dataset, device=device)
        pool = labelled_pool(source, dataset_name(cfg.dataset))
        model = backbone(cfg, tuple(source.input_shape), len(pool.classes["train"]), device)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        state = PretrainState(model, optimizer, generator)
        if saved is not None:
            state.load_state_dict(saved)
            log.info(f"resumed from step {state.step} ({run_dir / resume.LAST})")
        run = cls(cfg, run_dir, source, model, state)
        run.check_length()
        run.logger = TensorBoardLogger(run_dir / "tb")
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        source.save_splits(run_dir)
        log.info(
            f"pretrain {run.dataset}: {run.classes}-way classification over "
            f"{run.labels.shape[0]:,} training images, {run.total:,} steps of {cfg.batch_size} "
            f"({run.per_epoch:,} per epoch); validation {run.pool.ways}-way {run.pool.shots}-shot"
        )
        return run

    def check_length(self) -> None:
        done = self.state.step
        if done >= self.total:
            raise MamlrunError(
                f"this run already finished at step {done} of {self.total}: pass a larger "
                "iterations= (or epochs=) to extend it"
            )

    # ------------------------------------------------------------------ the steps
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of step ``state.step``: its slice of its epoch's order."""
        epoch, position = divmod(self.state.step, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.labels.shape[0]))
        size = min(self.cfg.batch_size, self.labels.shape[0])
        index = self._order[1][position * size : (position + 1) * size].to(self.labels.device)
        x = self.pool.pool_images("train", index, self.state.generator)
        return x, self.labels[index]

    def step(self) -> dict[str, float]:
        """One SGD step at the schedule's rate for this step; counts it."""
        s = self.state
        rate = learning_rate(self.cfg, s.step, self.total, self.per_epoch)
        for group in s.optimizer.param_groups:
            group["lr"] = rate
        self.model.train()
        if self.ramps:
            tell_training_step(self.model, s.step)  # DropBlock's ramp, as in meta-training
        self.speed.begin()
        x, y = self.batch()
        self.speed.sampled()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        self.speed.stepped(int(y.shape[0]))
        s.step += 1
        accuracy = (logits.argmax(1) == y).float().mean()
        return {"loss": float(loss.detach()), "accuracy": float(accuracy), "lr": rate}

    def log_train(self, out: dict[str, float]) -> dict[str, float]:
        step = self.state.step
        if step % self.cfg.log_every and step != self.total:
            return {}
        if not math.isfinite(out["loss"]):
            raise self.diverged(f"train loss is {out['loss']}")
        speed = self.speed.flush()
        self.logger.log_dict({f"train/{k}": v for k, v in out.items()} | speed, step)
        return {"loss": out["loss"], "accuracy": out["accuracy"], "at step": step} | shown(speed)

    @torch.no_grad()
    def validate(self) -> None:
        """Nearest-centroid accuracy on the fixed validation tasks; ``best.pt`` when better."""
        cfg, s = self.cfg, self.state
        self.model.eval()
        generator = torch.Generator(device=self.pool.device).manual_seed(cfg.val_seed)
        accuracies = [
            task_accuracy(self.model, self.head, batch, self.pool.ways)
            for batch in episodes(self.source, "val", generator, VAL_DRAW, cfg.val_tasks)
        ]
        mean, ci = mean_ci95(torch.cat(accuracies).cpu())
        s.history.append([s.step, mean, ci])
        self.logger.log_dict({"val/accuracy": mean}, s.step)
        log.info(f"step {s.step}: val accuracy (nearest centroid) {format_ci(mean, ci)}")
        if s.best is None or mean > s.best:
            s.best, s.best_ci95, s.best_step = mean, ci, s.step
            self.save(self.best_path)

    def save(self, path: Path) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise self.diverged("a weight is not finite")
        checkpoint.save(path, {**self.state.state_dict(), **self.contract()})

    def contract(self) -> dict[str, Any]:
        """What a reader of the checkpoint needs besides the weights (module docstring)."""
        return {
            "kind": KIND,
            "head": self.head,
            "classes": self.classes,
            "input_shape": list(self.source.input_shape),
            "backbone": OmegaConf.to_container(self.cfg.backbone, resolve=True),
            "dataset": self.dataset,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "task_type": self.source.task_type,
            "data": provenance.record(self.cfg.dataset, self.source),
        }

    def out_of_time(self) -> bool:
        budget = self.cfg.max_minutes
        return budget is not None and time.monotonic() - self.started >= 60 * budget

    def diverged(self, what: str) -> MamlrunError:
        return MamlrunError(
            f"{what} at step {self.state.step}: pre-training diverged; lower lr "
            f"(checkpoints saved before it are in {self.last_path.parent})"
        )

    def interruption(self, signum: int) -> Interrupted:
        return Interrupted(
            signum,
            f"saved {self.last_path} at step {self.state.step}; continue with `mamlrun "
            f"pretrain resume=true hydra.run.dir={self.run_dir}`",
        )

    def results(self, stopped_by: str) -> dict[str, Any]:
        s = self.state
        return {
            "kind": KIND, "metric": "accuracy", "validation": "nearest centroid",
            "best_val": s.best, "best_val_ci95": s.best_ci95, "best_step": s.best_step,
            "steps": s.step, "iterations": self.total, "steps_per_epoch": self.per_epoch,
            "stopped_by": stopped_by, "classes": self.classes,
            "train_images": int(self.labels.shape[0]), "val_tasks": self.cfg.val_tasks,
            "val_ways": self.pool.ways, "val_shots": self.pool.shots,
            "val_history": [{"step": st, "mean": m, "ci95": c} for st, m, c in s.history],
            "threads": torch.get_num_threads(), "dataset": self.source.describe(),
            "speed": self.speed.summary(),  # this process's segment: ``speed.SpeedMeter``
        }  # fmt: skip

    def __enter__(self) -> Pretraining:
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.close()


def backbone(cfg: DictConfig, in_shape: tuple, classes: int, device: torch.device) -> nn.Module:
    """The backbone as ``train`` builds it (its factory, its settings), ``classes`` wide."""
    try:
        model = config.instantiate(cfg.backbone, in_shape=in_shape, out_features=classes)
    except MamlrunError as ex:
        pair = f"{config.choice('backbone', cfg.backbone)} cannot take "
        raise MamlrunError(f"{pair}{config.choice('dataset', cfg.dataset)}: {ex}") from ex
    return model.to(device)


def fit(run: Pretraining, flag: StopFlag) -> str:
    """Train until the steps are done, the time budget is spent or a signal comes (which
    saves ``last.pt`` and raises ``Interrupted``); returns what stopped it."""
    cfg, s = run.cfg, run.state
    progress = Progress("pretrain", run.total, initial=s.step, every_s=cfg.progress_seconds)
    with progress as bar, flag.deferring():
        while s.step < run.total:
            bar.update(1, **run.log_train(run.step()))
            out_of_time, last = run.out_of_time(), s.step == run.total
            if s.step % cfg.val_every == 0 or last or out_of_time:
                run.validate()
            if s.step % cfg.checkpoint_every == 0 or last or out_of_time or flag.signal:
                run.save(run.last_path)
            if flag.signal is not None:
                raise run.interruption(flag.signal)
            if out_of_time:
                budget = f"max_minutes={cfg.max_minutes:g}"
                log.info(
                    f"stopped at step {s.step:,} of {run.total:,} ({budget}); saved "
                    f"{run.last_path}; continue with `mamlrun pretrain resume=true "
                    f"hydra.run.dir={run.run_dir}`"
                )
                return "max_minutes"
    return "iterations"
