"""Meta-training throughput and peak memory of mamlrun's engine against a reference loop.

The reference is written the way learn2learn's ``MAML`` works: per task, deep-copy the model,
replace its parameters by differentiable clones, adapt the copy with ``autograd.grad``, and
backpropagate that task's query loss. Its network is mamlrun's with the same weights, but with
torch's ``nn.BatchNorm2d(track_running_stats=False)`` where mamlrun has its plain-op
``TaskBatchNorm2d``, as a learn2learn user's network (``with_torch_batch_norm``). Both run in
the same process, interleaved A B A B, after a float64 check that they compute the same
meta-gradient, so the ratios hold even on a noisy machine.

    python scripts/bench.py                      # CPU, the Omniglot-shaped configs, both orders
    python scripts/bench.py --presets --all-modes   # every preset, every mode auto considers
    python scripts/bench.py --configs 5w1s --orders second --repeats 5 --json bench.json
    python scripts/bench.py --configs mini-conv4 mini-resnet12 --repeats 1   # miniImageNet-shaped

Peak memory is measured in a fresh subprocess per (engine, config): on CPU the peak growth of
the bytes malloc has handed out (``heap``, glibc's mallinfo2) and of RSS, on CUDA
``torch.cuda.max_memory_allocated``. ``sample`` is the time mamlrun's ``OmniglotTasks`` takes
to draw the meta-batch, as a share of (that time + the engine's meta-gradient).

``mamlrun*`` is what ``task_batching=auto`` picks with the YAML's ``max_memory`` (``2x_loop``),
from its own in-process probe of every candidate's time and peak (``training/auto_batching``).
Second-order settings also time ``mamlrun+ckpt``: the per-task loop with inner-loop gradient
checkpointing (``MAML(checkpoint_inner=True)``), which trades recomputation for memory; for
second-order presets with several inner steps ``--all-modes`` includes it among auto's
candidates (``loop+ckpt``, ``threads+ckpt``). After each preset a ``targets:`` line reads off
issue 26's targets: the fastest mode within 1.25x the reference's peak, the fastest unbounded,
each with its speed and memory ratios and share of the matmul FLOP/s, and auto's pick.

``5w1s``, ``5w5s`` and ``20w1s`` are Omniglot-shaped (28×28×1, the paper's conv4 with 64
filters). ``mini-conv4`` and ``mini-resnet12`` are miniImageNet-shaped (84×84×3, 5-way 1-shot,
meta-batch 4, 5 inner steps): the paper's conv4 with 32 filters, max-pooling and a flattened
head, and MetaOptNet's ResNet-12 (64-160-320-640). The reference clones any module, so it
runs ResNet-12 too. Their float64 equality check runs on one task with 2 query images per class
(the engines' agreement does not depend on the batch size, and float64 ResNet-12 on the full
meta-batch would take longer than the timing itself).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, replace

import torch
from omegaconf import OmegaConf
from torch import nn

from mamlrun import config
from mamlrun.algorithms.maml import MAML
from mamlrun.data.tasks import TaskBatch
from mamlrun.models.conv4 import conv4
from mamlrun.models.layers import TaskBatchNorm2d
from mamlrun.models.resnet12 import resnet12
from mamlrun.training import auto_batching
from mamlrun.training.episodes import backward
from mamlrun.training.memory import MIB, PeakMemory, heap_bytes, rss_bytes


@dataclass(frozen=True)
class Setting:
    name: str
    ways: int
    shots: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    model: str = "conv4-64"  # a key of MODELS
    image: tuple[int, int, int] = (1, 28, 28)
    #: float64 equality check on one task with this many query images per class (None: the
    #: timed batch itself)
    check_query: int | None = None
    #: A preset's own workload: its query images per class (None: ``--query``), meta-optimizer
    #: (maml, mamlpp, reptile), loss normalisation and order (None: ``--orders``).
    query: int | None = None
    algorithm: str = "maml"
    normalization: str = "tf_maml"
    order: str | None = None


MINI = (3, 84, 84)
SETTINGS = {
    "5w1s": Setting("5w1s", 5, 1, 32, 1, 0.4),
    "5w5s": Setting("5w5s", 5, 5, 32, 1, 0.4),
    "20w1s": Setting("20w1s", 20, 1, 16, 5, 0.1),
    "mini-conv4": Setting("mini-conv4", 5, 1, 4, 5, 0.01, "conv4-32", MINI, check_query=2),
    "mini-resnet12": Setting("mini-resnet12", 5, 1, 4, 5, 0.01, "resnet12", MINI, check_query=2),
}
#: Every Omniglot preset's own workload (conf/experiment/omniglot_*.yaml) and the MAML paper's
#: miniImageNet 5-way 1-shot (conf/experiment/miniimagenet_5w1s.yaml): its meta-batch, query
#: images, inner steps and rate, network and algorithm, in the order it trains with.
#: MAML++ is timed with the settings of the end of its training (second order, the last
#: step's loss); Reptile (first order by definition) against learn2learn's way of writing it.
PRESETS = {
    "omniglot_5w1s": Setting("omniglot_5w1s", 5, 1, 32, 1, 0.4, query=1, order="second"),
    "omniglot_5w5s": Setting("omniglot_5w5s", 5, 5, 32, 1, 0.4, query=5, order="second"),
    "omniglot_20w1s": Setting("omniglot_20w1s", 20, 1, 16, 5, 0.1, query=1, order="second"),
    "omniglot_20w5s": Setting("omniglot_20w5s", 20, 5, 16, 5, 0.1, query=5, order="second"),
    "omniglot_5w1s_mamlpp": Setting(
        "omniglot_5w1s_mamlpp", 5, 1, 8, 5, 0.1, "conv4-64-maxpool", query=1,
        algorithm="mamlpp", normalization="mean", order="second",
    ),
    "omniglot_5w1s_reptile": Setting(
        "omniglot_5w1s_reptile", 5, 1, 10, 3, 0.001, "conv4-64-flatten", query=14,
        algorithm="reptile", normalization="mean", order="first",
    ),
    "miniimagenet_5w1s": Setting(
        "miniimagenet_5w1s", 5, 1, 4, 5, 0.01, "conv4-32", MINI, check_query=2, query=15,
        order="second",
    ),
}  # fmt: skip
SETTINGS.update(PRESETS)
#: The settings ``python scripts/bench.py`` runs without ``--configs`` (the issue-4 targets).
DEFAULT_CONFIGS = ["5w1s", "5w5s", "20w1s"]

#: Backbones by name: the MAML paper's conv4 for Omniglot (64 filters, strided) and for
#: miniImageNet (32 filters, max-pooling, flattened head), MetaOptNet's ResNet-12, and a
#: ResNet-12 of half TADAM's widths for quick checks on a CPU.
#: MetaOptNet's ResNet-12 as conf/backbone/resnet12.yaml has it (DropBlock off, as timed).
RESNET12 = {
    "widths": (64, 160, 320, 640),
    "drop_block": False,
    "keep_prob": 0.9,
    "drop_block_size": 5,
    "drop_block_ramp": 20000,
}
MODELS = {
    "conv4-64": lambda shape, ways: conv4(
        shape, ways, filters=64, downsample="stride", head="mean"
    ),
    "conv4-64-maxpool": lambda shape, ways: conv4(
        shape, ways, filters=64, downsample="max_pool", head="flatten"
    ),
    "conv4-64-flatten": lambda shape, ways: conv4(
        shape, ways, filters=64, downsample="stride", head="flatten"
    ),
    "conv4-32": lambda shape, ways: conv4(
        shape, ways, filters=32, downsample="max_pool", head="flatten"
    ),
    "resnet12": lambda shape, ways: resnet12(shape, ways, **RESNET12),
    "resnet12-small": lambda shape, ways: resnet12(
        shape, ways, **{**RESNET12, "widths": (32, 64, 128, 256)}
    ),
}


def build_model(s: Setting, device: torch.device) -> nn.Module:
    return MODELS[s.model](s.image, s.ways).to(device)


def make_batch(s: Setting, query: int, device: torch.device, seed: int = 0) -> TaskBatch:
    """Random tasks of the setting's image shape; the data do not change the cost."""
    g = torch.Generator(device=device).manual_seed(seed)

    def images(per_class: int) -> torch.Tensor:
        n = s.ways * per_class
        return torch.rand(s.meta_batch, n, *s.image, generator=g, device=device)

    def labels(per_class: int) -> torch.Tensor:
        y = torch.arange(s.ways, device=device).repeat_interleave(per_class)
        return y.expand(s.meta_batch, -1).contiguous()

    return TaskBatch(images(s.shots), labels(s.shots), images(query), labels(query))


_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def with_torch_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` as a learn2learn user writes it: every ``TaskBatchNorm2d`` (mamlrun's plain-op
    batch norm) replaced by torch's ``nn.BatchNorm2d(track_running_stats=False)``, the fused
    kernel learn2learn's examples use. The twin shares ``model``'s Parameter objects (the same
    weights, and the meta-gradient lands in ``model``'s ``.grad``), so it is made once per
    model and the reference pays nothing for it."""
    twin = _TWINS.get(model)
    if twin is None:
        twin = copy.copy(model)
        twin._modules = dict(model._modules)
        for name, child in model.named_children():
            if isinstance(child, TaskBatchNorm2d):
                bn = nn.BatchNorm2d(
                    child.weight.numel(), eps=child.eps, track_running_stats=False
                ).to(child.weight.device, child.weight.dtype)
                bn.weight, bn.bias = child.weight, child.bias  # the same Parameters
                twin._modules[name] = bn
            else:
                twin._modules[name] = with_torch_batch_norm(child)
        _TWINS[model] = twin
    return twin


def reference_meta_gradient(model: nn.Module, batch: TaskBatch, s: Setting, first_order: bool):
    """learn2learn-style: clone the module per task, adapt it, backward the task's query loss;
    on ``model`` with torch's batch norm (``with_torch_batch_norm``)."""
    model = with_torch_batch_norm(model)
    if s.algorithm == "reptile":
        return reference_reptile(model, batch, s)
    loss_fn = nn.functional.cross_entropy
    n = batch.num_tasks
    scale = s.ways if s.normalization == "tf_maml" else 1  # the original code's normalisation
    for xs, ys, xq, yq in zip(*batch, strict=True):
        learner = _clone(model)
        for _ in range(s.inner_steps):
            params = [p for _, p in _named_tensors(learner)]
            loss = loss_fn(learner(xs), ys) * scale
            grads = torch.autograd.grad(loss, params, create_graph=not first_order)
            _update(learner, [p - s.inner_lr * g for p, g in zip(params, grads, strict=True)])
        (loss_fn(learner(xq), yq) * scale / n).backward()


def reference_reptile(model: nn.Module, batch: TaskBatch, s: Setting) -> None:
    """Reptile as learn2learn's example writes it: per task, a copy of the model trained by
    a fresh ``torch.optim.Adam`` (β1 = 0, as Nichol et al.) on the task's examples, support
    and query together (transduction, as the preset); ``.grad`` = θ − mean φ."""
    n = batch.num_tasks
    total = [torch.zeros_like(p) for p in model.parameters()]
    for xs, ys, xq, yq in zip(*batch, strict=True):
        learner = copy.deepcopy(model)
        adam = torch.optim.Adam(learner.parameters(), lr=s.inner_lr, betas=(0.0, 0.999))
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        for _ in range(s.inner_steps):
            adam.zero_grad()
            nn.functional.cross_entropy(learner(x), y).backward()
            adam.step()
        for t, p, q in zip(total, model.parameters(), learner.parameters(), strict=True):
            t += (p.detach() - q.detach()) / n
    for p, t in zip(model.parameters(), total, strict=True):
        p.grad = t if p.grad is None else p.grad + t


def _clone(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    originals = dict(model.named_parameters())
    for name, module in clone.named_modules():
        for key, value in list(module._parameters.items()):
            if value is None:  # a layer without it (ResNet-12's bias-free convolutions)
                continue
            full = f"{name}.{key}" if name else key
            del module._parameters[key]
            setattr(module, key, originals[full].clone())  # differentiable w.r.t. the original
    return clone


def _named_tensors(module: nn.Module):
    for name, sub in module.named_modules():
        for key, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and value.requires_grad:
                yield f"{name}.{key}", value


def _update(module: nn.Module, new: list[torch.Tensor]) -> None:
    targets = [
        (sub, key)
        for _, sub in module.named_modules()
        for key, v in vars(sub).items()
        if isinstance(v, torch.Tensor) and v.requires_grad
    ]
    for (sub, key), value in zip(targets, new, strict=True):
        setattr(sub, key, value)


def mamlrun_step(algo: MAML, mode: str):
    """One meta-gradient into ``model``'s ``.grad``; for MAML++ through the meta-model that
    adds its learned rates and per-step batch-norm weights (made per call: their cost counts)."""

    bound = algo.bind("classification", mode)

    def step(model: nn.Module, batch: TaskBatch, s: Setting, first_order: bool) -> None:
        backward(bound.meta_objective(algo.meta_model(model), batch, None))

    return step


def make_algo(s: Setting, first_order: bool, checkpoint_inner: bool = False) -> MAML:
    if s.algorithm == "reptile":  # first order by definition, loss normalisation its own
        return config.algorithm("reptile", inner_lr=s.inner_lr, inner_steps=s.inner_steps)
    return config.algorithm(
        s.algorithm,
        inner_lr=s.inner_lr,
        inner_steps=s.inner_steps,
        first_order=first_order,
        loss_normalization=s.normalization,
        checkpoint_inner=checkpoint_inner,
    )


def algorithm_node(s: Setting, first_order: bool):
    """The setting's ``meta_optimizer`` as a run composes it (``max_memory`` included), for
    ``auto_batching``'s candidates and bound."""
    node = config.group_config("meta_optimizer", s.algorithm)
    changes = {"inner_lr": s.inner_lr, "inner_steps": s.inner_steps}
    if s.algorithm != "reptile":
        changes |= {"first_order": first_order, "loss_normalization": s.normalization}
    return OmegaConf.merge(node, changes)


def flat_grad(model: nn.Module) -> torch.Tensor:
    """Every parameter's gradient in one vector (zeros where it has none)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return torch.cat([g.flatten() for g in grads])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def bench_setting(s, first_order, query, device, repeats, all_modes=False):
    """Time the reference and mamlrun (the mode ``auto`` picks, as a training run would, and
    with ``all_modes`` every other mode ``auto`` considered), interleaved, after checking in
    float64 that they all compute the same meta-gradient."""
    torch.manual_seed(0)
    model = build_model(s, device)
    batch = make_batch(s, query, device)
    algo = make_algo(s, first_order)

    steps = {}  # candidate -> one meta-gradient, as auto_batching names them

    def step_of(name: str):
        if name not in steps:
            recomputes = name.endswith(auto_batching.RECOMPUTED)
            variant = make_algo(s, first_order, recomputes) if recomputes else algo
            steps[name] = mamlrun_step(variant, name.removesuffix(auto_batching.RECOMPUTED))
        return steps[name]

    def one_step(name: str) -> None:
        model.zero_grad(set_to_none=True)
        step_of(name)(model, batch, s, first_order)

    node = algorithm_node(s, first_order)
    modes = auto_batching.candidates(algo.batching_modes, node, s.meta_batch, device)
    probe = auto_batching.measure(modes, one_step, device)
    choice = auto_batching.pick(probe, node.max_memory, None)  # the YAML's default bound
    chosen = choice.chosen.name
    engines = {"reference": reference_meta_gradient, "mamlrun": step_of(chosen)}
    batching = {"reference": "loop", "mamlrun": chosen}
    recomputed_loop = "loop" + auto_batching.RECOMPUTED
    if not first_order and s.name not in PRESETS and not (all_modes and recomputed_loop in modes):
        batching["mamlrun+ckpt"] = recomputed_loop
        engines["mamlrun+ckpt"] = step_of(recomputed_loop)
    for mode in modes if all_modes else []:
        if mode != chosen:
            batching[f"mamlrun[{mode}]"] = mode
            engines[f"mamlrun[{mode}]"] = step_of(mode)

    rel = same_meta_gradient(engines, model, batch, s, first_order)

    seconds = {name: [] for name in engines}
    for _ in range(repeats):  # interleaved A B A B: drift on the machine hits both alike
        for name, fn in engines.items():
            model.zero_grad(set_to_none=True)
            sync(device)
            t = time.perf_counter()
            fn(model, batch, s, first_order)
            sync(device)
            seconds[name].append(time.perf_counter() - t)
    flops = count_flops(lambda: engines["reference"](model, batch, s, first_order))
    rows = {}
    for name in engines:
        median = statistics.median(seconds[name])
        rows[name] = {
            "tasks_per_s": s.meta_batch / median,
            "seconds": median,
            "gflops": flops / median / 1e9,
        }
    return rows, rel, batching, probe, choice


def same_meta_gradient(engines, model, batch, s: Setting, first_order: bool) -> float:
    """The largest relative difference between an engine's meta-gradient and the reference's,
    in float64 so that float32 rounding (amplified by the large inner steps) cannot hide or
    fake a difference; stops the benchmark above 1e-8. A setting with ``check_query`` is
    checked on one task with that many query images per class instead of the timed batch."""
    if s.check_query is not None:
        s = replace(s, meta_batch=1)
        batch = make_batch(s, s.check_query, batch.x_support.device)
    model64, batch64 = (
        copy.deepcopy(model).double(),
        TaskBatch(*(t.double() if t.is_floating_point() else t for t in batch)),
    )
    grads = {}
    for name, fn in engines.items():
        model64.zero_grad(set_to_none=True)
        fn(model64, batch64, s, first_order)
        grads[name] = flat_grad(model64)
    ref = grads.pop("reference")
    if s.algorithm == "mamlpp":
        # learn2learn has no MAML++: the reference is MAML on the same network and tasks, which
        # adapts the batch-norm weights that MAML++ meta-learns per step instead, so the two
        # differ by design. mamlrun's modes must still agree with each other.
        first = grads.pop(next(iter(grads)))
        grads, ref = grads or {"one mode": first}, first
    rel = max(float((g - ref).norm() / ref.norm()) for g in grads.values())
    if rel > 1e-8:
        raise SystemExit(f"{s.name}: meta-gradients differ (relative {rel:.2e}); not timing")
    return rel


def sampling_seconds(s: Setting, query: int, device: torch.device, repeats: int) -> float:
    """Median time for mamlrun's task source to draw one meta-batch of this setting.

    Omniglot-shaped settings use ``OmniglotTasks`` on a synthetic stand-in of the preprocessed
    dataset (1,623 characters × 20 drawings, random pixels), miniImageNet-shaped ones
    ``EpisodicImages`` on random uint8 images (64 training classes of 20 images), so that no
    download is needed: sampling is indexing, whose cost depends on the shapes only.
    """
    if s.image != (1, 28, 28):
        tasks = _episodic_stand_in(s, query, device)
    else:
        tasks = _omniglot_stand_in(s, query, device)
    g = torch.Generator(device=device).manual_seed(0)
    tasks.sample("train", s.meta_batch, g)
    times = []
    for _ in range(max(repeats, 5)):
        sync(device)
        t = time.perf_counter()
        tasks.sample("train", s.meta_batch, g)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _episodic_stand_in(s: Setting, query: int, device: torch.device):
    from mamlrun.data.episodic import EpisodicImages
    from mamlrun.data.u8cache import ImageSplit

    channels, height, width = s.image
    per_class = max(20, s.shots + query)

    def split(classes: int) -> ImageSplit:
        shape = (classes * per_class, height, width, channels)
        images = torch.randint(0, 256, shape, dtype=torch.uint8)
        return ImageSplit(images, [per_class] * classes, [f"c{i}" for i in range(classes)])

    splits = {"train": split(64), "val": split(s.ways), "test": split(s.ways)}
    mean, std = [0.5] * channels, [0.25] * channels
    return EpisodicImages(
        "stand-in", splits, ways=s.ways, shots=s.shots, query=query, storage="device",
        mean=mean, std=std, device=device, augment=False, crop_padding=0,
    )  # fmt: skip


def _omniglot_stand_in(s: Setting, query: int, device: torch.device):
    from mamlrun.data import omniglot

    characters = 964 + 659
    names = [f"A{i // 20:03d}/character{i % 20 + 1:02d}" for i in range(characters)]
    sources = [omniglot.SETS[0]] * 964 + [omniglot.SETS[1]] * 659
    images = torch.randint(0, 256, (characters, omniglot.DRAWINGS, 28, 28), dtype=torch.uint8)
    data = omniglot.OmniglotData(images, names, sources, {})
    original = omniglot.load_omniglot
    omniglot.load_omniglot = lambda root, image_size: data
    try:
        return omniglot.OmniglotTasks(
            root=None, ways=s.ways, shots=s.shots, query=query, split="maml", split_seed=0,
            rotations=True, image_size=28, device=device, storage="device",
        )  # fmt: skip
    finally:
        omniglot.load_omniglot = original


def peak_memory(
    engine: str, setting: str, first_order: bool, query: int, device: str
) -> tuple[float, float]:
    """MiB of peak memory growth for one cold meta-gradient, measured in a fresh process.

    ``engine`` is ``reference`` or mamlrun's mode (``loop``, ``vmap:8``, ...), with
    ``+checkpoint_inner`` for inner-loop checkpointing.
    """
    args = [
        sys.executable,
        __file__,
        "--memory-probe",
        engine,
        "--configs",
        setting,
        "--query",
        str(query),
        "--device",
        device,
    ]
    if first_order:
        args.append("--first-order-probe")
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    rss, _, heap = out.stdout.strip().splitlines()[-1].partition(" ")
    return float(rss), float(heap or "nan")


def memory_probe(args) -> None:
    device = torch.device(args.device)
    s = SETTINGS[args.configs[0]]
    torch.manual_seed(0)
    model = build_model(s, device)
    batch = make_batch(s, args.query, device)
    if args.memory_probe == "reference":
        fn = reference_meta_gradient
    else:
        mode = args.memory_probe.removesuffix(auto_batching.RECOMPUTED)
        recomputes = mode != args.memory_probe
        fn = mamlrun_step(make_algo(s, args.first_order_probe, recomputes), mode)
    if device.type == "cuda":
        fn(model, batch, s, args.first_order_probe)  # warm-up: allocator caches, lazy init
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(model, batch, s, args.first_order_probe)
        print((torch.cuda.max_memory_allocated(device) - base) / 2**20)  # allocated, no RSS
    else:
        # A cold call for every engine: after a warm-up the CPU allocator keeps freed pages, so
        # a second call's growth says more about allocator reuse than about the engine.
        base = rss_bytes(), heap_bytes()
        with PeakMemory() as peak:
            fn(model, batch, s, args.first_order_probe)
        print((peak.rss - base[0]) / MIB, (peak.heap - base[1]) / MIB)


def shown(mode: str) -> str:
    """A candidate's name as the table shows it (``+checkpoint_inner`` is ``+ckpt``)."""
    return mode.replace(auto_batching.RECOMPUTED, "+ckpt")


def setting_rows(name: str, order: str, args, device: torch.device, peak: float) -> list[dict]:
    """Time (and measure) every engine on one setting and order; print a line for each, and
    the line of issue 26's targets (``targets``)."""
    s, first_order, out = SETTINGS[name], order == "first", []
    query = s.query or args.query
    rows, rel, batching, probe, choice = bench_setting(
        s, first_order, query, device, args.repeats, args.all_modes
    )
    sample_s = sampling_seconds(s, query, device, args.repeats)
    mem = {}
    for engine in [] if args.no_memory else rows:
        how = "reference" if engine == "reference" else batching[engine]
        mem[engine] = peak_memory(how, name, first_order, query, args.device)
    ref = rows["reference"]
    for engine, row in rows.items():
        ratio = row["tasks_per_s"] / ref["tasks_per_s"]
        rss, heap = mem.get(engine, (float("nan"), float("nan")))
        heap_ratio = _peak(mem, engine) / _peak(mem, "reference") if mem else float("nan")
        engine_name = f"{engine}*" if engine == "mamlrun" else engine  # * what auto picked
        sampling = 100 * sample_s / (row["seconds"] + sample_s)
        print(
            f"{name:<22}{order:<8}{shown(engine_name):<24}{shown(batching[engine]):<14}"
            f"{row['tasks_per_s']:>9.2f}{ratio:>7.2f}{row['gflops']:>9.1f}"
            f"{100 * row['gflops'] / peak:>6.0f}%"
            f"{heap:>9.0f}{heap_ratio:>7.2f}{rss:>8.0f}{sampling:>8.2f}%",
            flush=True,
        )
        out.append(
            {
                "config": name,
                "order": order,
                "engine": engine,
                "batching": batching[engine],
                **row,
                "ratio": ratio,
                "peak_heap_mib": heap,
                "heap_ratio": heap_ratio,
                "peak_rss_mib": rss,
                "sampling_seconds": sample_s,
                "sampling_share": sampling / 100,
                "grad_rel_diff": rel,
                "probe": [vars(m) for m in probe],
                "auto_reason": choice.reason,
            }
        )
    if mem:
        out[0]["targets"] = targets(out, peak)
    return out


def _peak(mem: dict, engine: str) -> float:
    """An engine's peak: the heap's growth on a CPU, the allocated bytes on CUDA (which the
    probe prints alone, in the RSS column)."""
    rss, heap = mem[engine]
    return rss if math.isnan(heap) else heap


#: Issue 26's memory bound for the speed target: at most this times the reference's peak.
WITHIN = 1.25


def targets(rows: list[dict], peak: float) -> dict:
    """What issue 26's targets read off one setting's rows: the fastest mode within
    ``WITHIN`` x the reference's peak and the fastest unbounded, with their speed ratios and
    shares of the matmul FLOP/s, and ``auto``'s memory-bounded pick; printed as one line."""
    ours = [r for r in rows if r["engine"] != "reference"]
    bounded = [r for r in ours if r["heap_ratio"] <= WITHIN]
    best = max(bounded, key=lambda r: r["ratio"], default=None)
    fastest = max(ours, key=lambda r: r["ratio"])
    auto = next(r for r in ours if r["engine"] == "mamlrun")

    def cell(r: dict | None) -> str:
        if r is None:
            return "none"
        share = 100 * r["gflops"] / peak
        return (
            f"{shown(r['batching'])} {r['ratio']:.2f}x (memory {r['heap_ratio']:.2f}x, "
            f"{share:.0f}% of matmul)"
        )

    print(
        f"  targets: within {WITHIN}x the reference's memory: {cell(best)}; unbounded: "
        f"{cell(fastest)}; auto (max_memory=2x_loop): {cell(auto)}",
        flush=True,
    )
    keys = ("batching", "ratio", "heap_ratio", "gflops")
    return {
        "within": {k: best[k] for k in keys} if best else None,
        "unbounded": {k: fastest[k] for k in keys},
        "auto": {k: auto[k] for k in keys},
        "matmul_gflops": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(SETTINGS))
    parser.add_argument(
        "--orders", nargs="+", default=["second", "first"], choices=["second", "first"]
    )
    parser.add_argument("--query", type=int, default=15, help="query images per class")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--presets",
        action="store_true",
        help="every preset's own workload (PRESETS), in its own order (sets --configs, --orders)",
    )
    parser.add_argument(
        "--all-modes", action="store_true",
        help="also time every task batching auto considered, not only the one it picked",
    )  # fmt: skip
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--first-order-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args)

    device = torch.device(args.device)
    peak = matmul_gflops(device)
    print(
        f"device {device} ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}; 2048² matmul {peak:.0f} GFLOP/s"
    )
    header = (
        f"{'config':<22}{'order':<8}{'engine':<24}{'batching':<14}{'tasks/s':>9}{'ratio':>7}"
        f"{'GFLOP/s':>9}{'%peak':>7}{'heap MiB':>9}{'ratio':>7}{'RSS MiB':>8}{'sample':>9}"
    )
    print(header)
    results = {
        "device": str(device),
        "torch": torch.__version__,
        "matmul_gflops": peak,
        "query": args.query,
        "rows": [],
    }
    configs = list(PRESETS) if args.presets else args.configs
    for name in configs:
        for order in [SETTINGS[name].order] if SETTINGS[name].order else args.orders:
            results["rows"] += setting_rows(name, order, args, device, peak)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
