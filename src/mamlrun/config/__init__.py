"""Config schemas, validation and the one ``instantiate`` helper.

The top-level keys of each command are dataclass schemas in Hydra's ConfigStore, so a wrong
type or an unknown key in an override fails at composition. The components (``dataset``,
``backbone``, ``meta_optimizer``) are validated against the signature of the ``_target_``
they name: the callable is the schema, so a new component needs no second definition that
could drift from its code. The values are the YAML's alone (conf/), and the ranges of every
setting are checked in one place (``ranges``); ``validate`` runs all three checks, once per
command, before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import hydra.utils
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from mamlrun.config import ranges
from mamlrun.errors import MamlrunError

#: Parts of ``meta_optimizer`` that configure the outer loop, not the algorithm.
OUTER_PARTS = ("optimizer", "scheduler")

#: Arguments the runner passes itself; a config that sets them would be silently overridden.
INJECTED = {
    "dataset": {"device"},
    "backbone": {"in_shape", "out_features"},
    "meta_optimizer": set(),
}


# The schemas give types; the values live in the YAML files (conf/), the one place a default is
# written, with a comment saying why.
@dataclass
class BaselineConfig:
    """The baseline ``adapt`` and ``test`` show beside the meta-learned model: the MAML paper's
    network trained on all tasks (regression), Chen et al.'s pretrained backbone with a new
    head fine-tuned on each support set (classification, ``training/transfer.py``)."""

    enabled: bool = MISSING
    steps: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    checkpoint: str | None = MISSING  # None: no transfer baseline (classification)
    head: str = MISSING  # one of ranges.BASELINE_HEADS
    finetune_epochs: int = MISSING
    finetune_batch_size: int = MISSING
    finetune_lr: float = MISSING
    finetune_momentum: float = MISSING
    finetune_dampening: float = MISSING
    finetune_weight_decay: float = MISSING
    cosine_scale: float = MISSING


@dataclass
class BackboneStart:
    """Where the run's backbone starts: settings of ``backbone`` that mamlrun applies to the
    network its factory built, so the factory's signature (the schema of the rest of the node)
    does not take them. Set in ``conf/train.yaml`` under ``backbone:``, so every backbone has
    them, a user's own too."""

    init: str | None = MISSING  # a file of weights (training/warm_start.py); None: the factory's


@dataclass
class BatchingBudget:
    """How much memory ``task_batching=auto`` may spend for speed: a setting of
    ``meta_optimizer`` (``conf/meta_optimizer/base/learner.yaml``, beside ``task_batching``)
    that the runner applies when it picks the mode, so no algorithm's signature takes it. Its
    forms are ``ranges.parse_max_memory``'s; ``training/auto_batching.py`` applies it."""

    max_memory: str | None = MISSING  # Nx_loop | a size (2GiB) | auto | None: no bound


#: Keys of a component's node that mamlrun applies itself rather than its ``_target_``, with
#: their schema: split off before the target's signature checks the node and before it is built.
OWN_SETTINGS: dict[str, type] = {"backbone": BackboneStart, "meta_optimizer": BatchingBudget}


def own_settings(group: str, node: Any, complete: bool = True) -> Any:
    """``group``'s own settings (``OWN_SETTINGS``) in ``node``, typed by their schema; with
    ``complete=False`` only the types of those present are checked (a test rebuilding a
    checkpoint's backbone needs none of them)."""
    schema = OWN_SETTINGS[group]
    present = {f.name: node[f.name] for f in dataclasses.fields(schema) if f.name in node}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), present)
        return OmegaConf.to_object(merged) if complete else None
    except Exception as ex:  # omegaconf's ValidationError, MissingMandatoryValue
        key = getattr(ex, "full_key", None) or ""
        raise MamlrunError(f"{group}.{key}: {_first_line(ex)}") from None


def _less_own(node: Any) -> Any:
    """``node`` without the keys of ``OWN_SETTINGS`` its target does not take (a node of any
    group: only a backbone's pass validation with them, so only a backbone loses them)."""
    own = {f.name for schema in OWN_SETTINGS.values() for f in dataclasses.fields(schema)}
    if not isinstance(node, DictConfig) or not own & set(node.keys()) or "_target_" not in node:
        return node
    taken, _ = _signature(_locate(node._target_, "_target_"))
    return OmegaConf.masked_copy(node, [k for k in node if k not in own or k in taken])


@dataclass
class Reference:
    """The published result a preset targets, as data the report compares a run against.

    ``value`` and ``ci95`` are in the metric's own units (accuracy as a fraction, 0.987 for
    the paper's 98.7%); ``inner_steps`` is how many inner steps the paper's test used, which
    may differ from the preset's ``inner_steps_test``. ``ci95`` is null where the source
    prints the mean alone (the report then compares against that point).
    """

    metric: str = MISSING
    value: float = MISSING
    ci95: float | None = MISSING
    inner_steps: int = MISSING
    source: str = MISSING


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    backbone: Any = MISSING
    meta_optimizer: Any = MISSING
    seed: int = MISSING
    device: str = MISSING
    precision: str = MISSING  # one of precision.PRECISIONS, checked by ``ranges``
    threads: int | None = MISSING  # None: torch's default
    iterations: int = MISSING
    meta_batch_size: int = MISSING
    log_every: int = MISSING
    progress_seconds: float = MISSING
    val_every: int = MISSING
    val_tasks: int = MISSING
    val_seed: int = MISSING
    eval_batch_size: int = MISSING
    checkpoint_every: int = MISSING
    resume: bool = MISSING
    max_minutes: float | None = MISSING
    final_test: bool = MISSING
    final_adapt: bool = MISSING
    test_tasks: int = MISSING
    test_seed: int = MISSING
    baseline: BaselineConfig = MISSING
    reference: Reference | None = MISSING


@dataclass
class TestConfig:
    checkpoint: str = MISSING
    test_tasks: int = MISSING
    inner_steps: int | None = MISSING  # None: the checkpoint's meta_optimizer.inner_steps_test
    test_seed: int = MISSING
    device: str = MISSING
    precision: str = MISSING  # of the test's forward passes; the checkpoint's is recorded
    threads: int | None = MISSING  # None: torch's default
    eval_batch_size: int = MISSING
    data_root: str | None = MISSING  # None: the root the run read (training.provenance)
    cross_domain: bool = MISSING  # test on data other than the run's (else refused)
    dataset: Any = None  # dataset=NAME: a cross-domain test on that dataset's test classes
    progress_seconds: float = MISSING
    baseline: BaselineConfig = MISSING


@dataclass
class AdaptConfig(TestConfig):
    """``adapt`` takes ``test``'s settings; its inner steps are a curve, not one point."""


@dataclass
class PretrainConfig:
    """``mamlrun pretrain``: supervised classification over every training class
    (``training/pretrain.py``); the values and what they mean are in conf/pretrain.yaml."""

    dataset: Any = MISSING
    backbone: Any = MISSING
    seed: int = MISSING
    device: str = MISSING
    threads: int | None = MISSING
    epochs: int | None = MISSING  # None: ``iterations`` says how long
    iterations: int | None = MISSING  # None: ``epochs`` says how long
    batch_size: int = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    nesterov: bool = MISSING
    weight_decay: float = MISSING
    schedule: str = MISSING  # one of ranges.PRETRAIN_SCHEDULES
    milestones: list[int] = MISSING  # epochs at which ``step`` multiplies the rate by gamma
    gamma: float = MISSING
    log_every: int = MISSING
    progress_seconds: float = MISSING
    val_every: int = MISSING
    val_tasks: int = MISSING
    val_seed: int = MISSING
    checkpoint_every: int = MISSING
    resume: bool = MISSING
    max_minutes: float | None = MISSING


@dataclass
class ComponentsOnly:
    """What ``test`` and ``adapt`` rebuild from a checkpoint."""

    dataset: Any = None
    backbone: Any = None
    meta_optimizer: Any = None


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="test_schema", node=TestConfig)
    cs.store(name="adapt_schema", node=AdaptConfig)
    cs.store(name="pretrain_schema", node=PretrainConfig)


def config_dir() -> Path:
    """The shipped ``conf/``: inside the installed package, or the checkout's top level."""
    packaged = Path(str(resources.files("mamlrun"))) / "conf"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[3] / "conf"
    if checkout.is_dir():
        return checkout
    raise MamlrunError(f"mamlrun's config directory is missing (looked in {packaged})")


def validate(cfg: DictConfig, schema: type) -> DictConfig:
    """The one check of a command's config, run before anything is built: types (the schema),
    each component's keys and types (its target's signature), then every range (``ranges``).

    Returns the config merged onto its schema; raises MamlrunError naming the first offending
    key, in one line. ``train``, ``test`` and ``adapt`` call it first; the CLI gets the type
    checks earlier too, through the ConfigStore schema.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except Exception as ex:  # omegaconf's ValidationError, ConfigKeyError, ...
        key = getattr(ex, "full_key", None)
        raise MamlrunError(f"{key}: {_first_line(ex)}" if key else _first_line(ex)) from ex
    for group in INJECTED:
        if merged.get(group) is not None:  # test's dataset is there only when chosen
            validate_component(group, merged[group])
    if issubclass(schema, (TrainConfig, TestConfig)):
        ranges.check_command(merged, "train" if schema is TrainConfig else "test")
    if schema is PretrainConfig:
        ranges.check_command(merged, "pretrain")
        ranges.check_pretrain(merged)
    return merged


def validate_component(group: str, node: Any) -> None:
    """One component's node (``dataset``, ``backbone`` or ``meta_optimizer``): its keys and
    types against its target's signature, then the ranges of its settings."""
    if group == "meta_optimizer" and isinstance(node, DictConfig):
        for part in OUTER_PARTS:
            if node.get(part) is not None:
                check_component(node[part], f"meta_optimizer.{part}")
        node = OmegaConf.masked_copy(node, [k for k in node if k not in OUTER_PARTS])
    whole = node  # the ranges see the group's own settings too (``OWN_SETTINGS``)
    if group in OWN_SETTINGS and isinstance(node, DictConfig):
        own_settings(group, node, complete=False)
        node = _less_own(node)
    check_component(node, group, injected=INJECTED[group])
    if group in ranges.COMPONENTS:
        ranges.COMPONENTS[group](whole)


def check_component(node: Any, path: str, injected: set[str] = frozenset()) -> None:
    """Check a ``_target_`` node's keys and value types against the target's signature."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise MamlrunError(f"{path} must be a config with a _target_ (pick one from {path}/)")
    target = _locate(node._target_, path)
    params, hints = _signature(target)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in node:
        if key.startswith("_"):
            continue
        if key in injected:
            raise MamlrunError(f"{path}.{key} is set by mamlrun itself; remove it from the config")
        if key not in params:
            if accepts_any:
                continue
            valid = ", ".join(k for k in params if k not in injected and k != "self")
            raise MamlrunError(f"unknown key {path}.{key} (valid keys: {valid})")
        value = node._get_node(key)
        if isinstance(value, DictConfig) and "_target_" in value:
            check_component(value, f"{path}.{key}")
            continue
        expected = hints.get(key)
        py_value = OmegaConf.to_container(value) if isinstance(value, ListConfig) else node[key]
        if expected is not None and not _matches(py_value, expected):
            raise MamlrunError(
                f"{path}.{key}={py_value!r} has the wrong type: expected {_type_name(expected)}"
            )
    for name, p in params.items():
        is_required = p.default is p.empty and p.kind in (
            p.POSITIONAL_OR_KEYWORD,
            p.KEYWORD_ONLY,
        )
        if is_required and name not in node and name not in injected and name != "self":
            if not node.get("_partial_", False):
                raise MamlrunError(f"missing key {path}.{name} (required by {node._target_})")


#: Keys a component config may carry for mamlrun's sake, not passed to its target.
METADATA = ("_preset_",)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """The one place configs become objects, so that errors read the same everywhere.

    Hydra wraps whatever a constructor raises in an InstantiationException whose first line
    only names the target; the constructor's own exception is what the user needs. A
    MamlrunError (the user can fix it: e.g. a backbone that cannot take the data's shape) is
    raised as it is; any other exception is a bug in a component and is raised as itself, so
    that its traceback stays visible. Only Hydra's own complaints become one line here.
    """
    if isinstance(node, DictConfig) and any(k in node for k in METADATA):
        node = OmegaConf.masked_copy(node, [k for k in node if k not in METADATA])
    node = _less_own(node)  # what mamlrun applies to the built object (``OWN_SETTINGS``)
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as ex:
        user_error = ex.__cause__
        while user_error is not None and not isinstance(user_error, MamlrunError):
            user_error = user_error.__cause__
        if user_error is not None:
            raise user_error from None
        if ex.__cause__ is not None:
            raise ex.__cause__ from None
        raise MamlrunError(_first_line(ex)) from ex


def choice(group: str, node: Any) -> str:
    """``group=name`` for the one ``conf/<group>/name.yaml`` that builds ``node``'s target, else
    ``group._target_=...``: a component named in a message as the user picked it."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    names = [
        path.stem
        for path in sorted((config_dir() / group).glob("*.yaml"))
        if OmegaConf.load(path).get("_target_") == target
    ]
    return f"{group}={names[0]}" if len(names) == 1 else f"{group}._target_={target}"


def build_meta_optimizer(node: DictConfig) -> tuple[Any, Callable[..., Any]]:
    """Split ``meta_optimizer`` into the algorithm and a factory for its outer optimizer.

    The algorithm owns no optimizer: it only computes meta-gradients, which keeps it a set of
    pure functions that tests can call on their own.
    """
    algorithm_node = OmegaConf.masked_copy(node, [k for k in node if k not in OUTER_PARTS])
    algorithm = instantiate(algorithm_node)
    if "optimizer" not in node:
        raise MamlrunError("missing key meta_optimizer.optimizer (e.g. torch.optim.Adam)")
    return algorithm, instantiate(node.optimizer)


def group_config(group: str, choice: str) -> DictConfig:
    """One choice of a config group as ``train`` composes it (its own defaults followed)."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[f"{group}={choice}"])[group]


def settings(group: str, choice: str, **changes: Any) -> dict[str, Any]:
    """The values ``conf/<group>/<choice>.yaml`` passes its ``_target_``, with ``changes``.

    How tests and scripts build a component from Python (``conv4(shape, ways,
    **config.settings("backbone", "conv4", filters=8))``): the signatures carry no defaults,
    so the numbers are read from the one place they are written instead of being repeated.
    """
    return {**copy.deepcopy(_yaml_values(group, choice)), **changes}


@functools.cache
def _yaml_values(group: str, choice: str) -> dict[str, Any]:
    node = _less_own(group_config(group, choice))
    keys = [k for k in node if not str(k).startswith("_") and k not in OUTER_PARTS]
    return OmegaConf.to_container(OmegaConf.masked_copy(node, keys), resolve=True)


def algorithm(choice: str = "maml", **settings: Any) -> Any:
    """An algorithm from ``conf/meta_optimizer/<choice>.yaml`` with ``settings`` changed: the
    YAML holds the values, so a Python caller gets the same defaults as the command line."""
    node = OmegaConf.merge(group_config("meta_optimizer", choice), settings)
    validate_component("meta_optimizer", node)
    return build_meta_optimizer(node)[0]


#: Keys mamlrun once wrote into every algorithm's config, each at the value that meant "off"
#: (Reptile's configs held MAML's flags and refused any other value, until each algorithm
#: declared only its own settings: issue 24). The one place an old config is read forward:
#: where its algorithm no longer declares such a key, the key is dropped at that value and
#: refused at any other (no run of that algorithm can have used it).
RETIRED = {
    "first_order": True,
    "learned_inner_lr": "none",
    "per_step_bn_weights": False,
    "checkpoint_inner": False,
}


#: Keys a newer mamlrun added to every config, each at the value that means what a config
#: without it did: a saved config is read with them (a run from before started from its
#: factory's weights), so the report and resume see no change where there was none.
ADDED = {("backbone", "init"): None}


def read_forward(run: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a run's or its components', as plain containers) that this mamlrun's
    algorithms take: the keys added since filled in (``ADDED``), ``meta_optimizer``'s retired
    keys dropped (``RETIRED``)."""
    if isinstance(run, dict):
        for (part, key), value in ADDED.items():
            if isinstance(run.get(part), dict) and key not in run[part]:
                run = {**run, part: {**run[part], key: value}}
    node = run.get("meta_optimizer") if isinstance(run, dict) else None
    if not isinstance(node, dict) or not any(key in node for key in RETIRED):
        return run
    try:
        params, _ = _signature(hydra.utils.get_object(node["_target_"]))
    except Exception:  # not importable here: whoever builds it says so, in one line
        return run
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return run
    kept = dict(node)
    for key, off in RETIRED.items():
        if key in kept and key not in params:
            if kept[key] != off:
                raise MamlrunError(
                    f"meta_optimizer.{key}={kept[key]} in this saved config, which "
                    f"{node['_target_']} has no setting for (only {off} can be read forward)"
                )
            del kept[key]
    return {**run, "meta_optimizer": kept}


def build_scheduler(node: DictConfig) -> Callable[..., Any] | None:
    """A factory ``optimizer -> scheduler`` for the outer learning rate, or None.

    ``meta_optimizer.scheduler`` is optional (e.g. MAML++'s cosine annealing); the runner steps
    it once per iteration and checkpoints its state.
    """
    if node.get("scheduler") is None:
        return None
    return instantiate(node.scheduler)


def _locate(name: str, path: str) -> Any:
    try:
        return hydra.utils.get_object(name)
    except Exception as ex:
        raise MamlrunError(f"{path}._target_={name!r} cannot be imported") from ex


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    fn = target.__init__ if inspect.isclass(target) else target
    params = dict(inspect.signature(target).parameters)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations (e.g. in third-party code): skip type checks
        hints = {}
    return params, hints


def _matches(value: Any, expected: Any) -> bool:
    """A deliberately small type check: the scalar and sequence types configs are made of."""
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin in (tuple, list) or expected in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        args = typing.get_args(expected)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(args) == len(value) and all(map(_matches, value, args))
        return all(_matches(v, args[0]) for v in value)
    if inspect.isclass(expected):
        return isinstance(value, expected)  # config values are never tensors or modules
    return True  # callables, type variables, ...: left to the target to check


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists are values)."""
    if isinstance(tree, DictConfig):
        tree = OmegaConf.to_container(tree, resolve=True)
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _first_line(ex: BaseException) -> str:
    lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip()]
    return lines[0] if lines else type(ex).__name__
