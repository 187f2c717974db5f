"""On a GPU the engine computes what it computes on the CPU. Skipped where there is no CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import maml, meta_gradient

from mamlrun import config
from mamlrun.data.tasks import TaskBatch
from mamlrun.models.conv4 import conv4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_meta_gradient(device: str, batching: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = (
        conv4((1, 28, 28), 5, **config.settings("backbone", "conv4", filters=8)).double().to(device)
    )
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.rand(4, 5, 1, 28, 28, generator=g), torch.rand(4, 10, 1, 28, 28, generator=g)
    ys, yq = torch.arange(5).expand(4, -1), torch.arange(5).repeat(2).expand(4, -1)
    batch = TaskBatch(*(t.double() if t.is_floating_point() else t for t in (xs, ys, xq, yq)))
    batch = TaskBatch(*(t.to(device) for t in batch))
    meta_gradient(maml(inner_lr=0.4, inner_steps=2), model, batch, "classification", batching)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_cuda_meta_gradient_equals_the_cpu_one(batching):
    assert torch.allclose(
        cuda_meta_gradient("cuda", batching),
        cuda_meta_gradient("cpu", "loop"),
        rtol=1e-8,
        atol=1e-10,
    )


def test_training_runs_on_cuda(tmp_path):
    from conftest import compose_train

    from mamlrun.results import checkpoint
    from mamlrun.training import commands

    cfg = compose_train("debug=smoke", "device=cuda", "final_adapt=false")
    commands.train(cfg, run_dir=tmp_path)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["progress"]["step"] == 20
