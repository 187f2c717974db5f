"""Meta-testing a checkpoint: the test metric (``test_checkpoint``) and the adaptation curve
(``adapt_checkpoint``), each against its baseline (``baseline.py`` for regression, the transfer
baseline of ``transfer.py`` for classification).

Both take typed settings (``config.TestConfig``, ``config.AdaptConfig``, composed from
``conf/test.yaml`` and ``conf/adapt.yaml``), so ``train`` calls them for its final test
directly, and both rebuild dataset, backbone and algorithm from the checkpoint's own config:
a test cannot silently use settings the model was not trained with. ``restore`` does that
once; a caller with several evaluations of one checkpoint (``train``'s final test, its
second test with the paper's inner steps, adapt) hands the ``Restored`` to each.
The precision is the exception: it is how the numbers are computed, not what was learned, so
a test runs in its own ``precision`` (fp32 unless told) and records the one the run trained
with beside it (``trained_precision``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.algorithms.losses import METRIC
from mamlrun.data.download import resolve_root
from mamlrun.data.reshaped import Reshaped
from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint, figures
from mamlrun.results.files import write_json
from mamlrun.results.stats import format_ci, mean_ci95
from mamlrun.results.tensorboard import TensorBoardLogger
from mamlrun.training import provenance, transfer
from mamlrun.training.baseline import pretrain_jointly
from mamlrun.training.components import Components, build, fresh_model, resolve_device
from mamlrun.training.episodes import Evaluation, evaluate
from mamlrun.training.progress import Progress

log = logging.getLogger("mamlrun")


@dataclass
class Restored:
    """A checkpoint read back once: its components rebuilt, weights loaded, the algorithm
    bound to its task type and batching."""

    built: Components
    saved: dict[str, Any]
    components: Any  # the checkpoint's component config, to rebuild the baseline from
    path: Path
    data: dict[str, Any]  # the root read and how its data differs from the run's (results.json)

    @property
    def metric_name(self) -> str:
        return METRIC[self.built.source.task_type][0]

    @property
    def trained_precision(self) -> str:
        """The precision the run was trained in (checkpoints from before it existed: fp32)."""
        return self.saved["config"].get("run", {}).get("precision", "fp32")


def batching_of(saved: dict[str, Any]) -> str:
    """The task batching a checkpoint's run chose (``loop`` for checkpoints from before)."""
    mode = saved.get("task_batching", "loop")
    return mode if mode != "auto" else "loop"


def task_type_of(saved: dict[str, Any], built: Components) -> str:
    """The checkpoint's task type (``kind`` in checkpoints from before the rename), else the
    rebuilt dataset's."""
    return saved.get("task_type", saved.get("kind", built.source.task_type))


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory, meaning its ``checkpoints/best.pt``."""
    path = Path(path)
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        if not best.is_file():
            raise MamlrunError(_without_best(path))
        log.info(f"checkpoint={path} is a run directory: using {best}")
        return best
    return path


def _without_best(path: Path) -> str:
    """Why a directory names no checkpoint, and what to give instead: its ``last.pt`` (a run
    stopped before its first validation has no ``best.pt`` yet), or a run below it."""
    last = path / "checkpoints" / "last.pt"
    if last.is_file():
        return (
            f"checkpoint={path} is a run directory without checkpoints/best.pt (it stopped "
            f"before its first validation); its checkpoints/last.pt is there: "
            f"mamlrun test checkpoint={last}"
        )
    if (path / ".hydra").is_dir():
        return (
            f"checkpoint={path} is a run directory without checkpoints/best.pt or "
            "checkpoints/last.pt: it stopped before it saved any, so there is nothing to test"
        )
    below = sorted(path.glob("**/checkpoints/*.pt"), key=lambda p: p.stat().st_mtime)
    hint = f"; the newest run below it: checkpoint={below[-1].parent.parent}" if below else ""
    return (
        f"checkpoint={path} is not a run directory (no checkpoints/best.pt or "
        f"checkpoints/last.pt in it): give a run's directory or a .pt file{hint}"
    )


def restore(settings: config.TestConfig) -> Restored:
    path = checkpoint_path(settings.checkpoint)
    device = resolve_device(settings.device)
    saved = checkpoint.load(path, map_location="cpu")
    try:
        components = OmegaConf.create(saved["config"]["components"])
    except (KeyError, TypeError):
        raise MamlrunError(f"{path} holds no mamlrun config") from None
    if settings.dataset is not None:
        built, data = _across_domains(settings, saved, components, device)
    else:
        built, data = _on_its_own_data(settings, saved, components, device)
    try:
        built.model.load_state_dict(saved["model"])
    except RuntimeError as ex:
        raise MamlrunError(
            f"{path}: weights do not fit the backbone: {str(ex).splitlines()[0]}"
        ) from None
    bound = built.algorithm.bind(task_type_of(saved, built), batching_of(saved))
    return Restored(replace(built, algorithm=bound), saved, components, path, data)


def _on_its_own_data(settings: config.TestConfig, saved: dict, components: Any,
                     device: torch.device) -> tuple[Components, dict[str, Any]]:  # fmt: skip
    """The run's components on the data it read (``provenance``), checked to be that data."""
    root = provenance.choose_root(saved, components.dataset, settings.data_root)
    if root.root is not None:
        components.dataset.root = root.root
        log.info(f"data from {root.root} ({root.reason})")
    components = config.validate(components, config.ComponentsOnly)
    built = build(components, device, seed=0, precision_name=settings.precision)
    differences = provenance.compare(saved, built.source, root.root, settings.cross_domain)
    name = config.choice("dataset", components.dataset).removeprefix("dataset=")
    data = {"data_root": root.root, "data_differences": differences,
            "cross_domain": bool(differences), "trained_on": name, "tested_on": name}  # fmt: skip
    return built, data


def _across_domains(settings: config.TestConfig, saved: dict, components: Any,
                    device: torch.device) -> tuple[Components, dict[str, Any]]:  # fmt: skip
    """The run's model on ``settings.dataset``'s tasks: the run's N-way K-shot, the images
    brought to the model's input shape (``data.reshaped``)."""
    shape = (saved.get("data") or {}).get("input_shape")
    if shape is None:
        raise MamlrunError(
            "this checkpoint was written before cross-domain tests (it records no input "
            "shape); test it on its own dataset, or retrain with this mamlrun"
        )
    node = OmegaConf.create(settings.dataset)
    for key in ("ways", "shots"):  # the model's head and what it was meta-trained for
        if key in node and key in components.dataset:
            node[key] = components.dataset[key]
    if settings.data_root is not None and node.get("root") is None and "root" in node:
        node.root = settings.data_root
    config.validate_component("dataset", node)
    source = config.instantiate(node, device=device)
    task_type = saved.get("task_type", saved.get("kind"))
    if source.task_type != task_type:
        raise MamlrunError(f"the model does {task_type}; that dataset's tasks are "
                           f"{source.task_type}")  # fmt: skip
    source = Reshaped(source, tuple(shape))
    components = config.validate(components, config.ComponentsOnly)
    built = build(components, device, seed=0, precision_name=settings.precision, source=source)
    trained = config.choice("dataset", components.dataset).removeprefix("dataset=")
    tested = config.choice("dataset", node).removeprefix("dataset=")
    log.info(f"cross-domain test: trained on {trained}, tested on {tested} at {list(shape)}")
    root = str(resolve_root(node.root)) if "root" in node else None
    data = {"data_root": root, "data_differences": [], "cross_domain": True,
            "trained_on": trained, "tested_on": tested}  # fmt: skip
    return built, data


def _steps(settings: config.TestConfig, restored: Restored) -> int:
    steps = settings.inner_steps
    return restored.built.algorithm.inner_steps_test if steps is None else steps


def test_evaluation(settings: config.TestConfig, steps: int) -> Evaluation:
    """The evaluation ``test`` and ``adapt`` run: ``test_tasks`` test tasks fixed by
    ``test_seed``, scored after 0…``steps`` inner steps."""
    return Evaluation(
        "test", settings.test_seed, settings.test_tasks, settings.eval_batch_size, steps
    )


def _curves(restored: Restored, settings: config.TestConfig, steps: int, what: str) -> dict:
    built = restored.built
    with Progress(
        what, settings.test_tasks, unit="tasks", every_s=settings.progress_seconds
    ) as bar:
        return evaluate(
            built.algorithm, built.model, built.source, test_evaluation(settings, steps), bar.update
        )


def test_checkpoint(
    settings: config.TestConfig, out_dir: Path, restored: Restored | None = None
) -> dict[str, Any]:
    """The metric after the test-time inner steps on ``test_tasks`` tasks fixed by
    ``test_seed``: mean ± 95% CI, written to ``out_dir/results.json`` and TensorBoard, with
    the transfer baseline's on the same tasks (classification, ``baseline.checkpoint``).
    ``restored``: the checkpoint already read back (``restore(settings)``)."""
    restored = restored or restore(settings)
    pretrained = _transfer(settings, restored)  # refused before anything is computed
    steps = _steps(settings, restored)
    name = restored.metric_name
    curves = _curves(restored, settings, steps, "test")
    mean, ci = mean_ci95(curves["metric"][:, -1])
    results = {
        "metric": name,
        "test_tasks": settings.test_tasks,
        "test_seed": settings.test_seed,
        "inner_steps": steps,
        "mean": mean,
        "ci95": ci,
        "precision": settings.precision,
        "trained_precision": restored.trained_precision,
        "threads": torch.get_num_threads(),
        **restored.built.algorithm.describe(),
        "checkpoint": str(restored.path),
        "trained_steps": restored.saved.get("progress", {}).get("step"),
        "dataset": restored.built.source.describe(),
        **restored.data,
        "baseline": None,
    }
    if pretrained is not None:
        results["baseline"] = _transfer_test(restored, settings, pretrained)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    with TensorBoardLogger(out_dir / "tb") as tb:
        payload = {f"test/{name}": mean, f"test/{name}_ci95": ci}
        if results["baseline"]:
            base = results["baseline"]
            payload |= {f"test/baseline_{name}": base["mean"],
                        f"test/baseline_{name}_ci95": base["ci95"]}  # fmt: skip
        tb.log_dict(payload, steps)
    log.info(
        f"test {name} after {steps} inner steps: {format_ci(mean, ci)} "
        f"(95% CI, {settings.test_tasks} tasks); results in {out_dir}"
    )
    if results["baseline"]:
        base = results["baseline"]
        shown = format_ci(base["mean"], base["ci95"])
        log.info(f"{_transfer_label(base)}: {name} on the same tasks {shown}")
    return results


def adapt_checkpoint(
    settings: config.AdaptConfig, out_dir: Path, restored: Restored | None = None
) -> dict[str, Any]:
    """The metric after each inner step 0…S, for the meta-learned model and the baseline:
    the paper's pretrained one fine-tuned with the same steps (regression), Chen et al.'s
    transfer baseline after the epochs mapped to them (classification, ``training.transfer``)."""
    restored = restored or restore(settings)
    pretrained = _transfer(settings, restored)  # refused before anything is computed
    steps = _steps(settings, restored)
    name = restored.metric_name
    results = {
        "metric": name,
        "test_tasks": settings.test_tasks,
        "test_seed": settings.test_seed,
        "precision": settings.precision,
        "trained_precision": restored.trained_precision,
        "threads": torch.get_num_threads(),
        **_per_step(_curves(restored, settings, steps, "adapt")),
        **restored.data,
        "baseline": None,
    }
    if pretrained is not None:
        results["baseline"] = _transfer_adapt(restored, settings, steps, pretrained)
    elif settings.baseline.enabled and restored.built.source.task_type == "regression":
        baseline = _pretrained_baseline(restored, settings)
        results["baseline"] = _per_step(_curves(baseline, settings, steps, "adapt baseline"))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    with TensorBoardLogger(out_dir / "tb") as tb:
        for s in range(steps + 1):
            payload = {f"adapt/{name}": results["mean"][s]}
            if results["baseline"]:
                payload[f"adapt/baseline_{name}"] = results["baseline"]["mean"][s]
            tb.log_dict(payload, s)
    picture = figures.adaptation_curve(results, out_dir / "adapt.png")
    _log_curve(results, settings.test_tasks, out_dir, picture)
    return results


#: What adapt and test say on classification without ``baseline.checkpoint``.
NO_TRANSFER_BASELINE = (
    "no transfer baseline: baseline.checkpoint is not set; to compare with Chen et al.'s (a "
    "pretrained backbone, a new head fine-tuned on each support set) run `mamlrun pretrain "
    "{dataset}` and add baseline.checkpoint=outputs/pretrain/<date>/<time>/checkpoints/best.pt"
)
#: The same, for a run that started from a pretrain checkpoint: the baseline of that pretraining.
NO_TRANSFER_BASELINE_WARM = (
    "no transfer baseline: baseline.checkpoint is not set; this run started from {path} "
    "(backbone.init): add baseline.checkpoint={path} to compare with Chen et al.'s baseline of "
    "the same pretraining (a new head fine-tuned on each support set)"
)


def _transfer(settings: config.TestConfig, restored: Restored) -> transfer.Pretrained | None:
    """The transfer baseline's frozen features (classification with ``baseline.checkpoint``),
    checked against the tested data; otherwise None, saying so on classification."""
    b, source = settings.baseline, restored.built.source
    if not b.enabled or source.task_type != "classification":
        return None
    trained_on = restored.data["trained_on"]  # its training classes, as the model's
    if b.checkpoint is None:
        init = restored.saved.get("init") or {}
        if init.get("kind") == "pretrain":
            log.info(NO_TRANSFER_BASELINE_WARM.format(path=init["path"]))
        else:
            log.info(NO_TRANSFER_BASELINE.format(dataset=f"dataset={trained_on}"))
        return None
    return transfer.prepare(b, tuple(source.input_shape), trained_on, source.device)


def _transfer_curves(restored: Restored, settings: config.TestConfig, steps: int,
                     pretrained: transfer.Pretrained) -> tuple[dict, dict]:  # fmt: skip
    """The baseline on the evaluation's own tasks (same seed, same order), and what it is."""
    recipe = transfer.Recipe.of(settings.baseline)
    ways = restored.built.source.output_size
    baseline = transfer.TransferBaseline(recipe, ways, settings.baseline.seed)
    with Progress(
        recipe.method, settings.test_tasks, unit="tasks", every_s=settings.progress_seconds
    ) as bar:
        curves = evaluate(
            baseline,  # type: ignore[arg-type]  # an algorithm's evaluate, nothing else
            pretrained.features,
            restored.built.source,
            test_evaluation(settings, steps),
            bar.update,
        )
    return curves, transfer.describe(recipe, pretrained, baseline.support)


def _transfer_adapt(restored: Restored, settings: config.AdaptConfig, steps: int,
                    pretrained: transfer.Pretrained) -> dict[str, Any]:  # fmt: skip
    curves, described = _transfer_curves(restored, settings, steps, pretrained)
    epochs = transfer.report_epochs(settings.baseline.finetune_epochs, steps)
    return {**_per_step(curves), "epochs": epochs, **described}


def _transfer_test(restored: Restored, settings: config.TestConfig,
                   pretrained: transfer.Pretrained) -> dict[str, Any]:  # fmt: skip
    curves, described = _transfer_curves(restored, settings, 0, pretrained)
    mean, ci = mean_ci95(curves["metric"][:, -1])
    return {"mean": mean, "ci95": ci, "epochs": settings.baseline.finetune_epochs, **described}


def _transfer_label(base: dict[str, Any]) -> str:
    return (
        f"{base['method']} ({base['head']} head fine-tuned {base['recipe']['epochs']} epochs "
        f"on each support set, frozen features of {base['checkpoint']})"
    )


def _pretrained_baseline(restored: Restored, settings: config.AdaptConfig) -> Restored:
    b = settings.baseline
    built = replace(restored.built, model=fresh_model(restored.components, restored.built, b.seed))
    with Progress("baseline", b.steps, every_s=settings.progress_seconds) as bar:
        pretrain_jointly(
            built.model,
            built.source,
            steps=b.steps,
            lr=b.lr,
            batch_size=b.batch_size,
            seed=b.seed,
            on_step=bar.update,
        )
    return replace(restored, built=built)


def _per_step(curves: dict[str, torch.Tensor]) -> dict[str, list]:
    pairs = [mean_ci95(curves["metric"][:, s]) for s in range(curves["metric"].shape[1])]
    return {
        "steps": list(range(len(pairs))),
        "mean": [m for m, _ in pairs],
        "ci95": [c for _, c in pairs],
    }


def _log_curve(results: dict[str, Any], tasks: int, out_dir: Path, picture: Path | None) -> None:
    log.info(f"{results['metric']} after each inner step (mean ± 95% CI over {tasks} tasks):")
    base = results["baseline"]
    if base and "epochs" in base:
        log.info(f"  beside it: {_transfer_label(base)}, after the epochs shown")
    for s in results["steps"]:
        line = f"  step {s:3d}: {format_ci(results['mean'][s], results['ci95'][s])}"
        if base and "epochs" in base:
            line += f"   {base['method']} after {base['epochs'][s]:3d} epochs: "
            line += format_ci(base["mean"][s], base["ci95"][s])
        elif base:
            line += f"   pretrained baseline: {format_ci(base['mean'][s], base['ci95'][s])}"
        log.info(line)
    log.info(f"results in {out_dir}" + (f" (the curves: {picture.name})" if picture else ""))
