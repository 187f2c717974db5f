"""bf16 against fp32 on this machine: how far the meta-gradient moves, and how long it takes.

    python scripts/bench_precision.py                        # CPU: conv4 and a small ResNet-12
    python scripts/bench_precision.py --device cuda --workloads conv4 resnet12 --repeats 5

For each workload it prints the cosine similarity between the bf16 and the fp32 meta-gradient
(``precision=bf16`` against ``precision=fp32``, same weights, same tasks) and, as the floor any
bf16 forward pass starts from, that of an fp32 meta-gradient taken with the weights rounded to
bfloat16 (what autocast does to every convolution's weights). Both are at initialisation,
where the meta-gradient is at its most sensitive (``tests/test_precision.py`` checks > 0.99
after 30 training steps). Then the median seconds per meta-gradient of each, timed
interleaved (fp32, bf16, fp32, ...) after one warm-up each, so drift on the machine hits both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from bench import MINI, SETTINGS, Setting, build_model, make_algo, make_batch, sync

from mamlrun.models.precision import choose
from mamlrun.training.episodes import backward

#: name -> (setting, query images per class): conv4 on the Omniglot 5-way 1-shot setting of
#: ``bench.py`` (one inner step of 0.4) with a meta-batch of 8, and ResNet-12s on one
#: miniImageNet-shaped task with 5 inner steps.
WORKLOADS = {
    "conv4": (replace(SETTINGS["5w1s"], meta_batch=8), 15),
    "resnet12-small": (Setting("resnet12-small", 5, 1, 1, 5, 0.01, "resnet12-small", MINI), 5),
    "resnet12": (replace(SETTINGS["mini-resnet12"], meta_batch=1), 15),
}


def meta_gradient(algo, model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    backward(algo.bind("classification", "loop").meta_objective(model, batch, None))
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def compare(name: str, device: torch.device, repeats: int) -> dict:
    """Cosine similarities and median seconds per meta-gradient for one workload."""
    s, query = WORKLOADS[name]
    torch.manual_seed(0)
    model, batch = build_model(s, device), make_batch(s, query, device)
    fp32_algo = make_algo(s, first_order=False)
    algos = {p: fp32_algo.with_precision(choose(p, device)) for p in ("fp32", "bf16")}
    grads = {p: meta_gradient(algo, model, batch) for p, algo in algos.items()}  # warm-ups
    rounded = build_model(s, device)
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    floor = meta_gradient(algos["fp32"], rounded, batch)
    cos = torch.nn.functional.cosine_similarity
    seconds = {p: [] for p in algos}
    for _ in range(repeats):
        for p, algo in algos.items():
            sync(device)
            start = time.perf_counter()
            meta_gradient(algo, model, batch)
            sync(device)
            seconds[p].append(time.perf_counter() - start)
    fp32_s, bf16_s = (statistics.median(seconds[p]) for p in ("fp32", "bf16"))
    return {
        "cosine": float(cos(grads["bf16"], grads["fp32"], dim=0)),
        "floor": float(cos(floor, grads["fp32"], dim=0)),
        "fp32_s": fp32_s,
        "bf16_s": bf16_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", nargs="+", default=["conv4", "resnet12-small"], choices=list(WORKLOADS)
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| workload | cos(bf16, fp32) | cos(rounded, fp32) | fp32 s | bf16 s | bf16 speed |")
    print("|---|---|---|---|---|---|")
    for name in args.workloads:
        r = compare(name, device, args.repeats)
        print(
            f"| {name} | {r['cosine']:.4f} | {r['floor']:.4f} | {r['fp32_s']:.2f} | "
            f"{r['bf16_s']:.2f} | {r['fp32_s'] / r['bf16_s']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
