"""Peak memory of one second-order miniImageNet-shaped task, with and without checkpoint_inner.

The workload is the one MAML's memory is known for: a 5-way 1-shot task of 84×84×3 images,
15 query images per class, 5 inner steps, second order, one task. It is run for conv4 with 32
filters (the MAML paper's miniImageNet network: max-pooling, flattened head) and for
MetaOptNet's ResNet-12 (64-160-320-640), each with ``checkpoint_inner`` off and on.

    python scripts/memory.py                                  # the whole table, CPU
    python scripts/memory.py --models resnet12 --query 5      # fewer query images
    python scripts/memory.py --device cuda --precision bf16 --json memory_cuda.json
    python scripts/memory.py --inner-steps 1 5 10 20      # iMAML against MAML, by inner steps

``--inner-steps`` measures another table: one Omniglot 5-way 1-shot meta-batch (the MAML
paper's conv4 with 64 filters, 28×28 images, ``--query`` query images per class, default 1
as in the iMAML paper's tasks, meta-batch 4, tasks one at a time) at each number of inner
steps, for second-order MAML, MAML with ``checkpoint_inner`` and iMAML (its YAML's λ and CG
steps, inner rate 0.1), each a fresh process. There torch.func is warmed up on a toy function
before the measurement, for every row: its one-time set-up (about 20 MiB of heap on first
use) is not per task, and iMAML uses torch.func even one task at a time.

Every measurement is one cold meta-gradient in a fresh process, so no allocator cache carried
over from another one can hide memory. On CPU it reports the growth of the kernel's peak RSS
(``VmHWM`` of ``/proc/self/status``, reset to the current RSS just before the meta-gradient
through ``/proc/self/clear_refs``) and of the bytes malloc has handed out (glibc's
``mallinfo2``, polled every millisecond, as ``bench.py``); on CUDA the growth of
``torch.cuda.max_memory_allocated`` over a second meta-gradient (the first warms cuDNN up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench import SETTINGS, build_model, make_algo, make_batch, mamlrun_step, sync

from mamlrun import config
from mamlrun.training.memory import MIB, PeakMemory

#: Table rows: name -> the ``bench.py`` setting whose network it uses.
MODELS = {"conv4-32": "mini-conv4", "resnet12": "mini-resnet12"}
#: The ``--inner-steps`` table's workload and algorithms (name -> (algorithm, checkpoint_inner)).
BY_STEPS = "5w1s"
ALGORITHMS = {"maml": ("maml", False), "maml+checkpoint_inner": ("maml", True),
              "imaml": ("imaml", False)}  # fmt: skip


def probe(model_name: str, checkpoint: bool, query: int, device: str, precision: str,
          algorithm: str = "maml", steps: int | None = None) -> dict:  # fmt: skip
    """One cold second-order meta-gradient of one task in this process (of a meta-batch of 4
    for ``steps``, the ``--inner-steps`` table): peak MiB and seconds."""
    from mamlrun.models.precision import choose

    device = torch.device(device)
    if steps is None:
        s = replace(SETTINGS[MODELS[model_name]], meta_batch=1)
    else:
        s = replace(SETTINGS[BY_STEPS], meta_batch=4, inner_steps=steps)
    torch.manual_seed(0)
    model = build_model(s, device)
    batch = make_batch(s, query, device)
    if algorithm == "imaml":
        algo = config.algorithm("imaml", inner_lr=0.1, inner_steps=steps)
    else:
        algo = make_algo(s, first_order=False, checkpoint_inner=checkpoint)
    step = mamlrun_step(algo.with_precision(choose(precision, device)), "loop")
    if steps is not None:
        _warm_up_torch_func(device)
    if device.type == "cuda":
        step(model, batch, s, False)  # warm-up: cuDNN's algorithm search, lazy initialisation
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step(model, batch, s, False)
        sync(device)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return {"allocated_mib": peak, "seconds": seconds}
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)
    start = time.perf_counter()
    with PeakMemory() as peak:
        step(model, batch, s, False)
    seconds = time.perf_counter() - start
    rss = (_status_kib("VmHWM") - base) / 1024
    return {"rss_mib": rss, "heap_mib": peak.heap_growth / MIB, "seconds": seconds}


def _warm_up_torch_func(device: torch.device) -> None:
    """torch.func's one-time set-up (its transforms' tables, built on first use, about 20 MiB
    of heap here) before the measurement, for every algorithm alike: it is not per task."""
    x = torch.ones(3, device=device, requires_grad=True)
    _, vjp = torch.func.vjp(torch.func.grad(lambda t: (t.sin() ** 2).sum()), x)
    vjp(torch.ones_like(x))
    torch.func.vmap(torch.func.grad(lambda t: t.square().sum()))(torch.ones(2, 3, device=device))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(model_name: str, checkpoint: bool, args, algorithm="maml", steps=None) -> dict:
    """``probe`` in a fresh subprocess (this script with ``--probe``)."""
    command = [sys.executable, __file__, "--probe", model_name, "--query", str(args.query)]
    command += ["--device", args.device, "--precision", args.precision]
    command += ["--algorithm", algorithm] + ([] if steps is None else ["--steps", str(steps)])
    if checkpoint:
        command.append("--checkpoint-inner")
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{model_name} (checkpoint_inner={checkpoint}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--query", type=int, default=15, help="query images per class")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--json", default=None, help="write the rows here too")
    parser.add_argument(
        "--inner-steps", type=int, nargs="+", default=None,
        help="the iMAML against MAML table at these numbers of inner steps",
    )  # fmt: skip
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", default="maml", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        row = probe(args.probe, args.checkpoint_inner, args.query, args.device, args.precision,
                    args.algorithm, args.steps)  # fmt: skip
        print(json.dumps(row))
        return

    rows = by_steps(args) if args.inner_steps else table(args)
    if args.json:
        meta = {"device": args.device, "torch": torch.__version__, "query": args.query}
        meta["precision"] = args.precision
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2))


def table(args) -> list[dict]:
    """Measure every (model, checkpoint_inner) pair; print the table as markdown rows."""
    cuda = args.device.startswith("cuda")
    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"precision {args.precision}; 5-way 1-shot, 84x84x3, {args.query} query images per "
        "class, 5 inner steps, second order, one task"
    )
    memory = "allocated MiB" if cuda else "heap MiB | RSS MiB"
    print(f"| model | checkpoint_inner | {memory} | ratio | s per meta-gradient |")
    print("|---|---|---|---|---|" + ("" if cuda else "---|"))
    key = "allocated_mib" if cuda else "heap_mib"
    rows = []
    for model_name in args.models:
        for checkpoint in (False, True):
            row = {"model": model_name, "checkpoint_inner": checkpoint}
            row |= measure(model_name, checkpoint, args)
            rows.append(row)
            ratio = row[key] / rows[-2 if checkpoint else -1][key]
            shown = f"{row[key]:.0f}" if cuda else f"{row[key]:.0f} | {row['rss_mib']:.0f}"
            print(
                f"| {model_name} | {str(checkpoint).lower()} | {shown} | {ratio:.2f} | "
                f"{row['seconds']:.1f} |",
                flush=True,
            )
    return rows


def by_steps(args) -> list[dict]:
    """Every (algorithm, inner steps) pair of the ``--inner-steps`` table, as markdown rows."""
    cuda = args.device.startswith("cuda")
    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"precision {args.precision}; Omniglot 5-way 1-shot, conv4-64, 28x28x1, {args.query} "
        "query images per class, meta-batch 4, loop batching"
    )
    memory = "allocated MiB" if cuda else "heap MiB | RSS MiB"
    print(f"| algorithm | inner steps | {memory} | s per meta-gradient |")
    print("|---|---|---|---|" + ("" if cuda else "---|"))
    key, rows = ("allocated_mib" if cuda else "heap_mib"), []
    for name, (algorithm, checkpoint) in ALGORITHMS.items():
        for steps in args.inner_steps:
            row = {"algorithm": name, "inner_steps": steps}
            row |= measure(BY_STEPS, checkpoint, args, algorithm, steps)
            rows.append(row)
            shown = f"{row[key]:.0f}" if cuda else f"{row[key]:.0f} | {row['rss_mib']:.0f}"
            print(f"| {name} | {steps} | {shown} | {row['seconds']:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
