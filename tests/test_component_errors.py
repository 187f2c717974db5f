"""Components that cannot work together: every pair of the choices in ``conf/`` either builds
or reaches the user as one line that names both choices and keeps the component's own reason.

The pairs are enumerated from ``conf/dataset``, ``conf/backbone`` and ``conf/meta_optimizer``,
and which of them must fail is decided by a declared rule (``compatible``), so a new YAML file
is covered without touching this file: a pair the rule accepts must build, a pair it refuses
must fail with its own line.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from conftest import REPO
from torch import nn

from mamlrun import config
from mamlrun.errors import MamlrunError

CONF = REPO / "conf"

#: What the image datasets feed a backbone (their loaders check it against the files, in
#: each dataset's own tests); the datasets without files (no ``root``) are built instead.
IMAGE_INPUTS = {
    "omniglot": (1, 28, 28),
    "cifarfs": (3, 32, 32),
    "fc100": (3, 32, 32),
    "cub": (3, 84, 84),
    "miniimagenet": (3, 84, 84),
    "tieredimagenet": (3, 84, 84),
    "images": (3, 84, 84),  # a user's folder at the default image_size and channels
}


def choices(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@functools.cache
def inputs(dataset: str) -> tuple[tuple[int, ...], int, str]:
    """The dataset's input shape, number of outputs and task type, without any data."""
    settings = node("dataset", dataset)
    if "root" not in settings:  # generated tasks: built in a moment
        source = config.instantiate(settings, device="cpu")
        return tuple(source.input_shape), source.output_size, source.task_type
    assert dataset in IMAGE_INPUTS, f"declare dataset={dataset}'s input shape in IMAGE_INPUTS"
    return IMAGE_INPUTS[dataset], settings.ways, "classification"


def backbone(choice: str, shape: tuple[int, ...], outputs: int) -> nn.Module:
    return config.instantiate(node("backbone", choice), in_shape=shape, out_features=outputs)


@functools.cache
def node(group: str, choice: str):
    return config.group_config(group, choice)


@functools.cache
def built(choice: str, shape: tuple[int, ...], outputs: int) -> nn.Module:
    return backbone(choice, shape, outputs)


@functools.cache
def convolutional(choice: str) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in built(choice, (3, 32, 32), 5).modules())


def compatible(dataset: str, backbone_choice: str, meta_optimizer: str) -> bool:
    """The rule: a convolutional backbone needs images (C, H, W), any other backbone takes
    any input; every algorithm takes every backbone and task type."""
    shape, _, _ = inputs(dataset)
    return len(shape) == 3 or not convolutional(backbone_choice)


PAIRS = [
    (d, b, m)
    for d in choices("dataset")
    for b in choices("backbone")
    for m in choices("meta_optimizer")
]


def test_the_pairs_come_from_conf():
    assert {"sinusoid", "omniglot"} <= {d for d, _, _ in PAIRS}
    assert {"mlp", "conv4", "resnet12"} <= {b for _, b, _ in PAIRS}
    assert {"maml", "reptile"} <= {m for _, _, m in PAIRS}
    assert any(not compatible(*pair) for pair in PAIRS) and any(compatible(*p) for p in PAIRS)


@pytest.mark.parametrize("dataset", choices("dataset"))
def test_every_pair_the_rule_accepts_builds(dataset):
    shape, outputs, task_type = inputs(dataset)
    for choice in choices("backbone"):
        if not compatible(dataset, choice, "maml"):
            continue
        model = built(choice, shape, outputs)
        for meta_optimizer in choices("meta_optimizer"):
            assert compatible(dataset, choice, meta_optimizer)
            algorithm, _ = config.build_meta_optimizer(node("meta_optimizer", meta_optimizer))
            algorithm.meta_model(model)  # wraps the backbone, leaves it as it is
            algorithm.bind(task_type, "loop")


@pytest.mark.parametrize(
    "dataset, backbone_choice, meta_optimizer", [p for p in PAIRS if not compatible(*p)]
)
def test_every_pair_the_rule_refuses_is_one_line_naming_both(
    dataset, backbone_choice, meta_optimizer, cli_here, tmp_path
):
    shape, outputs, _ = inputs(dataset)
    assert dataset not in IMAGE_INPUTS, "an image dataset needs its data to run the command"
    with pytest.raises(MamlrunError) as refused:
        backbone(backbone_choice, shape, outputs)
    reason = str(refused.value)

    out = cli_here(
        "train", f"dataset={dataset}", f"backbone={backbone_choice}",
        f"meta_optimizer={meta_optimizer}",
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"mamlrun: error: backbone={backbone_choice} cannot take dataset={dataset}: {reason}"
    ], out.stderr
    assert not (tmp_path / "outputs").exists(), "a run that failed to start left its folder"


def test_the_reason_is_the_backbones_own():
    with pytest.raises(MamlrunError, match=r"^resnet12 needs image inputs \(C, H, W\), got"):
        backbone("resnet12", (1,), 1)


def test_a_bug_in_a_constructor_keeps_its_traceback():
    """Only MamlrunError is the user's to fix; a TypeError raised inside a component is a bug,
    raised as itself (not as Hydra's "Error in call to target" nor as a one-line error)."""
    broken = copy.deepcopy(node("backbone", "mlp"))
    broken._target_ = f"{Path(__file__).stem}.broken_backbone"
    with pytest.raises(TypeError, match="a bug in the backbone"):
        config.instantiate(broken, in_shape=(1,), out_features=1)


def broken_backbone(in_shape, out_features, *, hidden):
    raise TypeError("a bug in the backbone")
