#!/usr/bin/env python
"""What the image data layer costs at full size: the sampling share of a ``miniimagenet_5w1s``
meta-iteration, and peak memory with a full-size miniImageNet and with tieredImageNet-sized
storage. No real data is needed: the splits are synthetic, in the published formats and sizes.

    OMP_NUM_THREADS=1 python scripts/bench_data.py [--dir DIR] [--iterations 5] [--keep]
    python scripts/bench_data.py --folder [--images 60000] [--dir DIR]

``--folder`` measures only ``dataset=images``: it writes a folder of ``--images`` 84×84 JPEGs
(100 classes, as miniImageNet's 60,000 images), then, in a fresh process, builds the ``.u8``
cache from it as ``mamlrun data prepare dataset=images`` does, and reports images per second
and the peak memory of the build (the builder and its decoding workers together, by
proportional set size, so pages they share are counted once), against the target of 1.5 GB.

1. writes ``DIR/miniimagenet/mini-imagenet-cache-{train,val,test}.pkl`` with the published
   class names and 600 random 84×84×3 images per class (38,400 / 9,600 / 12,000 images,
   1.27 GB) unless they are there, and deletes the cache built from them by an earlier run;
2. in a fresh process, builds the preset as ``train`` does, which writes the cache, times
   ``source.sample`` alone and whole meta-iterations (sample, second-order meta-gradient with
   the preset's 5 inner steps, Adam step), and reports the sampling share and that process's
   peak RSS; then the same in a second process, which starts from the cache the first wrote;
3. in another fresh process, samples tieredImageNet-sized storage (448,695 / 124,261 / 206,209
   images of 84×84×3, 9.5 GB for the training split alone) from sparse files as an image
   cache is sampled (mapped, each meta-batch's images read from the file with ``pread``),
   draws 200 meta-batches with ``storage=cpu`` and reports the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

TIERED = {"train": (351, 448_695), "val": (97, 124_261), "test": (160, 206_209)}


def write_miniimagenet(root: Path) -> None:
    from mamlrun.data.miniimagenet import SPLIT_CLASSES

    folder = root / "miniimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, classes in SPLIT_CLASSES.items():
        path = folder / f"mini-imagenet-cache-{split}.pkl"
        if path.is_file():
            continue
        images = rng.integers(0, 256, size=(600 * len(classes), 84, 84, 3), dtype=np.uint8)
        class_dict = {c: list(range(600 * i, 600 * (i + 1))) for i, c in enumerate(classes)}
        with path.open("wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)


def peak_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM`` where Linux has it. Not ``ru_maxrss``, which a
    child started by ``subprocess`` inherits from its parent: once this script's parent had
    written the 1.27 GB of pickles, every child reported its 1,777 MiB (2026-11-30)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_parts_mib() -> dict[str, float]:
    """The resident memory now, split into private (``RssAnon``: what must fit in RAM) and
    file-backed pages (``RssFile``: memory-mapped data, clean, dropped under pressure)."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            parts[key] = int(value.split()[0]) / 1024
    return parts


def watch_rss(every_s: float = 0.01) -> dict[str, float]:
    """The largest ``RssAnon`` and ``RssFile`` seen so far, kept up to date by a thread that
    polls them: the kernel's peak (``VmHWM``) is of their sum and cannot tell them apart."""
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}

    def poll() -> None:
        while True:
            for key, value in rss_parts_mib().items():
                peaks[key] = max(peaks[key], value)
            time.sleep(every_s)

    threading.Thread(target=poll, daemon=True).start()
    return peaks


def time_miniimagenet(root: Path, iterations: int) -> dict:
    """Run in a fresh process: build the preset as ``train`` does and time its parts."""
    from hydra import compose, initialize_config_dir

    from mamlrun import config
    from mamlrun.training.components import build
    from mamlrun.training.episodes import backward

    peaks = watch_rss()
    config.register_schemas()
    with initialize_config_dir(str(config.config_dir()), version_base="1.3"):
        cfg = compose("train", ["experiment=miniimagenet_5w1s", f"dataset.root={root}",
                                "meta_optimizer.task_batching=loop", "device=cpu"])  # fmt: skip
    start = time.perf_counter()
    parts = build(cfg, torch.device("cpu"), 0)
    load_s = time.perf_counter() - start
    load_peak = peak_rss_mib()  # reading the pickles and writing the cache, when it is built
    generator = torch.Generator().manual_seed(0)
    source, model = parts.source, parts.model
    algo = parts.algorithm.bind(source.task_type, "loop")
    optimizer = parts.make_optimizer(model.parameters())
    for _ in range(3):  # warm-up
        source.sample("train", cfg.meta_batch_size, generator)
    start = time.perf_counter()
    for _ in range(50):
        source.sample("train", cfg.meta_batch_size, generator)
    sample_s = (time.perf_counter() - start) / 50
    start = time.perf_counter()
    for step in range(iterations):
        batch = source.sample("train", cfg.meta_batch_size, generator)
        optimizer.zero_grad()
        backward(algo.meta_objective(model, batch, step))
        optimizer.step()
    iteration_s = (time.perf_counter() - start) / iterations
    return {"load_s": load_s, "sample_s": sample_s, "iteration_s": iteration_s,
            "sampling_share": sample_s / iteration_s, "load_peak_rss_mib": load_peak,
            "peak_rss_mib": peak_rss_mib(), "peak_anon_mib": peaks["RssAnon"],
            "peak_file_mib": peaks["RssFile"], **rss_parts_mib()}  # fmt: skip


def tiered_storage(directory: Path, batches: int = 200) -> dict:
    """Run in a fresh process: tieredImageNet-sized splits through the layer, as ``splits_of``
    cuts them from a cache: mapped as ``read_image_cache`` maps it, and knowing their place in
    the file, so that ``EpisodicImages`` reads each meta-batch's images with ``pread``."""
    from mamlrun.data.episodic import EpisodicImages
    from mamlrun.data.u8cache import ImageFile, ImageSplit, map_for_sampling

    peaks = watch_rss()
    splits = {}
    for split, (classes, images) in TIERED.items():
        path = directory / f"tiered_{split}.u8"
        with path.open("wb") as f:
            f.truncate(images * 84 * 84 * 3)  # sparse: no disk used, reads as zeros
        mapped = map_for_sampling(path, images * 84 * 84 * 3).view(images, 84, 84, 3)
        counts = [images // classes + (i < images % classes) for i in range(classes)]
        names = [f"{split}_{i}" for i in range(classes)]
        splits[split] = ImageSplit(mapped, counts, names, ImageFile(path, 0, 84 * 84 * 3))
    source = EpisodicImages(
        "tiered", splits, ways=5, shots=1, query=15, storage="cpu", mean=[0.5] * 3,
        std=[0.25] * 3, device="cpu", augment=False, crop_padding=0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(batches):
        source.sample("train", 4, generator)
    return {"batches": batches, "sample_s": (time.perf_counter() - start) / batches,
            "peak_rss_mib": peak_rss_mib(), "peak_anon_mib": peaks["RssAnon"],
            "peak_file_mib": peaks["RssFile"], **rss_parts_mib(),
            "train_split_gib": TIERED["train"][1] * 84 * 84 * 3 / 2**30}  # fmt: skip


def write_folder(root: Path, images: int, classes: int = 100) -> Path:
    """``images`` 84×84 JPEGs (quality 90, a colour gradient with noise, about a photo's size
    on disk) in ``classes`` class folders; kept when already there."""
    from PIL import Image

    folder = root / f"folder-{images}"
    if (folder / ".complete").is_file():
        return folder
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 84, dtype=np.float32)
    for i in range(images):
        c = i % classes
        d = folder / f"class{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.stack([ramp[:, None] + 0 * ramp, ramp[None, :] + 0 * ramp[:, None],
                         np.full((84, 84), 2.5 * c)], -1)  # fmt: skip
        pixels = np.clip(base + rng.normal(0, 20, (84, 84, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{i:06d}.jpg", quality=90)
    (folder / ".complete").touch()
    return folder


def pss_mib(pid: int) -> float:
    """A process's proportional set size: its pages, each shared one divided among its users."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def watch_family_pss(every_s: float = 0.05) -> dict[str, float]:
    """The largest summed PSS of this process and its children (the decoding workers) seen so
    far, kept up to date by a daemon thread."""
    peak = {"pss": 0.0}
    me = os.getpid()

    def children() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(entry.name))
        return found

    def poll() -> None:
        while True:
            total = pss_mib(me) + sum(pss_mib(p) for p in children())
            peak["pss"] = max(peak["pss"], total)
            time.sleep(every_s)

    threading.Thread(target=poll, daemon=True).start()
    return peak


def build_folder_cache(folder: Path) -> dict:
    """In a fresh process (``--child folder``): the cache of ``folder`` built as a run builds
    it, timed, with the peak memory of the build."""
    from mamlrun import config
    from mamlrun.data import folders

    peak = watch_family_pss()
    settings = {**config.settings("dataset", "images"), "root": str(folder), "storage": "cpu"}
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    start = time.perf_counter()
    source = folders.images_tasks(**settings, device="cpu")
    seconds = time.perf_counter() - start
    time.sleep(0.2)  # one more reading of the watcher
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    images = sum(sum(c) for c in source.counts.values())
    return {"images": images, "seconds": seconds, "peak_pss_mib": peak["pss"],
            "builder_peak_rss_mib": peak_rss_mib(), "worker_peak_rss_mib": children,
            "cache": source.describe()["cache"]}  # fmt: skip


def folder_benchmark(root: Path, images: int) -> None:
    start = time.perf_counter()
    folder = write_folder(root, images)
    print(f"{images:,} JPEGs of 84×84 in {folder} (written in {time.perf_counter() - start:.0f} s)")
    env_cache = root / "xdg"
    shutil.rmtree(env_cache, ignore_errors=True)
    os.environ["XDG_CACHE_HOME"] = str(env_cache)
    built = in_child("--child", "folder", "--dir", str(folder))
    peak_gb = built["peak_pss_mib"] * 2**20 / 1e9
    verdict = "pass" if peak_gb <= 1.5 else "FAIL"
    print(f"built the cache of {built['images']:,} images in {built['seconds']:.1f} s: "
          f"{built['images'] / built['seconds']:,.0f} images/s, {os.cpu_count()} CPUs; peak "
          f"memory {peak_gb:.2f} GB (PSS of the builder and its workers; builder peak RSS "
          f"{built['builder_peak_rss_mib']:.0f} MiB, largest worker "
          f"{built['worker_peak_rss_mib']:.0f} MiB): {verdict} (target <= 1.5 GB)")  # fmt: skip
    again = in_child("--child", "folder", "--dir", str(folder))
    print(f"a second run, from the cache: {again['seconds']:.2f} s")


def in_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench_data.py: child {args[0]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where the synthetic data goes (default: temp)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--folder", action="store_true", help="only dataset=images' cache build")
    parser.add_argument("--images", type=int, default=60_000, help="JPEGs in the --folder test")
    parser.add_argument("--child", choices=["mini", "tiered", "folder"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "folder":
        print(json.dumps(build_folder_cache(args.dir)))
        return 0
    if args.folder:
        folder_benchmark(args.dir or Path(tempfile.mkdtemp(prefix="mamlrun-bench-data-")),
                         args.images)  # fmt: skip
        return 0
    if args.child == "mini":
        print(json.dumps(time_miniimagenet(args.dir, args.iterations)))
        return 0
    if args.child == "tiered":
        print(json.dumps(tiered_storage(args.dir)))
        return 0
    root = args.dir or Path(tempfile.mkdtemp(prefix="mamlrun-bench-data-"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, data in {root}")
    write_miniimagenet(root)
    (root / "miniimagenet" / "cache_84.u8").unlink(missing_ok=True)  # the first run builds it
    for run in ("first run, builds the cache", "later run, from the cache"):
        mini = in_child("--child", "mini", "--dir", str(root), "--iterations", str(args.iterations))
        print(f"miniimagenet_5w1s (38,400 training images), {run}: load {mini['load_s']:.1f} s, "
              f"sample {1000 * mini['sample_s']:.1f} ms, meta-iteration "
              f"{mini['iteration_s']:.2f} s, sampling share {100 * mini['sampling_share']:.2f}%; "
              f"peak RSS {mini['load_peak_rss_mib']:.0f} MiB after loading, "
              f"{mini['peak_rss_mib']:.0f} MiB in all (peaks: private {mini['peak_anon_mib']:.0f} "
              f"MiB, file-backed {mini['peak_file_mib']:.0f} MiB; at the end: private "
              f"{mini['RssAnon']:.0f} MiB, file-backed {mini['RssFile']:.0f} MiB)")  # fmt: skip
    tiered = in_child("--child", "tiered", "--dir", str(root))
    print(
        f"tieredImageNet-sized storage ({tiered['train_split_gib']:.1f} GiB training split, "
        f"read from the file, storage=cpu): {tiered['batches']} meta-batches of 4 tasks, "
        f"sample {1000 * tiered['sample_s']:.1f} ms, peak RSS {tiered['peak_rss_mib']:.0f} MiB "
        f"(peaks: private {tiered['peak_anon_mib']:.0f} MiB, file-backed "
        f"{tiered['peak_file_mib']:.0f} MiB; at the end: private {tiered['RssAnon']:.0f} MiB, "
        f"file-backed {tiered['RssFile']:.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
