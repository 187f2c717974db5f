"""conv4 is the paper's network, and MAML through it is exact whichever way tasks are batched."""

from __future__ import annotations

import pytest
import references
import torch
import torch.nn.functional as F
from conftest import finite_difference_error, image_batch, maml, meta_gradient
from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.algorithms.losses import loss_fn
from mamlrun.errors import MamlrunError
from mamlrun.models.conv4 import conv4


def test_strided_omniglot_network_shapes_and_size():
    model = conv4((1, 28, 28), 5, **config.settings("backbone", "conv4"))
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4 and all(c.out_channels == 64 for c in convs)
    assert model[-1].in_features == 64, "Omniglot head averages the 2x2 map, as the original"


def test_max_pool_variant_for_miniimagenet():
    model = conv4(
        (3, 84, 84),
        5,
        **config.settings("backbone", "conv4", filters=32, downsample="max_pool", head="flatten"),
    )
    assert model(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    assert model[-1].in_features == 32 * 5 * 5


def test_batch_norm_uses_task_statistics_and_keeps_no_running_state():
    model = conv4((1, 28, 28), 5, **config.settings("backbone", "conv4"))
    assert list(model.buffers()) == [], "no running statistics that could leak between tasks"
    x = torch.rand(10, 1, 28, 28)
    model.eval()
    a = model(x)
    b = model(torch.cat([x, 10 * torch.rand(10, 1, 28, 28)]))[:10]
    assert not torch.allclose(a, b), "evaluation normalises with the batch it sees"


def test_task_batch_norm_equals_torch_batch_norm_in_training_mode():
    from mamlrun.models.layers import TaskBatchNorm2d

    ours, reference = TaskBatchNorm2d(6).double(), torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        for p in (*ours.parameters(), *reference.parameters()):
            p.uniform_(-1, 1)
        reference.weight.copy_(ours.weight)
        reference.bias.copy_(ours.bias)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 1
    assert torch.allclose(ours(x), reference(x), atol=1e-10)


def test_invalid_settings_are_rejected():
    with pytest.raises(MamlrunError, match="backbone.downsample must be one of stride, max_pool"):
        node = OmegaConf.merge(config.group_config("backbone", "conv4"), {"downsample": "avg"})
        config.validate_component("backbone", node)
    with pytest.raises(MamlrunError, match="image inputs"):
        conv4((28,), 5, **config.settings("backbone", "conv4"))


def test_conv4_meta_gradient_is_the_same_per_task_and_batched():
    torch.manual_seed(0)
    model = conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=4)).double()
    batch = image_batch(tasks=3)
    grads = {}
    for mode in ("loop", "vmap"):
        model.zero_grad(set_to_none=True)
        meta_gradient(maml(inner_lr=0.3, inner_steps=2), model, batch, "classification", mode)
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (grads["loop"] - grads["vmap"]).abs().max() < 1e-10


@pytest.mark.parametrize(
    "settings", [{}, {"downsample": "max_pool", "head": "flatten"}], ids=["stride", "max_pool"]
)
def test_the_reference_forward_is_conv4s(settings):
    torch.manual_seed(1)
    shape = config.settings("backbone", "conv4", filters=3, **settings)
    model = conv4((1, 16, 16), 3, **shape).double()
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    p = dict(model.named_parameters())
    assert torch.allclose(references.conv4(p, x, **settings), model(x), atol=1e-12)


def test_conv4_second_order_gradient_matches_finite_differences_of_a_reference():
    """Differences of MAML's objective through the hand-written conv4 (``references``), not
    through the engine's forward. Per task; the batched path is held to it above."""
    torch.manual_seed(1)
    model = conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=3)).double()
    batch = image_batch(tasks=2)
    algo = maml(inner_lr=0.3, inner_steps=1)
    model.zero_grad(set_to_none=True)
    meta_gradient(algo, model, batch, "classification", "loop")
    exact = torch.cat([p.grad.flatten() for p in model.parameters()])
    p = dict(model.named_parameters())

    def meta_loss() -> float:
        with torch.enable_grad():
            objective = references.maml_objective(references.conv4, p, batch, F.cross_entropy, 0.3)
        return float(objective)

    # Check a spread of coordinates across every layer rather than all ~400.
    assert finite_difference_error(meta_loss, list(model.parameters()), exact, every=7) < 1e-5


def test_tf_maml_loss_is_n_times_the_mean_cross_entropy():
    logits, y = torch.randn(10, 5), torch.arange(5).repeat(2)
    per_example = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    shots = 2
    original = (per_example / shots).sum()  # what tf.gradients differentiates in the original
    assert torch.allclose(loss_fn("classification", "tf_maml")(logits, y), original)
    assert torch.allclose(loss_fn("regression", "tf_maml")(logits, logits + 1), torch.tensor(1.0))
