"""BOIL: the body adapts in the inner loop, the head is frozen there and learned outside it.

Its meta-gradient is held against central differences of a hand-written inner loop in float64
on the MLP (regression) and on conv4 (classification, batch norm), per task and under vmap.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train, image_batch
from test_miniimagenet import write_pickles
from test_variants import (
    ALPHA,
    by_hand,
    engine_gradient,
    finite_differences,
    pick,
    relative_error,
    sinusoid_batch,
    tiny_conv4,
    tiny_mlp,
)
from torch.func import functional_call

from mamlrun import config
from mamlrun.algorithms.functional import autograd_grad
from mamlrun.algorithms.selection import adapted_names
from mamlrun.data.miniimagenet import SPLIT_CLASSES
from mamlrun.training import commands

VMAP_IN_FULL_SUITE = pytest.param("vmap", marks=pytest.mark.slow)


def boil(**settings):
    return config.algorithm("boil", inner_lr=ALPHA, inner_steps=2, **settings)


def test_boil_is_maml_with_the_body_adapted():
    maml, boiled = (
        config.settings("meta_optimizer", "maml"),
        config.settings("meta_optimizer", "boil"),
    )
    assert boiled.pop("adapt_params") == "body"
    maml.pop("adapt_params")
    assert boiled == maml


def test_the_inner_loop_moves_the_body_and_leaves_the_head_where_it_is():
    algo = boil()
    model = tiny_mlp(algo)
    inner = algo.adaptation(model, "regression", 2, autograd_grad(create_graph=False))
    batch = sinusoid_batch()
    trajectory, _ = inner(algo.meta_tensors(model), batch.x_support[0], batch.y_support[0])
    assert [set(p) for p in trajectory] == [{"0.weight", "0.bias", "2.weight", "2.bias"}] * 3
    assert not torch.equal(trajectory[2]["0.weight"], model[0].weight)


@pytest.mark.parametrize("batching", ["loop", VMAP_IN_FULL_SUITE])
def test_mlp_meta_gradient_matches_finite_differences_and_reaches_the_head(batching):
    algo = boil()
    model, batch = tiny_mlp(algo), sinusoid_batch()
    exact = engine_gradient(algo, model, batch, "regression", batching)
    theta = dict(model.named_parameters())
    tensors = list(theta.values())
    body = {"0.weight", "0.bias", "2.weight", "2.bias"}
    picks, numeric = finite_differences(
        lambda: by_hand(model, theta, batch, steps=2, lr=lambda k, s: ALPHA, adapted=body,
                        weights=[0, 1]),
        tensors,
    )  # fmt: skip
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6
    assert model[4].weight.grad.abs().max() > 1e-4, "the frozen head is learned outside"


def classified_by_hand(model, theta, batch, *, steps: int, adapted: set[str]) -> float:
    """mean_i cross-entropy on query_i after ``steps`` SGD steps on support_i of the
    ``adapted`` parameters only, with plain autograd (batch norm on each batch's statistics)."""
    total = 0.0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        params = {k: t.detach().clone().requires_grad_() for k, t in theta.items()}
        for _ in range(steps):
            with torch.enable_grad():
                loss = F.cross_entropy(functional_call(model, params, (xs,)), ys)
                names = sorted(adapted)
                grads = torch.autograd.grad(loss, [params[k] for k in names])
            for k, g in zip(names, grads, strict=True):
                params[k] = (params[k] - ALPHA * g).detach().requires_grad_()
        total += float(F.cross_entropy(functional_call(model, params, (xq,)), yq))
    return total / batch.num_tasks


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_conv4_meta_gradient_matches_finite_differences(batching):
    algo = boil()
    model, batch = tiny_conv4(algo), image_batch(tasks=2)
    exact = engine_gradient(algo, model, batch, "classification", batching)
    theta = dict(model.named_parameters())
    tensors = list(theta.values())
    body = set(adapted_names(model, "body"))
    assert body and body != set(theta), "the head is left out"
    picks, numeric = finite_differences(
        lambda: classified_by_hand(model, theta, batch, steps=2, adapted=body), tensors, every=5
    )
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6


def test_a_smoke_run_trains_tests_and_adapts_with_boil(cli_here, tmp_path):
    out = cli_here("train", "debug=smoke", "meta_optimizer=boil", "hydra.run.dir=run")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "run" / "test" / "results.json").is_file()


# --------------------------------------------------------------------------- the presets
@pytest.mark.parametrize("shots,value,ci95", [(1, 0.4961, 0.0016), (5, 0.6645, 0.0037)])
def test_the_presets_are_the_authors_miniimagenet_setup_with_the_papers_numbers(shots, value, ci95):
    """github.com/HJ-Yoo/BOIL's defaults (conf/experiment/base/miniimagenet_boil_paper.yaml
    says where each comes from); the numbers as LibFewShot's reproduction quotes the paper."""
    cfg = compose_train(f"experiment=miniimagenet_5w{shots}s_boil")
    mo = cfg.meta_optimizer
    assert (mo.adapt_params, mo.first_order, mo.inner_lr) == ("body", False, 0.5)
    assert (mo.inner_steps, mo.inner_steps_test, mo.loss_normalization) == (1, 1, "mean")
    assert (mo.bn_mode, mo.optimizer.lr, mo.scheduler) == ("transductive", 0.001, None)
    assert (cfg.backbone.filters, cfg.backbone.downsample, cfg.backbone.head) == (
        64, "max_pool", "flatten"
    )  # fmt: skip
    assert (cfg.dataset.ways, cfg.dataset.shots, cfg.dataset.query) == (5, shots, 15)
    assert (list(cfg.dataset.mean), list(cfg.dataset.std)) == ([0, 0, 0], [1, 1, 1])
    assert (cfg.meta_batch_size, cfg.iterations) == (4, 30000)
    ref = cfg.reference
    assert (ref.value, ref.ci95, ref.inner_steps) == (value, ci95, 1)
    assert f"{100 * value:.2f} ± {100 * ci95:.2f}%" in ref.source


@pytest.mark.slow
def test_the_1_shot_preset_trains_and_tests_on_a_fixture_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_pickles(tmp_path / "data", classes=SPLIT_CLASSES, per_class=2)
    cfg = compose_train(
        "experiment=miniimagenet_5w1s_boil", f"dataset.root={tmp_path / 'data'}",
        "dataset.query=1", "iterations=2", "val_every=2", "val_tasks=2", "eval_batch_size=2",
        "checkpoint_every=2", "final_test=true", "test_tasks=2",
        "meta_optimizer.task_batching=loop", "device=cpu", "threads=1",
    )  # fmt: skip
    commands.train(cfg, run_dir=tmp_path / "run")
    tested = json.loads((tmp_path / "run" / "test" / "results.json").read_text())
    assert tested["inner_steps"] == 1 and tested["metric"] == "accuracy"
