"""``train(cfg)``, ``test(cfg)`` and ``adapt(cfg)``: plain functions the CLI and tests call.

Each takes a composed config and a run directory, writes ``results.json`` and TensorBoard
events there, and returns the metric a sweep would optimise.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mamlrun import checkpoint, config, distributed
from mamlrun.algorithms import batching as batching_probe
from mamlrun.algorithms.pretrain import pretrain_jointly
from mamlrun.data.tasks import TaskSource
from mamlrun.errors import MamlrunError, SweepConfigError
from mamlrun.logging import ConsoleLogger, NullLogger, TensorBoardLogger
from mamlrun.loop import episodes, evaluate
from mamlrun.metrics import METRIC, better, mean_ci95
from mamlrun.visualize import task_grid

log = logging.getLogger("mamlrun")
COMPONENTS = ("dataset", "backbone", "meta_optimizer")


# --------------------------------------------------------------------------- building blocks
def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MamlrunError(
            f"device={name!r} is not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MamlrunError(
                f"device={name} was requested but CUDA is not available here "
                f"(torch {torch.__version__}); use device=cpu or device=auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MamlrunError(
                f"device={name} does not exist: this machine has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    elif device.type != "cpu":
        raise MamlrunError(f"device={name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


@dataclass
class Components:
    source: TaskSource
    model: torch.nn.Module
    algorithm: Any
    make_optimizer: Any
    make_scheduler: Any = None


def build(cfg: DictConfig, device: torch.device, seed: int) -> Components:
    """Dataset → backbone → meta-optimizer, with the initialisation fixed by ``seed``.

    The model is the backbone plus whatever extra meta-parameters the algorithm learns
    (``algorithm.meta_model``), so optimizer and checkpoints cover those too.
    """
    torch.manual_seed(seed)
    source = config.instantiate(cfg.dataset, device=device)
    backbone = config.instantiate(
        cfg.backbone, in_shape=tuple(source.input_shape), out_features=source.output_size
    ).to(device)
    algorithm, make_optimizer = config.build_meta_optimizer(cfg.meta_optimizer)
    model = algorithm.meta_model(backbone)
    make_scheduler = config.build_scheduler(cfg.meta_optimizer)
    return Components(source, model, algorithm, make_optimizer, make_scheduler)


def run_dir_of(run_dir: str | Path | None) -> Path:
    """The given directory, else Hydra's output directory for this job."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise MamlrunError("no run directory: pass run_dir= or run through the CLI")
        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def progress(total: int, initial: int, desc: str, enabled: bool = True) -> tqdm:
    """A live bar on a terminal; nothing on a pipe or in a log file (the loggers print lines)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty()),
        unit="it",
    )


@contextmanager
def stop_on_signal() -> Iterator[dict[str, int | None]]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step.

    The loop then saves and exits; a second signal takes the default action, so a stuck run
    can still be killed.
    """
    received: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        received["signal"] = signum
        for s, h in previous.items():
            signal.signal(s, h)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def component_config(cfg: DictConfig) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in COMPONENTS}


# --------------------------------------------------------------------------- train
@dataclass
class Progress:
    step: int = 0
    best: float | None = None
    best_ci95: float | None = None
    best_step: int | None = None
    history: list[list[float]] = field(default_factory=list)  # [step, mean, ci95]


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> float | None:
    """Meta-train; validate every ``val_every`` steps and keep the best checkpoint.

    Returns the best validation metric (accuracy or MSE), which a Hydra sweep can optimise.
    Under ``torchrun`` the meta-batch is split across the processes (``distributed``); only
    rank 0 validates, logs and checkpoints, and the other ranks return None.
    """
    cfg = config.validate(cfg, config.TrainConfig)
    for key in (
        "iterations",
        "meta_batch_size",
        "val_every",
        "val_tasks",
        "eval_batch_size",
        "checkpoint_every",
        "log_every",
    ):
        if cfg[key] < 1:
            raise MamlrunError(f"{key} must be positive, got {cfg[key]}")
    world_size = distributed.world_size_from_env()
    if world_size > 1 and in_sweep():
        raise SweepConfigError("torchrun runs one training job: start a -m sweep without it")
    if cfg.meta_batch_size < world_size:
        raise MamlrunError(
            f"meta_batch_size={cfg.meta_batch_size} cannot be split across {world_size} "
            "processes: give each at least one task"
        )
    with distributed.session(resolve_device(cfg.device)) as (ctx, device):
        return _train(cfg, run_dir, device, ctx)


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _single_process(command: str) -> None:
    if distributed.world_size_from_env() > 1:
        raise MamlrunError(f"mamlrun {command} runs in one process: start it without torchrun")


def _train(
    cfg: DictConfig, run_dir: str | Path | None, device: torch.device, ctx: distributed.Context
) -> float | None:
    run_dir = Path(ctx.on_main(lambda: str(run_dir_of(run_dir))))
    parts = build(cfg, device, cfg.seed)
    source, model, algorithm = parts.source, parts.model, parts.algorithm
    optimizer = parts.make_optimizer(model.parameters())
    scheduler = parts.make_scheduler(optimizer) if parts.make_scheduler else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    metric_name, _ = METRIC[source.kind]
    _check_sweep_direction(source.kind, metric_name)
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    state = Progress()
    batching = algorithm.task_batching

    def load_for_resume() -> dict:
        # RNG and generator states must stay CPU tensors; load_state_dict moves the rest.
        saved = checkpoint.load(last_path, map_location="cpu")
        if saved["config"]["components"] != component_config(cfg):
            raise MamlrunError(f"resume=true but the config differs from {last_path}'s")
        return saved

    def check_fresh() -> None:
        if last_path.exists():
            raise MamlrunError(
                f"{run_dir} already holds a run; pass resume=true to continue it, "
                "or choose another hydra.run.dir"
            )

    if cfg.resume:
        # Rank 0 reads the checkpoint and sends it to the others: no shared disk needed.
        saved = ctx.on_main(load_for_resume)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        checkpoint.set_rng_state(saved["rng"])
        state = Progress(**saved["progress"])
        batching = saved["task_batching"]
    else:
        ctx.on_main(check_fresh)
    if batching == "auto":
        # Each rank adapts to its share of the meta-batch, so that is the workload to time.
        share = -(-cfg.meta_batch_size // ctx.world_size)
        batching, seconds = ctx.on_main(
            lambda: batching_probe.probe(algorithm, model, source, share, seed=cfg.seed + 1)
        )
        timing = ", ".join(f"{k} {v:.3g}s" for k, v in seconds.items())
        log.info(
            f"task_batching=auto chose {batching} ({timing} per meta-batch)"
            if seconds
            else f"task_batching=auto chose {batching}, the only mode this algorithm supports"
        )

    main = ctx.is_main
    if main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        source.save_splits(run_dir)
    tb = TensorBoardLogger(run_dir / "tb") if main else NullLogger()
    console = ConsoleLogger()
    if main and source.kind == "classification" and state.step == 0:
        example = source.sample("train", 1, torch.Generator(device=device).manual_seed(cfg.seed))
        tb.log_image("data/train_task (rows: labels; support | query)", task_grid(example))

    def save(path: Path) -> None:
        checkpoint.save(
            path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "generator": generator.get_state(),
                "rng": checkpoint.rng_state(),
                "progress": state.__dict__,
                "task_batching": batching,
                "kind": source.kind,
                "config": {
                    "components": component_config(cfg),
                    "run": OmegaConf.to_container(cfg, resolve=True),
                },
            },
        )

    def diverged(what: str, step: int) -> MamlrunError:
        """A NaN run must not end as a "best" result, nor overwrite a good checkpoint."""
        kept = f"; checkpoints saved before it are in {ckpt_dir}" if last_path.exists() else ""
        return MamlrunError(
            f"{what} at step {step}: the run diverged; lower meta_optimizer.inner_lr or "
            f"meta_optimizer.optimizer.lr{kept}"
        )

    def validate() -> None:
        curves = evaluate(
            algorithm,
            model,
            source,
            split="val",
            seed=cfg.val_seed,
            num_tasks=cfg.val_tasks,
            batch_size=cfg.eval_batch_size,
            steps=algorithm.inner_steps_test,
            batching=batching,
        )
        mean, ci = mean_ci95(curves["metric"][:, -1])
        if not math.isfinite(mean):
            tb.close()
            raise diverged(f"validation {metric_name} is {mean}", state.step)
        state.history.append([state.step, mean, ci])
        payload = {f"val/{metric_name}": mean, "val/loss": float(curves["loss"][:, -1].mean())}
        tb.log_dict(payload, state.step)
        console.log_dict({**payload, f"val/{metric_name}_ci95": ci}, state.step)
        if better(source.kind, mean, state.best):
            state.best, state.best_ci95, state.best_step = mean, ci, state.step
            save(best_path)

    stream = episodes(
        algorithm,
        model,
        source,
        split="train",
        generator=generator,
        batch_size=cfg.meta_batch_size,
        batching=batching,
        optimizer=optimizer,
        first_step=state.step,
        distributed=ctx,
    )
    with (
        stop_on_signal() as stop,
        logging_redirect_tqdm(),
        progress(cfg.iterations, state.step, "train", enabled=main) as bar,
    ):
        started = time.monotonic()
        out_of_time = False
        while state.step < cfg.iterations and not out_of_time:
            out = next(stream)
            if scheduler is not None:
                scheduler.step()
            state.step += 1
            bar.update(1)
            step = state.step
            budget = cfg.max_minutes
            out_of_time = budget is not None and time.monotonic() - started >= 60 * budget
            if ctx.enabled:  # rank 0's clock and any rank's signal decide for all
                signalled, out_of_time = ctx.any(stop["signal"] is not None, main and out_of_time)
                if signalled and stop["signal"] is None:
                    stop["signal"] = signal.SIGTERM
            last = step == cfg.iterations or out_of_time
            if step % cfg.log_every == 0 or last:
                loss, metric = float(out["loss"]), float(out["metric"])
                if not math.isfinite(loss):
                    tb.close()
                    raise diverged(f"train loss is {loss}", step)
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                tb.log_dict({"train/loss": loss, f"train/{metric_name}": metric}, step)
            if main and (step % cfg.val_every == 0 or last):
                validate()
            if main and (step % cfg.checkpoint_every == 0 or last or stop["signal"]):
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    tb.close()
                    raise diverged("a meta-parameter is not finite", step)
                save(last_path)
            if stop["signal"]:
                ctx.barrier()  # the others wait until rank 0 has saved
                name = signal.Signals(stop["signal"]).name
                log.info(
                    f"{name} received: saved {last_path} at step {step}; continue with "
                    f"`mamlrun train resume=true hydra.run.dir={run_dir}` "
                    "(and the same overrides)"
                )
                tb.close()
                raise SystemExit(128 + stop["signal"])

    if not main:
        return None
    results = {
        "metric": metric_name,
        "best_val": state.best,
        "best_val_ci95": state.best_ci95,
        "best_step": state.best_step,
        "steps": state.step,
        "stopped_by": "max_minutes" if out_of_time else "iterations",
        "val_tasks": cfg.val_tasks,
        "val_inner_steps": algorithm.inner_steps_test,
        "task_batching": batching,
        "bn_mode": algorithm.bn_mode,
        "processes": ctx.world_size,
        "val_history": [{"step": s, "mean": m, "ci95": c} for s, m, c in state.history],
        "dataset": source.describe(),
    }
    finals: dict[str, float] = {f"hparam/best_val_{metric_name}": state.best}
    if cfg.final_test or cfg.final_adapt:
        common = {
            "checkpoint": str(best_path),
            "n_tasks": cfg.test_tasks,
            "seed": cfg.test_seed,
            "device": cfg.device,
            "eval_batch_size": cfg.eval_batch_size,
        }
        if cfg.final_test:
            results["test"] = _test_results(OmegaConf.create(common), run_dir / "test")
            finals[f"hparam/test_{metric_name}"] = results["test"]["mean"]
        if cfg.final_adapt:
            adapt_cfg = OmegaConf.create({**common, "baseline": cfg.baseline})
            results["adapt"] = _adapt_results(adapt_cfg, run_dir / "adapt")
    write_json(run_dir / "results.json", results)
    run_keys = ("seed", "meta_batch_size", "iterations")
    hparams = _flatten(component_config(cfg)) | {k: cfg[k] for k in run_keys}
    tb.log_hparams(hparams | {"processes": ctx.world_size}, finals)
    tb.close()
    log.info(
        f"best val {metric_name} {state.best:.4g} ± {state.best_ci95:.2g} "
        f"at step {state.best_step}; results in {run_dir}"
    )
    return state.best


def _check_sweep_direction(kind: str, metric_name: str) -> None:
    """An Optuna sweep that maximises MSE would search for the worst settings, silently."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    direction = HydraConfig.get().sweeper.get("direction")
    if not isinstance(direction, str) or direction not in ("maximize", "minimize"):
        return
    wanted = "minimize" if kind == "regression" else "maximize"
    if direction != wanted:
        raise SweepConfigError(
            f"the sweeper would {direction} {metric_name}, which this dataset wants to "
            f"{wanted}: set hydra.sweeper.direction={wanted}"
        )


# --------------------------------------------------------------------------- test and adapt
def _restore(cfg: DictConfig) -> tuple[Components, dict, DictConfig]:
    device = resolve_device(cfg.device)
    saved = checkpoint.load(cfg.checkpoint, map_location="cpu")
    try:
        components = OmegaConf.create(saved["config"]["components"])
    except (KeyError, TypeError):
        raise MamlrunError(f"{cfg.checkpoint} holds no mamlrun config") from None
    if cfg.data_root is not None and "root" in components.dataset:
        components.dataset.root = cfg.data_root
    components = config.validate(components, _ComponentsOnly)
    parts = build(components, device, seed=0)
    try:
        parts.model.load_state_dict(saved["model"])
    except RuntimeError as ex:
        raise MamlrunError(
            f"{cfg.checkpoint}: weights do not fit the backbone: {str(ex).splitlines()[0]}"
        ) from None
    return parts, saved, components


@dataclass
class _ComponentsOnly:
    dataset: Any = None
    backbone: Any = None
    meta_optimizer: Any = None


def _curves(parts: Components, saved: dict, cfg: DictConfig, steps: int) -> dict:
    batching = saved.get("task_batching", "loop")
    return evaluate(
        parts.algorithm,
        parts.model,
        parts.source,
        split="test",
        seed=cfg.seed,
        num_tasks=cfg.n_tasks,
        batch_size=cfg.eval_batch_size,
        steps=steps,
        batching=batching if batching != "auto" else "loop",
    )


def _test_results(cfg: DictConfig, run_dir: Path) -> dict:
    cfg = config.validate(cfg, config.TestConfig)
    if cfg.n_tasks < 1 or cfg.eval_batch_size < 1:
        raise MamlrunError("n_tasks and eval_batch_size must be positive")
    parts, saved, _ = _restore(cfg)
    steps = parts.algorithm.inner_steps_test if cfg.inner_steps is None else cfg.inner_steps
    if steps < 0:
        raise MamlrunError(f"inner_steps must be >= 0, got {steps}")
    metric_name, _ = METRIC[parts.source.kind]
    curves = _curves(parts, saved, cfg, steps)
    mean, ci = mean_ci95(curves["metric"][:, -1])
    results = {
        "metric": metric_name,
        "n_tasks": cfg.n_tasks,
        "inner_steps": steps,
        "mean": mean,
        "ci95": ci,
        "bn_mode": parts.algorithm.bn_mode,
        "checkpoint": str(cfg.checkpoint),
        "dataset": parts.source.describe(),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "results.json", results)
    tb = TensorBoardLogger(run_dir / "tb")
    tb.log_dict({f"test/{metric_name}": mean, f"test/{metric_name}_ci95": ci}, steps)
    tb.close()
    print(
        f"test {metric_name} after {steps} inner steps: {mean:.4g} ± {ci:.2g} "
        f"(95% CI, {cfg.n_tasks} tasks)"
    )
    return results


def _adapt_results(cfg: DictConfig, run_dir: Path) -> dict:
    cfg = config.validate(cfg, config.AdaptConfig)
    if cfg.n_tasks < 1 or cfg.eval_batch_size < 1:
        raise MamlrunError("n_tasks and eval_batch_size must be positive")
    parts, saved, components = _restore(cfg)
    steps = parts.algorithm.inner_steps_test if cfg.inner_steps is None else cfg.inner_steps
    if steps < 0:
        raise MamlrunError(f"inner_steps must be >= 0, got {steps}")
    metric_name, _ = METRIC[parts.source.kind]

    def summarise(curves: dict) -> dict:
        pairs = [mean_ci95(curves["metric"][:, s]) for s in range(steps + 1)]
        return {
            "steps": list(range(steps + 1)),
            "mean": [m for m, _ in pairs],
            "ci95": [c for _, c in pairs],
        }

    results = {
        "metric": metric_name,
        "n_tasks": cfg.n_tasks,
        **summarise(_curves(parts, saved, cfg, steps)),
        "baseline": None,
    }
    if cfg.baseline.enabled and parts.source.kind == "regression":
        parts = build(components, parts.source.device, seed=cfg.baseline.seed)
        pretrain_jointly(
            parts.model,
            parts.source,
            steps=cfg.baseline.steps,
            lr=cfg.baseline.lr,
            batch_size=cfg.baseline.batch_size,
            seed=cfg.baseline.seed,
        )
        results["baseline"] = summarise(_curves(parts, saved, cfg, steps))

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "results.json", results)
    tb = TensorBoardLogger(run_dir / "tb")
    for s in range(steps + 1):
        payload = {f"adapt/{metric_name}": results["mean"][s]}
        if results["baseline"]:
            payload[f"adapt/baseline_{metric_name}"] = results["baseline"]["mean"][s]
        tb.log_dict(payload, s)
    tb.close()
    print(f"{metric_name} after each inner step (mean ± 95% CI over {cfg.n_tasks} tasks):")
    for s in range(steps + 1):
        line = f"  step {s:3d}: {results['mean'][s]:.4g} ± {results['ci95'][s]:.2g}"
        if results["baseline"]:
            b = results["baseline"]
            line += f"   pretrained baseline: {b['mean'][s]:.4g} ± {b['ci95'][s]:.2g}"
        print(line)
    return results


def test(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Meta-test a checkpoint: metric after the test-time inner steps, mean ± 95% CI."""
    _single_process("test")
    return _test_results(cfg, run_dir_of(run_dir))["mean"]


def adapt(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Metric after each inner step 0…S, for the meta-learned model and the baseline."""
    _single_process("adapt")
    return _adapt_results(cfg, run_dir_of(run_dir))["mean"][-1]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
