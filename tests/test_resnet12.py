"""ResNet-12 is MetaOptNet's network, MAML through it is exact whichever way tasks are batched,
every MAML-family flag reaches its layers, and DropBlock is seeded, scheduled and training-only."""

from __future__ import annotations

import json

import pytest
import references
import torch
import torch.nn.functional as F
from conftest import (
    compose_train,
    data_root,
    finite_difference_error,
    maml,
    meta_gradient,
    needs_omniglot,
)
from omegaconf import OmegaConf
from torch import nn

from mamlrun import config
from mamlrun.algorithms import batching
from mamlrun.algorithms.functional import autograd_grad
from mamlrun.algorithms.meta_parameters import per_name, split
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models.layers import DropBlock, batch_norm_layers
from mamlrun.models.resnet12 import resnet12
from mamlrun.results import checkpoint
from mamlrun.training import commands

TINY = [2, 3, 4, 5]


def tiny(size: int = 16, ways: int = 3, **settings) -> nn.Module:
    torch.manual_seed(0)
    return resnet12(
        (3, size, size), ways, **config.settings("backbone", "resnet12", widths=TINY, **settings)
    ).double()


def tasks(n: int = 2, ways: int = 3, shots: int = 2, query: int = 2, size: int = 16) -> TaskBatch:
    """Random float64 RGB tasks, labels in class order."""
    g = torch.Generator().manual_seed(0)

    def images(k: int) -> torch.Tensor:
        return torch.rand(n, ways * k, 3, size, size, generator=g, dtype=torch.float64)

    def labels(k: int) -> torch.Tensor:
        return torch.arange(ways).repeat_interleave(k).expand(n, -1).clone()

    return TaskBatch(images(shots), labels(shots), images(query), labels(query))


def gradient(algo, model: nn.Module, batch: TaskBatch, mode: str, step=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    meta_gradient(algo, model, batch, "classification", mode, step)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


# --------------------------------------------------------------------------- the network
@pytest.mark.parametrize("shape", [(3, 84, 84), (3, 32, 32), (1, 28, 28)])
def test_one_logit_per_class_for_miniimagenet_cifar_and_omniglot_sized_images(shape):
    model = resnet12(shape, 5, **config.settings("backbone", "resnet12", widths=TINY))
    assert model(torch.rand(2, *shape)).shape == (2, 5)


def test_default_is_metaoptnets_network_with_bias_free_convolutions_and_task_batch_norm():
    model = resnet12((3, 84, 84), 5, **config.settings("backbone", "resnet12"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs].count((3, 3)) == 12
    assert [c.kernel_size for c in convs].count((1, 1)) == 4, "a 1x1 conv on every shortcut"
    assert all(c.bias is None for c in convs)
    assert [b.conv3.out_channels for b in model.blocks] == [64, 160, 320, 640]
    assert len(batch_norm_layers(model)) == 16
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert list(model.buffers()) == [], "no running statistics that could leak between tasks"
    assert all(m.negative_slope == 0.1 for m in model.modules() if isinstance(m, nn.LeakyReLU))
    assert model.head.in_features == 640
    body = sum(p.numel() for p in model.blocks.parameters())
    assert round(body / 1e6, 1) == 12.4, "MetaOptNet's 12.4M-parameter ResNet-12"


def test_initialisation_is_metaoptnets():
    model = resnet12((3, 84, 84), 5, **config.settings("backbone", "resnet12"))
    conv = model.blocks[3].conv2.weight  # kaiming normal, fan_out, leaky_relu (gain sqrt 2)
    expected = (2 / (conv.shape[0] * 9)) ** 0.5
    assert conv.std().item() == pytest.approx(expected, rel=0.02)
    for bn in batch_norm_layers(model).values():
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_widths_are_configurable_as_tadams():
    model = resnet12(
        (3, 84, 84), 5, **config.settings("backbone", "resnet12", widths=[64, 128, 256, 512])
    )
    assert [b.conv1.out_channels for b in model.blocks] == [64, 128, 256, 512]


def test_impossible_settings_are_rejected():
    with pytest.raises(MamlrunError, match="image inputs"):
        resnet12((28,), 5, **config.settings("backbone", "resnet12"))
    with pytest.raises(MamlrunError, match="at least 16x16"):
        resnet12((3, 8, 8), 5, **config.settings("backbone", "resnet12"))
    with pytest.raises(MamlrunError, match="backbone.widths needs one width per block"):
        node = OmegaConf.merge(config.group_config("backbone", "resnet12"), {"widths": [64, 8, 2]})
        config.validate_component("backbone", node)
    with pytest.raises(ValueError, match="keep_prob"):
        resnet12(
            (3, 84, 84),
            5,
            **config.settings("backbone", "resnet12", drop_block=True, keep_prob=0.0),
        )


# --------------------------------------------------------------------------- MAML through it
def test_the_reference_forward_is_resnet12s():
    model, x = tiny(), tasks(n=1, shots=3).x_support[0]
    p = dict(model.named_parameters())
    assert torch.allclose(references.resnet12(p, x), model(x), atol=1e-12)


def test_second_order_meta_gradient_matches_finite_differences_of_a_reference():
    """Differences of MAML's objective through the hand-written ResNet-12 (``references``),
    not through the engine's forward."""
    model, batch = tiny(), tasks()
    algo = maml(inner_lr=0.3, inner_steps=1)
    exact = gradient(algo, model, batch, "loop")
    p = dict(model.named_parameters())

    def meta_loss() -> float:
        with torch.enable_grad():
            objective = references.maml_objective(
                references.resnet12, p, batch, F.cross_entropy, 0.3
            )
        return float(objective)

    # A spread of coordinates from every tensor (about 45 of the 1,542).
    assert finite_difference_error(meta_loss, list(model.parameters()), exact, every=37) < 1e-6


def test_loop_and_vmap_batching_give_the_same_meta_gradient():
    model, batch = tiny(), tasks()
    algo = maml(inner_lr=0.3, inner_steps=2)
    loop = gradient(algo, model, batch, "loop")
    vmap = gradient(algo, model, batch, "vmap")
    assert (loop - vmap).abs().max() < 1e-10


@pytest.mark.parametrize(
    "settings",
    [{}, {"learned_inner_lr": "per_layer_per_step", "per_step_bn_weights": True}],
    ids=["maml", "lslr_bnwb"],
)
def test_checkpoint_inner_gives_the_same_meta_gradient(settings):
    """Adaptation-loop checkpointing is what lets second-order ResNet-12 fit in memory
    (docs/PERFORMANCE.md, scripts/memory.py); it must not change what is computed."""
    model, batch = tiny(), tasks()
    grads = {}
    for recompute in (False, True):
        algo = maml(inner_lr=0.3, inner_steps=3, checkpoint_inner=recompute, **settings)
        grads[recompute] = gradient(algo, algo.meta_model(model), batch, "loop")
    assert grads[False].abs().max() > 0
    assert (grads[True] - grads[False]).norm() / grads[False].norm() < 1e-10


def test_anil_adapts_only_the_head_and_meta_learns_the_body():
    algo = maml(inner_lr=0.3, inner_steps=2, adapt_params="head")
    model, batch = tiny(), tasks()
    inner = algo.adaptation(model, "classification", 2, autograd_grad(create_graph=False))
    trajectory, _ = inner(algo.meta_tensors(model), batch.x_support[0], batch.y_support[0])
    assert [set(p) for p in trajectory] == [{"head.weight", "head.bias"}] * 3
    assert not torch.equal(trajectory[2]["head.weight"], model.head.weight)

    gradient(algo, model, batch, "loop")
    body = torch.cat([p.grad.flatten() for p in model.blocks.parameters()])
    assert body.abs().max() > 1e-6, "the body learns in the outer loop, through the head"


def test_per_step_batch_norm_weights_reach_all_sixteen_batch_norms():
    algo = maml(inner_lr=0.3, inner_steps=2, per_step_bn_weights=True)
    model = algo.meta_model(tiny())
    backbone, extras = split(model)
    layers = batch_norm_layers(backbone)
    per_step = per_name(extras["bn_weights"])
    assert set(per_step) == {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    assert all(
        t.shape == (2, layers[n.rsplit(".", 1)[0]].weight.numel()) for n, t in per_step.items()
    )

    gradient(algo, model, tasks(), "loop")
    assert all(t.grad.abs().max() > 0 for t in extras["bn_weights"].values()), "all are used"
    unused = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert unused == []


def test_per_step_running_statistics_cover_every_batch_norm():
    algo = maml(inner_lr=0.3, inner_steps=1, bn_mode="per_step")
    model = algo.meta_model(tiny())
    stats = dict(split(model)[1]["bn_stats"].named_buffers())
    assert len(stats) == 2 * 16 and all(t.shape[0] == 2 for t in stats.values())
    gradient(algo, model, tasks(), "loop")
    means = [t for n, t in stats.items() if n.endswith("running_mean")]
    assert all(t.abs().sum() > 0 for t in means), "every layer collected statistics"


# --------------------------------------------------------------------------- DropBlock
def test_drop_block_follows_only_the_last_two_blocks():
    model = tiny(size=32, drop_block=True)
    assert [type(b.drop).__name__ for b in model.blocks] == ["Identity"] * 2 + ["DropBlock"] * 2


def test_drop_block_changes_training_outputs_but_never_evaluation():
    plain = tiny(size=32)
    dropping = tiny(size=32, drop_block=True, keep_prob=0.5, drop_block_ramp=0)
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), dropping.parameters(), strict=True)
    )
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    assert not torch.allclose(plain(x), dropping(x))
    plain.eval(), dropping.eval()
    assert torch.equal(plain(x), dropping(x))

    plain.train(), dropping.train()
    batch, algo = tasks(size=32), maml(inner_lr=0.3, inner_steps=1)
    for mode in ("loop", "vmap"):  # the algorithm evaluates in eval mode: vmap works too
        a = algo.bind("classification", mode).evaluate(plain, batch, 2)
        b = algo.bind("classification", mode).evaluate(dropping, batch, 2)
        assert torch.equal(a[0], b[0]), mode
    assert dropping.training, "evaluation leaves the model in the mode it found it"


def test_drop_block_masks_come_from_the_seeded_generator():
    drop = DropBlock(block_size=5, keep_prob=0.9, ramp_iterations=0)
    x = torch.ones(64, 16, 10, 10)

    def masked(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return drop(x)

    assert torch.equal(masked(3), masked(3))
    assert not torch.equal(masked(3), masked(4))
    out = masked(3)
    dropped = float((out == 0).float().mean())
    assert 0.07 < dropped < 0.11, f"about 1 - keep_prob of the activations, got {dropped:.3f}"
    assert out.mean().item() == pytest.approx(1.0), "the rest is rescaled to keep the mean"


def test_keep_probability_ramps_linearly_with_the_training_step_it_is_told():
    drop = DropBlock(block_size=5, keep_prob=0.9, ramp_iterations=100)
    for step, keep in [(0, 1.0), (50, 0.95), (100, 0.9), (10_000, 0.9), (None, 0.9)]:
        drop.set_training_step(step)
        assert drop.keep_prob() == pytest.approx(keep), step

    model = tiny(size=32, drop_block=True, drop_block_ramp=100)
    gradient(maml(inner_lr=0.3), model, tasks(size=32), "loop", step=40)
    assert [b.drop.training_step for b in model.blocks[2:]] == [40, 40]
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    model.blocks[2].drop.set_training_step(0), model.blocks[3].drop.set_training_step(0)
    assert torch.equal(model(x), tiny(size=32)(x)), "nothing is dropped at iteration 0"


def test_drop_block_in_training_needs_loop_batching_and_auto_finds_it():
    model, batch = tiny(size=32, drop_block=True), tasks(size=32)
    algo = maml(inner_lr=0.3)
    for mode in ("vmap", "threads"):  # vmap cannot batch the draws; threads would reorder them
        with pytest.raises(MamlrunError, match="task_batching=loop"):
            gradient(algo, model, batch, mode)

    def one_step(mode: str) -> None:
        gradient(algo, model, batch, mode)

    modes = ("loop", "threads", "vmap")
    chosen, seconds = batching.choose(modes, one_step, torch.device("cpu"), repeats=1)
    assert chosen == "loop" and seconds["vmap"] == seconds["threads"] == float("inf")


def test_recomputed_inner_steps_draw_the_same_drop_block_masks():
    """checkpoint_inner rebuilds each inner step in the backward pass: with the generator
    state of the forward pass, or the masks (and the meta-gradient) would differ."""
    model, batch = tiny(size=32, drop_block=True, keep_prob=0.7, drop_block_ramp=0), tasks(size=32)
    grads, states = {}, {}
    for recompute in (False, True):
        torch.manual_seed(5)
        algo = maml(inner_lr=0.3, inner_steps=2, checkpoint_inner=recompute)
        grads[recompute] = gradient(algo, model, batch, "loop")
        states[recompute] = torch.get_rng_state()
    assert (grads[True] - grads[False]).abs().max() < 1e-12
    assert torch.equal(states[True], states[False]), "the generator continues unaffected"


# --------------------------------------------------------------------------- configs and runs
def test_backbone_composes_through_hydra_with_its_documented_defaults():
    cfg = config.validate(compose_train("backbone=resnet12"), config.TrainConfig)
    assert list(cfg.backbone.widths) == [64, 160, 320, 640] and cfg.backbone.drop_block is False
    tadam = compose_train("backbone=resnet12", "backbone.widths=[64,128,256,512]")
    model = config.instantiate(tadam.backbone, in_shape=(3, 84, 84), out_features=5)
    assert [b.conv1.out_channels for b in model.blocks] == [64, 128, 256, 512]


@pytest.mark.parametrize(
    "preset,adapt,shots,steps",
    [
        ("miniimagenet_resnet12_maml_5w1s", "all", 1, 15),
        ("miniimagenet_resnet12_maml_5w5s", "all", 5, 20),
        ("miniimagenet_resnet12_anil_5w1s", "head", 1, 15),
        ("miniimagenet_resnet12_anil_5w5s", "head", 5, 20),
    ],
)
def test_resnet12_presets_set_their_papers_setup(preset, adapt, shots, steps):
    cfg = config.validate(compose_train(f"experiment={preset}"), config.TrainConfig)
    assert cfg.backbone._target_.endswith("resnet12") and cfg.dataset.shots == shots
    mo = cfg.meta_optimizer
    assert (mo.adapt_params, mo.first_order, mo.inner_steps) == (adapt, False, steps)
    assert cfg.reference.metric == "accuracy" and "Table" in cfg.reference.source


def omniglot_run(*extra: str):
    return compose_train(
        "experiment=omniglot_5w1s", "backbone=resnet12", f"backbone.widths={TINY}".replace(" ", ""),
        "meta_batch_size=2", "val_every=2", "val_tasks=2", "eval_batch_size=2",
        "checkpoint_every=2", "meta_optimizer.inner_steps_test=1", "device=cpu", "seed=4",
        *extra,
    )  # fmt: skip


@pytest.mark.slow
@needs_omniglot
def test_a_tiny_resnet12_trains_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLRUN_DATA", str(data_root()))
    best = commands.train(omniglot_run("iterations=2"), run_dir=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert best == results["best_val"] == max(h["mean"] for h in results["val_history"])
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["progress"]["step"] == 2 and "head.weight" in saved["model"]


@pytest.mark.slow
@needs_omniglot
def test_a_resumed_drop_block_run_matches_an_unbroken_one_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLRUN_DATA", str(data_root()))
    common = ["backbone.drop_block=true", "backbone.drop_block_ramp=3", "backbone.keep_prob=0.8"]
    commands.train(omniglot_run(*common, "iterations=4"), run_dir=tmp_path / "unbroken")
    commands.train(omniglot_run(*common, "iterations=2"), run_dir=tmp_path / "broken")
    commands.train(
        omniglot_run(*common, "iterations=4", "resume=true"), run_dir=tmp_path / "broken"
    )
    a, b = (
        checkpoint.load(tmp_path / d / "checkpoints" / "last.pt") for d in ("unbroken", "broken")
    )
    assert a["progress"] == b["progress"] and a["task_batching"] == "loop"
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
