"""The YAML in ``conf/`` is the one place a default is written.

A component's ``_target_`` (a dataset factory, a backbone builder, an algorithm) carries the
types of its settings and no values: a Python default beside the YAML's would be a second
place to change, and the two drift (``--help`` and ``--cfg job`` show the YAML, a Python
caller would get the other). And every setting the target requires must be in its YAML,
unless mamlrun injects it (the device, the input shape).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra.utils
import pytest
from omegaconf import DictConfig, OmegaConf

from mamlrun import config

GROUPS = ("dataset", "backbone", "meta_optimizer")


def component_configs() -> list[tuple[str, str]]:
    root = config.config_dir()
    return [(g, p.stem) for g in GROUPS for p in sorted((root / g).glob("*.yaml"))]


def targets(group: str, node: DictConfig) -> list[tuple[str, DictConfig, set[str]]]:
    """``(path, node, injected)`` for every node whose target is mamlrun's own code: the
    component itself and, for ``meta_optimizer``, its optimizer and scheduler when they are."""
    found = []
    for part in config.OUTER_PARTS if group == "meta_optimizer" else ():
        sub = node.get(part)
        if isinstance(sub, DictConfig) and str(sub._target_).startswith("mamlrun."):
            found.append((f"{group}.{part}", sub, set()))
    found.append((group, node, config.INJECTED[group]))
    return found


def repeats_and_gaps(node: DictConfig, injected: set[str]) -> tuple[list[str], list[str]]:
    """The keys the YAML sets that also have a Python default, and the parameters the target
    requires that the YAML leaves out (and mamlrun does not inject)."""
    target = hydra.utils.get_object(node._target_)
    params = inspect.signature(target).parameters
    keys = {k for k in node if not str(k).startswith("_") and k not in config.OUTER_PARTS}
    repeats = [k for k in sorted(keys) if k in params and params[k].default is not params[k].empty]
    gaps = [
        name
        for name, p in params.items()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and name not in keys | injected | {"self"}
    ]
    return repeats, gaps


@pytest.mark.parametrize("group,choice", component_configs())
def test_a_component_yaml_and_its_target_share_no_default(group, choice):
    for path, node, injected in targets(group, config.group_config(group, choice)):
        repeats, gaps = repeats_and_gaps(node, injected)
        assert not repeats, (
            f"conf/{group}/{choice}.yaml sets {repeats}, which {node._target_} also defaults "
            "in Python: keep the value in the YAML only"
        )
        assert not gaps, f"conf/{group}/{choice}.yaml misses {gaps}, required by {path}"


def test_every_component_group_is_covered():
    covered = {g for g, _ in component_configs()}
    assert covered == set(GROUPS) == set(config.INJECTED)


def test_a_repeated_default_is_caught(tmp_path: Path, monkeypatch):
    """The check above can fail: a target with a default the YAML also sets is reported."""
    module = tmp_path / "repeated_default.py"
    module.write_text("def tasks(*, shots, query=15, device='cpu'):\n    return shots\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    node = OmegaConf.create({"_target_": "repeated_default.tasks", "shots": 1, "query": 15})
    assert repeats_and_gaps(node, {"device"}) == (["query"], [])
    node = OmegaConf.create({"_target_": "repeated_default.tasks", "query": 15})
    assert repeats_and_gaps(node, {"device"}) == (["query"], ["shots"])


def test_an_algorithm_built_from_python_without_settings_is_its_yamls():
    """The other direction: what a Python caller leaves out comes from the YAML the class names
    (``learner.configured``), not from a second set of values."""
    configured = {}
    for choice in (c for g, c in component_configs() if g == "meta_optimizer"):
        target = hydra.utils.get_object(config.group_config("meta_optimizer", choice)._target_)
        if getattr(target, "configured_by", None) == choice:
            configured[choice] = target
    assert {"maml", "reptile"} <= set(configured)
    for choice, target in configured.items():
        assert target() == config.algorithm(choice), choice
