"""``precision=bf16`` changes the arithmetic of the forward passes and nothing else: the
meta-gradient points where fp32's does, parameters, gradients, inner updates and losses stay
float32, and a short training run follows fp32's curve. ``tf32`` is a CUDA switch (a warning
on a CPU) and a wrong name is a one-line error."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import compose_train, maml, meta_gradient
from omegaconf import OmegaConf
from torch import nn

from mamlrun import config
from mamlrun.algorithms.functional import autograd_grad
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models import precision
from mamlrun.models.conv4 import conv4
from mamlrun.models.layers import DropBlock
from mamlrun.models.precision import Precision
from mamlrun.training import commands, components, resume
from mamlrun.training.episodes import OuterStep

BF16 = Precision("bf16", "cpu")


@pytest.fixture(autouse=True)
def tf32_switches_restored():
    """``precision.choose`` on CUDA sets process-wide switches: every test here puts them back
    for the tests that come after it."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


cpu_bf16 = pytest.mark.skipif(
    not torch.amp.is_autocast_available("cpu"), reason="no bfloat16 autocast on this CPU"
)


def omniglot_shaped(tasks: int = 4, query: int = 5, seed: int = 0) -> TaskBatch:
    """5-way 1-shot 28×28 tasks with something to learn: each class is a random pattern of
    strokes, its images that pattern plus noise (random pixels alone give a meta-gradient that
    is mostly noise, see ``test_bf16_meta_gradient_points_where_fp32s_does``)."""
    g = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(tasks, 5, 1, 28, 28, generator=g) < 0.2).float()

    def images(per_class: int) -> torch.Tensor:
        x = patterns.repeat_interleave(per_class, dim=1)
        return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(5).repeat_interleave(per_class).expand(tasks, -1).clone()

    return TaskBatch(images(1), labels(1), images(query), labels(query))


def omniglot_maml(**settings):
    """The Omniglot 5-way 1-shot preset's inner loop (one step of 0.4 on the N × mean loss)."""
    return maml(inner_lr=0.4, inner_steps=1, loss_normalization="tf_maml", **settings)


def flat_gradient(algo, model: nn.Module, batch: TaskBatch, mode: str = "loop") -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    meta_gradient(algo, model, batch, "classification", mode)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def warmed_conv4() -> nn.Module:
    """conv4 after 30 fp32 meta-training steps (about 3 s).

    At initialisation the meta-gradient of conv4 on 1-shot tasks is ill-conditioned, whatever
    the arithmetic: rounding the float32 weights to bfloat16 (a 0.2% change, what autocast does
    to every convolution's weights) and computing in float32 moves it to a cosine similarity of
    0.97-0.99 with the exact one, so no bf16 forward pass could reach 0.99 there. After 30
    steps that floor is 0.997-0.999 and bf16 reaches 0.994-0.998 (docs/PERFORMANCE.md).
    """
    torch.manual_seed(0)
    model, algo = conv4((1, 28, 28), 5, **config.settings("backbone", "conv4")), omniglot_maml()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(30):
        optimizer.zero_grad(set_to_none=True)
        meta_gradient(algo, model, omniglot_shaped(seed=i), "classification", "loop")
        optimizer.step()
    return model


@pytest.mark.slow  # 30 warm-up meta-steps of a full-width conv4 (warmed_conv4)
@cpu_bf16
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_bf16_meta_gradient_points_where_fp32s_does(warmed_conv4, mode):
    """Tolerance: cosine similarity > 0.99 (1 - cos below 1%). bf16 keeps 8 bits of mantissa,
    so every convolution's inputs and weights are rounded by up to 0.4%; the meta-gradient
    summed over tasks moves by a few tenths of a percent in direction (measured 0.994-0.998
    over five task batches), while a wrong dtype somewhere (bf16 inner updates or losses) or a
    pass outside autocast would show as a drop or as exactly 1."""
    batch, algo = omniglot_shaped(seed=100), omniglot_maml()
    fp32 = flat_gradient(algo, warmed_conv4, batch, mode)
    bf16 = flat_gradient(algo.with_precision(BF16), warmed_conv4, batch, mode)
    cosine = float(nn.functional.cosine_similarity(fp32, bf16, dim=0))
    assert 0.99 < cosine < 1 - 1e-6, f"cosine {cosine:.5f}"


@pytest.mark.slow  # 30 warm-up meta-steps of a full-width conv4 (warmed_conv4)
@cpu_bf16
def test_checkpoint_inner_recomputes_the_same_bf16_steps(warmed_conv4):
    """The recomputed inner step runs under the same autocast as the forward pass did."""
    batch = omniglot_shaped(seed=100)
    plain = flat_gradient(omniglot_maml().with_precision(BF16), warmed_conv4, batch)
    algo = maml(inner_lr=0.4, inner_steps=1, loss_normalization="tf_maml", checkpoint_inner=True)
    recomputed = flat_gradient(algo.with_precision(BF16), warmed_conv4, batch)
    assert (recomputed - plain).norm() / plain.norm() < 1e-5


@pytest.mark.slow  # a full-width conv4 under autocast, hooked at every step
@cpu_bf16
def test_parameters_gradients_inner_updates_and_losses_stay_float32():
    torch.manual_seed(0)
    model, batch = (
        conv4((1, 28, 28), 5, **config.settings("backbone", "conv4", filters=8)),
        omniglot_shaped(tasks=2),
    )
    algo = maml(inner_lr=0.4, inner_steps=2, loss_normalization="tf_maml").with_precision(BF16)
    conv_outputs = []
    model[0].register_forward_hook(lambda m, i, out: conv_outputs.append(out.dtype))

    inner = algo.adaptation(model, "classification", 2, autograd_grad(create_graph=True))
    trajectory, forwards = inner(algo.meta_tensors(model), batch.x_support[0], batch.y_support[0])
    assert {t.dtype for params in trajectory for t in params.values()} == {torch.float32}
    assert forwards[-1](trajectory[-1], batch.x_query[0]).dtype == torch.float32
    assert set(conv_outputs) == {torch.bfloat16}, "the convolutions did run in bf16"

    loss, metric = meta_gradient(algo, model, batch, "classification", "loop")
    assert loss.dtype == metric.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_drop_block_drops_as_often_in_bf16_as_in_fp32():
    """Its block centres are drawn in float32 whatever the activations are: a bfloat16 draw
    would pass ``< gamma`` about a third more often than gamma."""
    drop = DropBlock(block_size=5, keep_prob=0.95, ramp_iterations=0)
    dropped = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        dropped[dtype] = float((drop(torch.ones(256, 16, 10, 10, dtype=dtype)) == 0).float().mean())
    assert dropped[torch.bfloat16] == pytest.approx(dropped[torch.float32], rel=1e-6)
    assert 0.04 < dropped[torch.float32] < 0.06


def training_curve(name: str, iterations: int = 20) -> list[float]:
    torch.manual_seed(0)
    algo = omniglot_maml().with_precision(Precision(name, "cpu"))
    model = algo.meta_model(
        conv4((1, 28, 28), 5, **config.settings("backbone", "conv4", filters=32))
    )
    bound = algo.bind("classification", "loop")
    step = OuterStep(bound, torch.optim.Adam(model.parameters(), lr=3e-3))
    return [float(step(model, omniglot_shaped(seed=i), i)["loss"]) for i in range(iterations)]


@pytest.mark.slow  # 20 + 20 meta-steps of a 32-filter conv4
@cpu_bf16
def test_a_short_bf16_training_run_tracks_fp32():
    """Tolerance: the mean loss of the last five of 20 iterations within 0.05 of fp32's (about
    5%; measured 0.003). Single iterations differ by up to 0.11, since each step's rounding
    changes the next step's weights, but that is noise around the same descent: both fall by
    about a third from 1.5, and their iteration-to-iteration spread is 0.05-0.1."""
    fp32, bf16 = training_curve("fp32"), training_curve("bf16")
    last = {name: sum(c[-5:]) / 5 for name, c in (("fp32", fp32), ("bf16", bf16))}
    assert abs(last["bf16"] - last["fp32"]) < 0.05, last
    assert last["bf16"] < bf16[0] - 0.2 and last["fp32"] < fp32[0] - 0.2, "both learn"


def test_tf32_on_a_cpu_warns_in_one_line_and_runs_as_fp32(caplog):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with caplog.at_level(logging.WARNING, logger="mamlrun"):
        chosen = precision.choose("tf32", torch.device("cpu"))
    [record] = caplog.records
    assert "tf32 does nothing on cpu" in record.getMessage() and "\n" not in record.getMessage()
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before

    torch.manual_seed(0)
    model = conv4((1, 28, 28), 5, **config.settings("backbone", "conv4", filters=8))
    batch, algo = omniglot_shaped(tasks=2), omniglot_maml()
    assert torch.equal(
        flat_gradient(algo.with_precision(chosen), model, batch), flat_gradient(algo, model, batch)
    )


def composed(command: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    config.register_schemas()
    with initialize_config_dir(config_dir=str(config.config_dir()), version_base="1.3"):
        return compose(command, overrides=list(overrides))


@pytest.mark.parametrize(
    "command,schema",
    [("train", config.TrainConfig), ("test", config.TestConfig), ("adapt", config.AdaptConfig)],
)
def test_a_wrong_precision_is_one_line_listing_the_choices(command, schema):
    extra = () if command == "train" else ("checkpoint=x.pt",)
    cfg = composed(command, "precision=fp16", *extra)
    message = "^precision must be one of fp32, tf32, bf16, got 'fp16'$"
    with pytest.raises(MamlrunError, match=message):
        config.validate(cfg, schema)
    with pytest.raises(MamlrunError, match="one of fp32, tf32, bf16"):
        precision.choose("fp16", torch.device("cpu"))


def test_a_resumed_run_may_not_change_its_precision():
    saved = {"seed": 0, "precision": "fp32"}
    with pytest.raises(MamlrunError, match="precision: fp32 → bf16"):
        resume.continued_config(saved, OmegaConf.create({**saved, "precision": "bf16"}), None)


def test_bf16_is_refused_in_one_line_for_an_algorithm_that_cannot_run_it():
    class FixedAlgorithm:  # an Algorithm without ``with_precision``
        pass

    algorithm = FixedAlgorithm()
    assert components.in_precision(algorithm, Precision("fp32")) is algorithm
    with pytest.raises(MamlrunError, match="precision=bf16 needs .* FixedAlgorithm"):
        components.in_precision(algorithm, BF16)


@cpu_bf16
def test_a_bf16_run_records_its_precision_and_tests_in_fp32(tmp_path):
    """The checkpoint's config holds the training precision; ``test`` runs in its own
    (fp32 unless told) and writes both, so results from bf16 and fp32 runs compare."""
    commands.train(compose_train("debug=smoke", "precision=bf16", "final_adapt=false"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["precision"] == "bf16"
    assert (results["test"]["precision"], results["test"]["trained_precision"]) == ("fp32", "bf16")
    saved = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert saved["config"]["run"]["precision"] == "bf16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tf32_switches_follow_the_precision():
    cuda = torch.device("cuda")
    for name, expected in (("tf32", True), ("fp32", False), ("bf16", False)):
        if name == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            continue
        precision.choose(name, cuda)
        assert torch.backends.cuda.matmul.allow_tf32 is expected, name
        assert torch.backends.cudnn.allow_tf32 is expected, name


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)),
    reason="needs a CUDA device with bfloat16",
)
def test_cuda_bf16_meta_gradient_points_where_fp32s_does(warmed_conv4):
    model, batch = warmed_conv4.to("cuda"), TaskBatch(*(t.cuda() for t in omniglot_shaped(seed=7)))
    algo = omniglot_maml()
    try:
        fp32_on_cuda = precision.choose("fp32", torch.device("cuda"))  # TF32 off
        fp32 = flat_gradient(algo.with_precision(fp32_on_cuda), model, batch)
        bf16_on_cuda = precision.choose("bf16", torch.device("cuda"))
        bf16 = flat_gradient(algo.with_precision(bf16_on_cuda), model, batch)
    finally:
        warmed_conv4.to("cpu")
    assert float(nn.functional.cosine_similarity(fp32, bf16, dim=0)) > 0.99
