#!/usr/bin/env python
"""One convolution layer of a preset, timed the way second-order MAML uses it, three ways:
a per-task loop of ``F.conv2d``, ``vmap`` of ``F.conv2d`` (a grouped convolution over the
tasks once the weights are per task), and ``vmap`` of im2col (``F.unfold``) + one batched
matrix multiply (``einsum``). Issue 26, item 2: which one to run under ``task_batching=vmap``.

    python scripts/bench_conv.py [--repeats 5] [--layers omniglot_20w5s/1 ...] [--json f]
    python scripts/bench_conv.py --presets omniglot_5w1s mini-conv4 [--repeats 3]

Each timed call is one meta-batch of the layer's part of a MAML step with per-task weights
(the case after inner step 0): support forward, its backward with ``create_graph`` (weight
and input gradients, as an inner layer needs), a query forward at the adapted weights, and
the outer backward through all of it (the query backward plus the double backward of the
support pass). The three are timed interleaved (A B C A B C) in one process and reported as
medians and as ratios to the loop: the machine is shared, so only ratios mean anything.

``--presets`` times whole meta-gradients of ``scripts/bench.py``'s settings instead: mamlrun
under ``task_batching=vmap`` with ``TaskConv2d`` taking the matrix multiply on no layer (the
grouped convolution, as before issue 26), on layers of at most 3 input channels (on Omniglot
the same as the default, 1: the first layer), and on every layer, beside ``loop``. Before
timing, each one's float64 meta-gradient (2 tasks) is checked equal to the loop's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from mamlrun.models.layers import TaskConv2d


@dataclass(frozen=True)
class Layer:
    """One convolution of a preset's backbone and the images one task sends through it."""

    name: str
    tasks: int
    support: int
    query: int
    c_in: int
    c_out: int
    size: int
    stride: int
    kernel: int = 3


def _omniglot(preset: str, ways: int, shots: int, query: int, tasks: int) -> list[Layer]:
    """conv4-64, stride-2 convolutions on 28×28 (sizes 28, 14, 7, 4)."""
    ins = [(1, 28), (64, 14), (64, 7), (64, 4)]
    return [
        Layer(f"{preset}/{i + 1}", tasks, ways * shots, ways * query, c, 64, s, 2)
        for i, (c, s) in enumerate(ins)
    ]


def _mini() -> list[Layer]:
    """conv4-32 with 2×2 max-pooling on 84×84 (sizes 84, 42, 21, 10), 5w1s, 15 query."""
    ins = [(3, 84), (32, 42), (32, 21), (32, 10)]
    return [
        Layer(f"miniimagenet_5w1s/{i + 1}", 4, 5, 75, c, 32, s, 1) for i, (c, s) in enumerate(ins)
    ]


def _resnet12() -> list[Layer]:
    """The first 3×3 convolution of each ResNet-12 block (64-160-320-640) on 84×84, 5w1s,
    meta-batch 4, 15 query images (inputs 84, 42, 21, 10)."""
    ins = [(3, 64, 84), (64, 160, 42), (160, 320, 21), (320, 640, 10)]
    return [
        Layer(f"resnet12_5w1s/{i + 1}", 4, 5, 75, c, o, s, 1) for i, (c, o, s) in enumerate(ins)
    ]


LAYERS = {
    layer.name: layer
    for layer in [
        *_omniglot("omniglot_5w1s", 5, 1, 1, 32),
        *_omniglot("omniglot_5w5s", 5, 5, 5, 32),
        *_omniglot("omniglot_20w1s", 20, 1, 1, 16),
        *_omniglot("omniglot_20w5s", 20, 5, 5, 16),
        *_mini(),
        *_resnet12(),
    ]
}


def conv_unfold(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``F.conv2d`` (no bias) as ``F.unfold`` (im2col) + one matrix multiply, for ONE task.
    Measured once, not timed by default: torch's CPU im2col spent 85% of the time (profile
    of omniglot_20w5s/2, docs/PERFORMANCE.md)."""
    n, k = x.shape[0], w.shape[-1]
    cols = F.unfold(x, k, padding=padding, stride=stride)  # (n, C·k·k, L)
    out = torch.einsum("ok,nkl->nol", w.flatten(1), cols)
    size = (x.shape[-1] + 2 * padding - k) // stride + 1
    return out.reshape(n, w.shape[0], -1, size)


def conv_gathered(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``F.conv2d`` (no bias) as im2col by one ``index_select`` + one matrix multiply, for ONE
    task: under ``vmap`` with a per-task weight the multiply is one ``bmm`` over tasks,
    (O × C·k·k) @ (C·k·k × pixels·images) each. (k·k strided slices stacked into columns
    instead were 1.5× slower than this: their backward is k·k zero-filled slice backwards.)"""
    n, k = x.shape[0], w.shape[-1]
    xp = F.pad(x, [padding] * 4)
    h, wd = xp.shape[-2:]
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    rows = torch.arange(k)[:, None] + stride * torch.arange(ho)[None]  # (k, ho)
    cols = torch.arange(k)[:, None] + stride * torch.arange(wo)[None]  # (k, wo)
    idx = (rows[:, None, :, None] * wd + cols[None, :, None, :]).flatten()  # (k, k, ho, wo)
    flat = xp.flatten(-2).permute(1, 2, 0)  # (C, H·W, n)
    cols_ = flat.index_select(1, idx.to(x.device)).flatten(0, 1)  # (C·k·k... )
    cols_ = cols_.reshape(w.shape[1] * k * k, ho * wo * n)
    return (w.flatten(1) @ cols_).unflatten(1, (ho, wo, n)).permute(3, 0, 1, 2)


def task_loss(conv: Callable, grad: Callable, layer: Layer) -> Callable:
    """One task's outer loss through the layer: per-task weight ``w``, input scale ``u`` (so
    the inner backward computes the input gradient too), one inner SGD step, query loss."""

    def support(w, u, xs):
        return conv(xs * u, w, layer.stride, 1).square().mean()

    def loss(w, u, xs, xq):
        gw, gu = grad(support, w, u, xs)
        return conv(xq * (u - 0.1 * gu), w - 0.1 * gw, layer.stride, 1).square().mean()

    return loss


def autograd_grad(f, w, u, xs):
    return torch.autograd.grad(f(w, u, xs), (w, u), create_graph=True)


def func_grad(f, w, u, xs):
    return torch.func.grad(f, argnums=(0, 1))(w, u, xs)


def make_inputs(layer: Layer, dtype: torch.dtype, seed: int = 0):
    """θ and the input scale (meta-parameters), per-task weight offsets, support and query."""
    g = torch.Generator().manual_seed(seed)
    t, c, s = layer.tasks, layer.c_in, layer.size
    theta = torch.randn(layer.c_out, c, layer.kernel, layer.kernel, generator=g, dtype=dtype)
    theta = (theta / (c * layer.kernel**2) ** 0.5).requires_grad_()
    u = torch.ones(c, 1, 1, dtype=dtype, requires_grad=True)
    offsets = 1 + 0.1 * torch.randn(t, 1, 1, 1, 1, generator=g, dtype=dtype)
    xs = torch.randn(t, layer.support, c, s, s, generator=g, dtype=dtype)
    xq = torch.randn(t, layer.query, c, s, s, generator=g, dtype=dtype)
    return theta, u, offsets, xs, xq


def meta_step(way: str, layer: Layer, inputs) -> list[torch.Tensor]:
    """The meta-gradient (θ, u) of the summed task losses, computed ``way``."""
    theta, u, offsets, xs, xq = inputs
    weights = theta * offsets  # per task: what the weights are after inner step 0
    if way == "loop":
        fn = task_loss(lambda x, w, s, p: F.conv2d(x, w, stride=s, padding=p), autograd_grad, layer)
        total = sum(fn(weights[i], u, xs[i], xq[i]) for i in range(layer.tasks))
    else:
        convs = {"bmm": conv_gathered, "unfold": conv_unfold}
        conv = convs.get(way, lambda x, w, s, p: F.conv2d(x, w, None, s, p))
        fn = task_loss(conv, func_grad, layer)
        total = torch.func.vmap(fn, in_dims=(0, None, 0, 0))(weights, u, xs, xq).sum()
    return list(torch.autograd.grad(total, (theta, u)))


WAYS = ("loop", "grouped", "bmm")


def bench_layer(layer: Layer, repeats: int) -> dict:
    """Check the three ways agree (float64), then time them interleaved (float32)."""
    exact = make_inputs(layer, torch.float64)
    grads = {way: meta_step(way, layer, exact) for way in WAYS}
    error = max(
        float((a - b).abs().max() / b.abs().max())
        for way in WAYS[1:]
        for a, b in zip(grads[way], grads["loop"], strict=True)
    )
    inputs = make_inputs(layer, torch.float32)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for rep in range(repeats + 1):
        for way in WAYS:
            start = time.perf_counter()
            meta_step(way, layer, inputs)
            if rep:  # the first round warms up
                seconds[way].append(time.perf_counter() - start)
    median = {way: statistics.median(s) for way, s in seconds.items()}
    return {
        "layer": layer.name,
        "images": f"{layer.tasks}×({layer.support}+{layer.query})",
        "in": f"{layer.c_in}×{layer.size}²→{layer.c_out}/s{layer.stride}",
        "rel_error_vs_loop": error,
        **{f"{way}_ms": 1000 * median[way] for way in WAYS},
        "grouped_x_loop": median["grouped"] / median["loop"],
        "bmm_x_loop": median["bmm"] / median["loop"],
        "bmm_x_grouped": median["bmm"] / median["grouped"],
    }


#: ``TaskConv2d.MATMUL_MAX_IN_CHANNELS`` for each variant of ``--presets``.
POLICIES = {"grouped": 0, "bmm<=3ch": 3, "bmm-all": 10**6}


#: What ``--presets`` times (``--variants`` narrows it).
VARIANTS = ["loop", *(f"vmap {p}" for p in POLICIES)]


def _preset_step(name: str, dtype: torch.dtype, tasks: int | None = None) -> Callable:
    """``step(mode)``: one mamlrun meta-gradient of bench.py's setting ``name``; the flat
    gradient it leaves."""
    import bench  # scripts/bench.py: the settings, models and engines

    s = bench.SETTINGS[name]
    s = s if tasks is None else dataclasses.replace(s, meta_batch=tasks)
    torch.manual_seed(0)
    model = bench.build_model(s, torch.device("cpu")).to(dtype)
    batch = bench.make_batch(s, s.query or 15, torch.device("cpu"))
    batch = type(batch)(*(t.to(dtype) if t.is_floating_point() else t for t in batch))
    first = (s.order or "second") == "first"
    steps = {m: bench.mamlrun_step(bench.make_algo(s, first), m) for m in ("loop", "vmap")}

    def step(mode: str) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        steps[mode](model, batch, s, first)
        return bench.flat_grad(model)

    return step


def bench_preset(name: str, repeats: int) -> dict:
    """The policies' float64 agreement with the loop, then their seconds, interleaved."""
    default = TaskConv2d.MATMUL_MAX_IN_CHANNELS
    exact = _preset_step(name, torch.float64, tasks=2)
    loop = exact("loop")
    error = 0.0
    for limit in POLICIES.values():
        TaskConv2d.MATMUL_MAX_IN_CHANNELS = limit
        error = max(error, float((exact("vmap") - loop).abs().max() / loop.abs().max()))
    step = _preset_step(name, torch.float32)
    variants = {"loop": ("loop", 3), **{f"vmap {p}": ("vmap", c) for p, c in POLICIES.items()}}
    variants = {v: how for v, how in variants.items() if v in VARIANTS}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(repeats + 1):
        for variant, (mode, limit) in variants.items():
            TaskConv2d.MATMUL_MAX_IN_CHANNELS = limit
            start = time.perf_counter()
            step(mode)
            if rep:
                seconds[variant].append(time.perf_counter() - start)
    TaskConv2d.MATMUL_MAX_IN_CHANNELS = default
    median = {v: statistics.median(t) for v, t in seconds.items()}
    return {"preset": name, "rel_error_vs_loop": error, **{f"{v}_s": t for v, t in median.items()}}


def print_presets(names: list[str], repeats: int) -> list[dict]:
    """One row per preset: each variant's seconds per meta-gradient (× vmap grouped)."""
    print("| preset | " + " | ".join(f"{v} s (× grouped)" for v in VARIANTS) + " | f64 error |")
    print("|---|" + "---|" * (len(VARIANTS) + 1))
    rows = []
    for name in names:
        r = bench_preset(name, repeats)
        rows.append(r)
        assert r["rel_error_vs_loop"] < 1e-10, r
        base = r.get("vmap grouped_s", 1.0)
        cells = [f"{r[v + '_s']:.2f} ({r[v + '_s'] / base:.2f})" for v in VARIANTS]
        print(f"| {name} | " + " | ".join(cells) + f" | {r['rel_error_vs_loop']:.1e} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", default=[n for n in LAYERS if "resnet" not in n])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--presets", nargs="+", default=None, help="bench.py settings")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    args = parser.parse_args()
    VARIANTS[:] = args.variants
    if args.presets:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        rows = print_presets(args.presets, args.repeats)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms (median)")
    print(
        "| layer | images | conv | loop | grouped | bmm | grouped/loop | bmm/loop | bmm/grouped |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.layers:
        r = bench_layer(LAYERS[name], args.repeats)
        rows.append(r)
        assert r["rel_error_vs_loop"] < 1e-10, r
        print(
            f"| {r['layer']} | {r['images']} | {r['in']} | {r['loop_ms']:.1f} | "
            f"{r['grouped_ms']:.1f} | {r['bmm_ms']:.1f} | {r['grouped_x_loop']:.2f} | "
            f"{r['bmm_x_loop']:.2f} | **{r['bmm_x_grouped']:.2f}** |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
