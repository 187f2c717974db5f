"""How the tasks of a meta-batch run: the ``threads`` and chunked ``vmap:C`` modes beside
``loop`` and ``vmap`` (issue 15). That every mode computes the same meta-gradient is checked
with the variants (test_variants.py) and against finite differences (test_maml_gradients.py);
here: what makes each mode safe to use in a run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import compose_train, image_batch, maml, meta_gradient

from mamlrun import config
from mamlrun.algorithms import batching
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models.conv4 import conv4
from mamlrun.results import checkpoint
from mamlrun.training import commands


def conv_problem(tasks: int = 5):
    algo = maml(inner_lr=0.3, inner_steps=2)
    torch.manual_seed(1)
    model = algo.meta_model(
        conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=4)).double()
    )
    return algo, model, image_batch(tasks=tasks)


def float32_gradient(algo, model, batch, mode: str) -> torch.Tensor:
    """In float32, where a different order of the same sums shows in the last bits."""
    model = model.float()
    model.zero_grad(set_to_none=True)
    inputs = TaskBatch(*(t.float() if t.is_floating_point() else t for t in batch))
    meta_gradient(algo, model, inputs, "classification", mode)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.fixture
def threads():
    """Restores torch's intra-op thread count after a test changes it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_threads_give_the_same_float32_meta_gradient_whatever_the_number_of_workers(threads):
    """Each task runs on one intra-op thread and the sum is taken in task order, so a run's
    numbers do not depend on how many cores it had (and a resumed run stays bitwise equal)."""
    algo, model, batch = conv_problem()
    results = []
    for workers in (1, 2, 3):
        threads(workers)
        results.append(float32_gradient(algo, model, batch, "threads"))
    assert all(torch.equal(results[0], r) for r in results[1:])
    threads(1)
    loop_on_one_thread = float32_gradient(algo, model, batch, "loop")
    assert torch.equal(results[0], loop_on_one_thread), "the loop's sum, in the loop's order"


def test_the_intra_op_thread_count_is_restored_even_when_a_task_fails(threads):
    threads(2)
    algo, model, batch = conv_problem()
    two_channels = batch.x_support.expand(-1, -1, 2, -1, -1)  # conv4 takes one
    broken = TaskBatch(two_channels, *batch[1:])
    with pytest.raises(RuntimeError):
        float32_gradient(algo, model, broken, "threads")
    assert torch.get_num_threads() == 2


def test_chunks_cover_the_meta_batch_in_order_with_a_smaller_last_chunk():
    batch = TaskBatch(*(torch.arange(5).view(5, 1) for _ in range(4)))
    parts = batching.chunks(batch, 2)
    assert [p.num_tasks for p in parts] == [2, 2, 1]
    assert torch.cat([p.x_support for p in parts]).flatten().tolist() == [0, 1, 2, 3, 4]
    assert [p.num_tasks for p in batching.chunks(batch, None)] == [5]


@pytest.mark.parametrize("mode", ["vmap:0", "vmap:x", "threads:2", "loop:4", "vmapp", ""])
def test_an_unknown_mode_is_a_one_line_error_naming_the_choices(mode):
    with pytest.raises(MamlrunError, match="loop, threads, vmap, or vmap:C") as error:
        maml(task_batching=mode)
    assert "\n" not in str(error.value)


def test_modes_that_cannot_run_a_setting_say_why():
    with pytest.raises(MamlrunError, match="threads is not possible with bn_mode=per_step"):
        maml(bn_mode="per_step", task_batching="threads")
    with pytest.raises(MamlrunError, match="vmap:4 is not possible with checkpoint_inner"):
        maml(checkpoint_inner=True, task_batching="vmap:4")
    assert maml(checkpoint_inner=True, task_batching="threads").batching_modes == (
        "loop",
        "threads",
    )


def test_auto_measures_threads_only_on_a_multi_core_cpu_and_vmap_also_in_chunks(threads):
    modes = ("loop", "threads", "vmap")
    threads(2)
    assert batching.candidates(modes, 32, torch.device("cpu")) == [
        "loop", "threads", "vmap", "vmap:16", "vmap:8",
    ]  # fmt: skip
    assert batching.candidates(modes, 32, torch.device("cuda")) == [
        "loop", "vmap", "vmap:16", "vmap:8",
    ]  # fmt: skip
    assert batching.candidates(modes, 5, torch.device("cpu")) == [
        "loop", "threads", "vmap", "vmap:2",
    ]  # fmt: skip
    assert batching.candidates(modes, 3, torch.device("cpu")) == ["loop", "threads", "vmap"]
    threads(1)
    assert "threads" not in batching.candidates(modes, 32, torch.device("cpu"))
    assert batching.candidates(("loop",), 32, torch.device("cpu")) == ["loop"]


def test_evaluation_in_threads_builds_no_graph_and_leaves_grad_untouched():
    algo, model, batch = conv_problem(tasks=3)
    loss, metric = algo.bind("classification", "threads").evaluate(model, batch, 2)
    assert not loss.requires_grad and loss.shape == (3, 3)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["threads", "vmap:2"])
def test_a_run_resumed_in_a_new_mode_matches_an_unbroken_one_bit_for_bit(tmp_path, threads, mode):
    threads(2)
    common = [
        "dataset=sinusoid", f"meta_optimizer.task_batching={mode}", "device=cpu",
        "meta_batch_size=3", "val_every=3", "val_tasks=2", "eval_batch_size=2",
        "checkpoint_every=3", "seed=5",
    ]  # fmt: skip
    commands.train(compose_train(*common, "iterations=6"), run_dir=tmp_path / "unbroken")
    commands.train(compose_train(*common, "iterations=3"), run_dir=tmp_path / "broken")
    commands.train(
        compose_train(*common, "iterations=6", "resume=true"), run_dir=tmp_path / "broken"
    )
    a = checkpoint.load(tmp_path / "unbroken" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_chunked_vmap_run_is_configured_from_the_command_line(tmp_path):
    cfg = compose_train(
        "dataset=sinusoid", "meta_optimizer.task_batching=vmap:2", "iterations=2",
        "meta_batch_size=3", "val_every=2", "val_tasks=2",
    )  # fmt: skip
    assert cfg.meta_optimizer.task_batching == "vmap:2"
    commands.train(cfg, run_dir=tmp_path)
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["task_batching"] == "vmap:2"


def test_auto_times_the_modes_in_rounds_and_picks_the_fastest(monkeypatch):
    """On a fake clock: each call of a mode costs the next of its seconds. The warm-up call is
    not counted, and a mode keeps its best round."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(batching, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    calls, cost = [], {"loop": [1.0, 3.0, 3.0], "threads": [9.0, 2.0, 5.0], "vmap": None}

    def step(mode: str) -> None:
        calls.append(mode)
        if cost[mode] is None:
            raise RuntimeError("no batching rule")  # a mode that cannot run: never retried
        clock.now += cost[mode][calls.count(mode) - 1]

    chosen, seconds = batching.choose(list(cost), step, torch.device("cpu"), repeats=2)
    assert calls == ["loop", "threads", "vmap"] + ["loop", "threads"] * 2
    assert chosen == "threads" and seconds == {"loop": 3.0, "threads": 2.0, "vmap": float("inf")}
