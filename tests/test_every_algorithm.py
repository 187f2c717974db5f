"""Every algorithm keeps the protocol's promises: each ``conf/meta_optimizer/*.yaml``, found when
the tests run (so a member merged later is held to them with no edit here), builds from Python
with its YAML's defaults and describes itself; takes one finite meta-gradient that reaches all
its meta-parameters on every backbone, or refuses the backbone in one line when it builds its
meta-model; does the same in every way of batching tasks, or ``bind`` refuses the mode in one
line (the line the CLI prints); and goes through the commands a user runs, on the sinusoid
(MLP) and on a folder of images (conv4): ``train debug=smoke``, a resume after a signal that
ends bit for bit where an unbroken run ends, ``test`` and ``adapt`` of its checkpoint, and
``report``, which names it.

What each algorithm computes (its meta-gradient against finite differences) is its own file's
business (test_maml_gradients.py, test_variants.py, test_boil.py, ...); here only what every
one of them owes the runner and the user.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import image_batch, meta_gradient
from test_own_images import class_folders
from test_resnet12 import TINY
from test_resnet12 import tasks as rgb_batch
from test_variants import sinusoid_batch

from mamlrun import config
from mamlrun.algorithms.base import Algorithm
from mamlrun.config.ranges import BATCHING_MODES
from mamlrun.errors import MamlrunError
from mamlrun.models.conv4 import conv4
from mamlrun.models.mlp import mlp
from mamlrun.models.resnet12 import resnet12
from mamlrun.results import checkpoint
from mamlrun.training.trainer import Trainer

#: Every algorithm a user can pick (``base/`` holds what they share, not a choice).
CHOICES = sorted(p.stem for p in (config.config_dir() / "meta_optimizer").glob("*.yaml"))

#: An iteration past every schedule in the shipped defaults (MAML++'s first-order phase and
#: its multi-step-loss annealing), where an algorithm computes its full meta-gradient.
LATE = 10**6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors this small gain nothing from a second intra-op thread and lose much when the
    cores are shared (conftest gives torch's count back after each test)."""
    torch.set_num_threads(1)


def shortened(choice: str):
    """The algorithm with its YAML's values, but at most two inner steps in training: enough
    for every step-indexed setting (per-step rates, weights, losses) to have two entries."""
    steps = config.settings("meta_optimizer", choice)["inner_steps"]
    return config.algorithm(choice, inner_steps=min(steps, 2))


def test_the_choices_are_found_on_disk():
    assert {"maml", "fomaml", "anil", "boil", "metasgd", "mamlpp", "reptile"} <= set(CHOICES)
    assert "base" not in CHOICES and "learner" not in CHOICES


# --------------------------------------------------------------------------- from Python
@pytest.mark.parametrize("choice", CHOICES)
def test_it_builds_from_python_with_its_yamls_values_and_describes_itself(choice):
    algo = config.algorithm(choice)
    assert isinstance(algo, Algorithm), f"{choice} lacks a member of the Algorithm protocol"
    for key, value in config.settings("meta_optimizer", choice).items():
        held = getattr(algo, key)
        assert (list(held) if isinstance(held, tuple) else held) == value, key
    described = algo.describe()
    assert described and json.loads(json.dumps(described)) == described  # results.json-able
    assert algo.task_batching == "auto" or algo.task_batching in algo.batching_modes
    assert set(algo.batching_modes) <= set(BATCHING_MODES) and algo.batching_modes
    assert algo.inner_steps_test >= 1


# --------------------------------------------------------------------------- backbones
def tiny_backbone(name: str) -> tuple[torch.nn.Module, object, str]:
    """The smallest instance of each backbone with a meta-batch of two tasks it fits."""
    torch.manual_seed(0)
    if name == "mlp":
        net = mlp((1,), 1, **config.settings("backbone", "mlp", hidden=(4, 3)))
        return net.double(), sinusoid_batch(tasks=2, shots=3, query=3), "regression"
    if name == "conv4":
        net = conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=3))
        return net.double(), image_batch(tasks=2), "classification"
    net = resnet12((3, 16, 16), 3, **config.settings("backbone", "resnet12", widths=TINY))
    return net.double(), rgb_batch(n=2), "classification"


def assert_one_line(error: MamlrunError) -> None:
    message = str(error)
    assert message and "\n" not in message, message


def assert_reaches_every_meta_parameter(model: torch.nn.Module) -> torch.Tensor:
    """Every meta-parameter (a parameter that requires grad: CAVIA keeps its context in the
    model but never learns it) has a finite gradient, and the gradient is not all zero."""
    grads = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"the meta-gradient does not reach {name}"
        assert torch.isfinite(p.grad).all(), f"the meta-gradient of {name} is not finite"
        grads.append(p.grad.flatten())
    flat = torch.cat(grads)
    assert flat.abs().max() > 0
    return flat


@pytest.mark.parametrize("backbone", ["mlp", "conv4", "resnet12"])
@pytest.mark.parametrize("choice", CHOICES)
def test_one_meta_gradient_on_each_backbone_or_a_one_line_refusal(choice, backbone):
    algo = shortened(choice)
    net, batch, task_type = tiny_backbone(backbone)
    try:
        model = algo.meta_model(net)
    except MamlrunError as refusal:
        assert_one_line(refusal)
        return
    meta_gradient(algo, model, batch, task_type, "loop", step=LATE)
    assert_reaches_every_meta_parameter(model)


# --------------------------------------------------------------------------- task batching
@pytest.mark.parametrize("choice", CHOICES)
def test_every_batching_mode_gives_the_loops_meta_gradient_or_a_one_line_refusal(choice):
    """On conv4 (batch norm: what each mode must keep per task), each mode's meta-gradient
    and evaluation are the loop's; a mode outside ``batching_modes`` is refused by ``bind``.
    ``threads`` runs on one worker here (its own copy of the model, as each worker has):
    two workers on two shared cores cost seconds of waiting, and test_variants.py runs the
    family's members on several."""
    algo = shortened(choice)
    net, batch, _ = tiny_backbone("conv4")
    model = algo.meta_model(net)
    meta_gradient(algo, model, batch, "classification", "loop", step=LATE)
    loop = assert_reaches_every_meta_parameter(model)
    loop_curves = algo.bind("classification", "loop").evaluate(model, batch, 2)
    for mode in BATCHING_MODES:
        if mode not in algo.batching_modes:
            with pytest.raises(MamlrunError) as refusal:
                algo.bind("classification", mode)
            assert_one_line(refusal.value)
            continue
        model.zero_grad(set_to_none=True)
        meta_gradient(algo, model, batch, "classification", mode, step=LATE)
        assert (assert_reaches_every_meta_parameter(model) - loop).abs().max() < 1e-10, mode
        curves = algo.bind("classification", mode).evaluate(model, batch, 2)
        for ours, loops in zip(curves, loop_curves, strict=True):
            assert ours.shape == (2, 3) and torch.allclose(ours, loops, atol=1e-10), mode


def refusals() -> list:
    """(CLI arguments, the settings they build) for every mode a choice refuses with its
    defaults, and one refusal the shipped settings make (MAML++'s per-step statistics)."""
    cases = [
        ((f"meta_optimizer={c}", f"meta_optimizer.task_batching={m}"), (c, {}), m)
        for c in CHOICES
        for m in BATCHING_MODES
        if m not in config.algorithm(c).batching_modes
    ]
    per_step = {"bn_mode": "per_step"}
    cases.append(
        (("meta_optimizer=mamlpp", "meta_optimizer.bn_mode=per_step",
          "meta_optimizer.task_batching=vmap"), ("mamlpp", per_step), "vmap")
    )  # fmt: skip
    return [pytest.param(*c, id="-".join(a.split("=")[-1] for a in c[0])) for c in cases]


@pytest.mark.parametrize("arguments,built,mode", refusals())
def test_a_refused_mode_is_the_one_line_the_cli_prints(arguments, built, mode, cli_here):
    choice, settings = built
    with pytest.raises(MamlrunError) as refusal:
        config.algorithm(choice, **settings).bind("regression", mode)
    out = cli_here("train", "debug=smoke", *arguments, "hydra.run.dir=refused")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"mamlrun: error: {refusal.value}"]


# --------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def own_images(tmp_path_factory) -> Path:
    """A user's folder of twelve classes of three images (``dataset=images``)."""
    return class_folders(tmp_path_factory.mktemp("own-images"))


#: What each run trains on: debug=smoke's sinusoid with the MLP (regression), and a folder of
#: images with conv4 (classification, batch norm), as small as each can be.
DATA = {
    "sinusoid": lambda images: [],
    "images": lambda images: [
        "dataset=images", f"dataset.root={images}", "dataset.ways=2", "dataset.shots=1",
        "dataset.query=1", "dataset.image_size=16", "backbone=conv4", "backbone.filters=4",
    ],
}  # fmt: skip


def smoke(run: str, choice: str, data: list[str], *extra: str) -> list[str]:
    """``train debug=smoke`` with this algorithm, half its iterations (validated and saved
    every 5), one fixed batching mode (``auto`` measures and may pick another mode in another
    run) and no final test or adapt (run below)."""
    mode = config.algorithm(choice).batching_modes[0]
    return ["train", "debug=smoke", f"meta_optimizer={choice}", *data, f"hydra.run.dir={run}",
            "iterations=10", "val_every=5", "checkpoint_every=5", "val_tasks=4",
            f"meta_optimizer.task_batching={mode}", "final_test=false", "final_adapt=false",
            "threads=1", *extra]  # fmt: skip


def last_of(run: Path) -> dict:
    return checkpoint.load(run / "checkpoints" / "last.pt")


def assert_same_state(a: dict, b: dict) -> None:
    assert a["progress"] == b["progress"]
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        for field, value in state.items():
            theirs = b["optimizer"]["state"][key][field]
            assert torch.equal(value, theirs) if torch.is_tensor(value) else value == theirs
    assert a.get("scheduler") == b.get("scheduler")


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATA)
@pytest.mark.parametrize("choice", CHOICES)
def test_train_resume_test_adapt_and_report_through_the_cli(
    choice, dataset, own_images, cli_here, tmp_path
):
    data = DATA[dataset](own_images)
    out = cli_here(*smoke("unbroken", choice, data))
    assert out.returncode == 0, out.stderr
    unbroken = tmp_path / "unbroken"
    assert (unbroken / "checkpoints" / "best.pt").is_file()

    # A signal after step 7 (no validation or checkpoint falls there), as Slurm sends one.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "stop_requests", lambda t, flag: (False, t.state.step == 7))
        out = cli_here(*smoke("broken", choice, data))
    assert out.returncode == 128 + 15 and "resume=true" in out.stderr, out.stderr
    assert last_of(tmp_path / "broken")["progress"]["step"] == 7
    out = cli_here(*smoke("broken", choice, data, "resume=true"))
    assert out.returncode == 0, out.stderr
    assert_same_state(last_of(unbroken), last_of(tmp_path / "broken"))

    out = cli_here("test", "checkpoint=unbroken", "test_tasks=4", "eval_batch_size=4",
                   "hydra.run.dir=unbroken/test")  # fmt: skip
    assert out.returncode == 0, out.stderr
    tested = json.loads((unbroken / "test" / "results.json").read_text())
    trained = json.loads((unbroken / "results.json").read_text())
    assert tested["inner_steps"] == trained["inner_steps_test"]  # the run's (a preset's) own
    assert math.isfinite(tested["mean"]) and tested["test_tasks"] == 4

    out = cli_here("adapt", "checkpoint=unbroken", "test_tasks=2", "eval_batch_size=2",
                   "inner_steps=2", "baseline.steps=1", "hydra.run.dir=adapted")  # fmt: skip
    assert out.returncode == 0, out.stderr
    adapted = json.loads((tmp_path / "adapted" / "results.json").read_text())
    assert adapted["steps"] == [0, 1, 2] and all(math.isfinite(m) for m in adapted["mean"])

    out = cli_here("report", "unbroken")
    assert out.returncode == 0, out.stderr
    rows = [line.strip("|").split("|") for line in out.stdout.splitlines() if line[:2] == "| "]
    header, row = [c.strip() for c in rows[0]], [c.strip() for c in rows[2]]
    assert dict(zip(header, row, strict=True))["algorithm"] == choice
    assert row[header.index("test")] != "-", "the test inside the run's folder is shown"
