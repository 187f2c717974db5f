"""``train(cfg)``, ``test(cfg)`` and ``adapt(cfg)``: what the three commands do, as plain
functions that the CLI and tests call with a composed config.

Each validates its config, writes ``results.json`` and TensorBoard events into the run
directory, and returns the metric a sweep would optimise. What only the CLI knows (the keys a
resume changes, a sweeper's direction) comes in a ``Launch``. Hydra is used for one thing:
``train``'s final test and adapt compose ``conf/test.yaml`` and ``conf/adapt.yaml``, so they
run with the settings of ``mamlrun test``/``adapt``, not a second copy of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mamlrun import config
from mamlrun.errors import MamlrunError
from mamlrun.results import reference, report
from mamlrun.results.files import write_json
from mamlrun.results.stats import format_ci
from mamlrun.training import distributed, threads
from mamlrun.training.components import resolve_device
from mamlrun.training.evaluation import adapt_checkpoint, restore, test_checkpoint
from mamlrun.training.signals import StopFlag, catch_signals
from mamlrun.training.trainer import Launch, Trainer, fit

log = logging.getLogger("mamlrun")

__all__ = ["Launch", "adapt", "pretrain", "test", "train"]
_DEFAULT_LAUNCH = Launch()


def default_run_dir(command: str) -> Path:
    """Where a run goes when nobody says: ``outputs/<command>/<date>/<time>``, as the CLI."""
    return Path("outputs", command, time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S"))


def train(
    cfg: DictConfig, run_dir: str | Path | None = None, launch: Launch = _DEFAULT_LAUNCH
) -> float | None:
    """Meta-train; validate every ``val_every`` steps and keep the best checkpoint.

    Returns the best validation metric (accuracy or MSE), which a Hydra sweep can optimise.
    Under ``torchrun`` the meta-batch is split across the processes (``distributed``); only
    rank 0 validates, logs and checkpoints, and the other ranks return None.
    """
    cfg = config.validate(cfg, config.TrainConfig)
    world_size = distributed.world_size_from_env()
    if cfg.meta_batch_size < world_size:
        raise MamlrunError(
            f"meta_batch_size={cfg.meta_batch_size} cannot be split across {world_size} "
            "processes: give each at least one task"
        )
    with (
        threads.kept(),  # Trainer.start sets them, once a resume has said which
        catch_signals() as flag,
        distributed.session(resolve_device(cfg.device)) as (ctx, device),
    ):
        directory = Path(ctx.on_main(lambda: str(_made(run_dir, "train"))))
        flag.doing = "start-up (nothing was saved yet)"
        with Trainer.start(cfg, directory, launch, ctx, device) as trainer:
            stopped_by = fit(trainer, flag)
            if not ctx.is_main:
                return None
            return _finish(trainer, stopped_by, flag)


def _finish(trainer: Trainer, stopped_by: str, flag: StopFlag) -> float | None:
    """results.json, the final test and adaptation on best.pt, the HParams row."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    flag.doing = f"the final evaluation (training is done; its checkpoints are in {run_dir})"
    results = trainer.results(stopped_by)
    if cfg.final_test or cfg.final_adapt:
        results |= _final_evaluation(cfg, trainer.best_path, run_dir)
    write_json(run_dir / "results.json", results)
    trainer.log_hparams(results)
    s = trainer.state
    if s.best is not None:
        log.info(
            f"best val {trainer.metric_name} {format_ci(s.best, s.best_ci95)} at step "
            f"{s.best_step}; results in {run_dir}"
        )
    if cfg.reference is not None and cfg.final_test:
        test = results.get("reference_test") or results["test"]
        _log_against_reference(cfg.reference, test, s.step, *_held_to(trainer))
    return s.best


def _reference_steps(cfg: DictConfig, test: dict[str, Any]) -> int | None:
    ref = cfg.reference
    if ref is None or ref.inner_steps == test["inner_steps"]:
        return None
    return ref.inner_steps


def _held_to(trainer: Trainer) -> tuple[int, list[str]]:
    """What a run's test is held to before it is compared with the paper, as ``mamlrun
    report`` holds it: its preset's iterations (a run's ``iterations=`` or ``debug=smoke``
    shortens the run, not the paper's budget), and the result-relevant settings it changed
    from the preset (``meta_optimizer=metacurvature`` on a MAML preset is not MAML's number).
    Without a preset: its own iterations, nothing changed."""
    cfg = trainer.cfg
    if trainer.preset is None:
        return cfg.iterations, []
    from hydra.core.hydra_config import HydraConfig

    searchpath = HydraConfig.get().searchpath if HydraConfig.initialized() else ()
    preset = report.preset_config(trainer.preset, tuple(str(p) for p in searchpath))
    if preset is None:
        return cfg.iterations, []
    return preset["iterations"], reference.differences(config.flatten(cfg), preset)


def _log_against_reference(
    ref: Any, test: dict[str, Any], trained: int, budget: int, changed: list[str]
) -> None:
    percent = ref.metric == "accuracy"
    ours = format_ci(test["mean"], test["ci95"], percent=percent)
    theirs = reference.shown(ref.value, ref.ci95, ref.metric)
    if changed:
        short = reference.short_of_budget(trained, budget) or "not comparable"
        verdict = f"{short}: " + "; ".join(changed)
    else:
        verdict = reference.verdict(
            test["mean"], test["ci95"], ref.value, ref.ci95, trained, budget
        )
    log.info(
        f"test {test['metric']} after {test['inner_steps']} inner steps {ours} against "
        f"{theirs} in {ref.source}: {verdict}"
    )


def _final_evaluation(cfg: DictConfig, best: Path, run_dir: Path) -> dict[str, Any]:
    """The final test (and its second run with the paper's inner steps) and adaptation on
    ``best.pt``, which is read back and its data built once for all of them."""
    test_settings = final_settings("test", cfg, best)
    restored = restore(test_settings)
    out: dict[str, Any] = {}
    if cfg.final_test:
        out["test"] = test_checkpoint(test_settings, run_dir / "test", restored)
        steps = _reference_steps(cfg, out["test"])
        if steps is not None:  # the paper tested with other inner steps than the preset
            again = replace(test_settings, inner_steps=steps)
            out["reference_test"] = test_checkpoint(again, run_dir / f"test_{steps}steps", restored)
    if cfg.final_adapt:
        adapt_settings = final_settings("adapt", cfg, best)
        out["adapt"] = adapt_checkpoint(adapt_settings, run_dir / "adapt", restored)
    return out


#: Settings of ``test``/``adapt`` that a training run does not pass on to its final test:
#: the test measures the model in its own arithmetic (``conf/test.yaml``'s fp32), whatever
#: the run trained with, and on the run's own data (a ``dataset`` given to ``test`` makes it
#: a cross-domain test).
_NOT_FROM_RUN = ("precision", "dataset")


def final_settings(command: str, cfg: DictConfig, best: Path) -> Any:
    """``command``'s (``test`` or ``adapt``) settings for ``train``'s final evaluation:
    composed from its YAML as ``mamlrun test`` would be, with ``best`` as the checkpoint, the
    data the run read (the checkpoint's own ``dataset.root``) and the run's values for the
    keys both commands have (``test_tasks``, ``test_seed``, ``device``, ...)."""
    composed = _composed(command)
    shared = [k for k in composed if k in cfg and k not in _NOT_FROM_RUN]
    from_run = {k: cfg[k] for k in shared}
    merged = OmegaConf.merge(composed, from_run, {"checkpoint": str(best), "data_root": None})
    schema = config.AdaptConfig if command == "adapt" else config.TestConfig
    return _settings(merged, schema)


def _composed(command: str) -> DictConfig:
    """``conf/<command>.yaml`` composed by Hydra, inside a Hydra job (``mamlrun train``) or
    outside one (a Python caller of ``train``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config.register_schemas()
    if GlobalHydra.instance().is_initialized():
        return compose(command)
    with initialize_config_dir(str(config.config_dir()), version_base="1.3"):
        return compose(command)


def test(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Meta-test a checkpoint: metric after the test-time inner steps, mean ± 95% CI."""
    settings = _eval_settings(cfg, config.TestConfig, "test")
    with threads.kept(), catch_signals() as flag:
        threads.use(settings.threads)
        flag.doing = "the test (nothing was written)"
        return test_checkpoint(settings, _made(run_dir, "test"))["mean"]


def adapt(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Metric after each inner step 0…S, for the meta-learned model and the baseline."""
    settings = _eval_settings(cfg, config.AdaptConfig, "adapt")
    with threads.kept(), catch_signals() as flag:
        threads.use(settings.threads)
        flag.doing = "adapt (nothing was written)"
        return adapt_checkpoint(settings, _made(run_dir, "adapt"))["mean"][-1]


def pretrain(
    cfg: DictConfig, run_dir: str | Path | None = None, changed: frozenset[str] | None = None
) -> float | None:
    """Classification over every training class (``training/pretrain.py``): best.pt by the
    validation tasks' nearest-centroid accuracy, last.pt, results.json. ``changed``: on resume,
    the keys the command changes (None: all of ``cfg`` is meant). Returns the best accuracy."""
    from mamlrun.training import pretrain as pre

    cfg = config.validate(cfg, config.PretrainConfig)
    if distributed.world_size_from_env() > 1:
        raise MamlrunError("mamlrun pretrain runs in one process: start it without torchrun")
    with threads.kept(), catch_signals() as flag:
        flag.doing = "start-up (nothing was saved yet)"
        directory = _made(run_dir, "pretrain")
        with pre.Pretraining.start(cfg, directory, changed, resolve_device(cfg.device)) as run:
            flag.doing = "pre-training"
            stopped_by = pre.fit(run, flag)
            write_json(directory / "results.json", run.results(stopped_by))
            s = run.state
            log.info(
                f"best val accuracy (nearest centroid) {format_ci(s.best, s.best_ci95)} at step "
                f"{s.best_step}; checkpoints in {directory / 'checkpoints'}"
            )
            return s.best


def _eval_settings(cfg: DictConfig, schema: type, command: str) -> Any:
    if distributed.world_size_from_env() > 1:
        raise MamlrunError(f"mamlrun {command} runs in one process: start it without torchrun")
    return _settings(cfg, schema)


def _settings(cfg: DictConfig, schema: type) -> Any:
    """``cfg`` validated against ``schema`` (types, components, ranges), as its dataclass."""
    return OmegaConf.to_object(config.validate(cfg, schema))


def _made(run_dir: str | Path | None, command: str) -> Path:
    path = Path(run_dir) if run_dir is not None else default_run_dir(command)
    path.mkdir(parents=True, exist_ok=True)
    return path
