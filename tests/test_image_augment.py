"""Specification of the optional training augmentation of the episodic image layer: a random
crop after zero padding and a horizontal flip, per image, on the device.

Augmentation must change nothing for a run that does not ask for it (the random stream, and so
every earlier run and every resume, stays bitwise as it was) and nothing outside the training
split. The fixture images are 12×12 with a distinct value in every pixel (red: the pixel's
position, green and blue: the image's class and index), none of them black, so a test can read
back from any augmented image exactly where each pixel came from and which pixels are padding.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from conftest import compose_train, run_cli
from image_fixtures import write_cifar_archive
from omegaconf import OmegaConf
from test_miniimagenet import one_line_error

from mamlrun import config
from mamlrun.data.episodic import EpisodicImages
from mamlrun.data.u8cache import ImageSplit
from mamlrun.errors import MamlrunError
from mamlrun.training import resume

SIZE, PADDING = 12, 3
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
SHAPE = {"train": (4, 4), "val": (3, 3), "test": (3, 3)}  # classes, images per class
IMAGE_DATASETS = ("miniimagenet", "tieredimagenet", "cifarfs", "fc100", "cub")


def split_images(classes: int, per_class: int) -> ImageSplit:
    """uint8 [classes * per_class, 12, 12, 3]: red 1 + row * 12 + column, green 1 + class,
    blue 1 + index in class: every pixel of every image tells where it came from."""
    position = 1 + torch.arange(SIZE * SIZE, dtype=torch.uint8).view(SIZE, SIZE)
    images = torch.empty(classes, per_class, SIZE, SIZE, 3, dtype=torch.uint8)
    images[..., 0] = position
    images[..., 1] = 1 + torch.arange(classes, dtype=torch.uint8).view(-1, 1, 1, 1)
    images[..., 2] = 1 + torch.arange(per_class, dtype=torch.uint8).view(1, -1, 1, 1)
    names = [f"class {c}" for c in range(classes)]
    return ImageSplit(images.flatten(0, 1), [per_class] * classes, names)


SPLITS = {s: split_images(*shape) for s, shape in SHAPE.items()}
#: The task shape and storage of the fixture sources that only vary the augmentation.
FIXED = {"ways": 3, "shots": 1, "query": 2, "storage": "device", "mean": None, "std": None}


def source(augment: bool, device: str = "cpu", **settings) -> EpisodicImages:
    settings = {"ways": 3, "shots": 1, "query": 2, "storage": "device", "mean": MEAN, "std": STD,
                **settings}  # fmt: skip
    return EpisodicImages(
        "fixture", SPLITS, **settings, device=device, augment=augment, crop_padding=PADDING
    )


def draw(tasks: EpisodicImages, split: str, seed: int = 0, num_tasks: int = 4):
    """A batch, and the generator after it (to see how many random numbers it used)."""
    generator = torch.Generator(tasks.device).manual_seed(seed)
    return tasks.sample(split, num_tasks, generator), generator


def pixels_of(x: torch.Tensor) -> torch.Tensor:
    """Normalised inputs [..., 3, H, W] back to the uint8 pixels [..., H, W, 3] they were."""
    mean = torch.tensor(MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(STD, device=x.device).view(-1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8).movedim(-3, -1).cpu()


def moved(image: torch.Tensor, dy: int, dx: int, mirrored: bool) -> torch.Tensor:
    """``image`` seen through a window moved by (dy, dx), black outside it, then mirrored left
    to right if asked: what RandomCrop(padding) followed by RandomHorizontalFlip can make."""
    out = torch.zeros_like(image)
    rows, columns = image.shape[0], image.shape[1]
    top, left = max(0, -dy), max(0, -dx)
    bottom, right = min(rows, rows - dy), min(columns, columns - dx)
    out[top:bottom, left:right] = image[top + dy : bottom + dy, left + dx : right + dx]
    return out.flip(1) if mirrored else out


def trace(augmented: torch.Tensor, original: torch.Tensor) -> tuple[int, int, bool] | None:
    """The (dy, dx, mirrored) with |dy|, |dx| <= PADDING that turns ``original`` into
    ``augmented``, or None when there is none."""
    shifts = range(-PADDING, PADDING + 1)
    for dy in shifts:
        for dx in shifts:
            for mirrored in (False, True):
                if torch.equal(moved(original, dy, dx, mirrored), augmented):
                    return dy, dx, mirrored
    return None


def every_image(batch) -> torch.Tensor:
    """The uint8 pixels of all support and query images of a batch, [images, H, W, 3]."""
    return torch.cat([pixels_of(batch.x_support), pixels_of(batch.x_query)], 1).flatten(0, 1)


def traces(augmented, plain) -> list[tuple[int, int, bool] | None]:
    """How each image of ``augmented`` was made from the same image of ``plain``."""
    pairs = zip(every_image(augmented), every_image(plain), strict=True)
    return [trace(a, p) for a, p in pairs]


def batch_equal(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# Off, and outside training, nothing changes


def test_without_augmentation_the_draws_are_exactly_the_ones_made_before_it_existed():
    """Class ranks, image noise, label ranks, in that order, and nothing after them: the
    stream every run made before augmentation existed (all classes here are the same size)."""
    batch, used = draw(source(augment=False), "train", seed=3)

    generator = torch.Generator().manual_seed(3)
    classes = torch.rand(4, 4, generator=generator).argsort(dim=-1, stable=True)[:, :3]
    picks = torch.rand(4, 3, 4, generator=generator).argsort(dim=-1, stable=True)[..., :3]
    labels = torch.rand(4, 3, generator=generator).argsort(dim=-1, stable=True)
    images = SPLITS["train"].images[classes[..., None] * 4 + picks]  # [4, 3, 3, H, W, C]

    assert torch.equal(pixels_of(batch.x_support), images[:, :, :1].flatten(1, 2))
    assert torch.equal(pixels_of(batch.x_query), images[:, :, 1:].flatten(1, 2))
    assert torch.equal(batch.y_support, labels.repeat_interleave(1, 1))
    assert torch.equal(batch.y_query, labels.repeat_interleave(2, 1))
    assert torch.equal(used.get_state(), generator.get_state())


@pytest.mark.parametrize("split", ["val", "test"])
def test_validation_and_test_tasks_are_never_augmented_and_draw_nothing_more(split):
    augmented, used_augmented = draw(source(augment=True), split)
    plain, used_plain = draw(source(augment=False), split)

    assert batch_equal(augmented, plain)
    assert torch.equal(used_augmented.get_state(), used_plain.get_state())


# ---------------------------------------------------------------------------------------------
# On, in training: a moved window with black padding, maybe mirrored


def test_each_training_image_is_its_own_image_moved_by_at_most_the_padding_maybe_mirrored():
    """The augmentation draws come after the task draws, so the same seed picks the same
    images and labels with augmentation on; only the pixels of each image move."""
    augmented, _ = draw(source(augment=True), "train")
    plain, _ = draw(source(augment=False), "train")

    assert None not in traces(augmented, plain)
    assert torch.equal(augmented.y_support, plain.y_support)
    assert torch.equal(augmented.y_query, plain.y_query)
    assert augmented.x_support.shape == plain.x_support.shape
    assert augmented.x_query.shape == plain.x_query.shape


def test_the_padding_is_black_before_normalisation_as_torchvision_pads():
    augmented, _ = draw(source(augment=True), "train")
    pixels = every_image(augmented)
    padding = pixels[..., 0] == 0  # no fixture pixel is black: these came from the padding

    assert padding.any()
    assert (pixels[padding] == 0).all()  # black in every channel, not -mean/std in the input


def test_both_mirrorings_and_many_different_offsets_occur():
    augmented, _ = draw(source(augment=True), "train", num_tasks=8)
    plain, _ = draw(source(augment=False), "train", num_tasks=8)
    found = traces(augmented, plain)

    assert {mirrored for _, _, mirrored in found} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in found}) >= 10
    assert {dy for dy, _, _ in found} >= {-PADDING, PADDING}  # the whole range is reached


def test_the_same_seed_gives_the_same_augmentation_and_another_seed_another():
    tasks = source(augment=True)
    first, used_first = draw(tasks, "train", seed=5)
    again, used_again = draw(tasks, "train", seed=5)
    other, _ = draw(tasks, "train", seed=6)

    assert batch_equal(first, again)
    assert torch.equal(used_first.get_state(), used_again.get_state())
    assert not torch.equal(first.x_support, other.x_support)


def test_host_storage_gives_the_same_augmented_tasks_as_device_storage(as_on_an_accelerator):
    on_device, on_host = source(augment=True, storage="device"), source(augment=True, storage="cpu")
    assert on_host._copies and not on_device._copies  # the accelerator's two paths
    on_device, _ = draw(on_device, "train")
    on_host, _ = draw(on_host, "train")

    assert batch_equal(on_device, on_host)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_each_training_image_is_moved_and_maybe_mirrored_on_the_device():
    augmented, _ = draw(source(augment=True, device="cuda"), "train", num_tasks=8)
    plain, _ = draw(source(augment=False, device="cuda"), "train", num_tasks=8)
    found = traces(augmented, plain)

    assert augmented.x_support.device.type == "cuda"
    assert None not in found
    assert {mirrored for _, _, mirrored in found} == {False, True}
    assert torch.equal(augmented.y_query, plain.y_query)


# ---------------------------------------------------------------------------------------------
# Settings, configs and records


def test_describe_records_whether_and_how_much_the_run_augmented():
    described = source(augment=True).describe()
    assert (described["augment"], described["crop_padding"]) == (True, PADDING)
    assert source(augment=False).describe()["augment"] is False


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"crop_padding": -1}, "dataset.crop_padding must be a non-negative integer, got -1"),
        ({"crop_padding": 2.5}, "dataset.crop_padding=2.5 has the wrong type: expected int"),
        ({"crop_padding": True}, "dataset.crop_padding=True has the wrong type: expected int"),
        ({"crop_padding": "4"}, "dataset.crop_padding='4' has the wrong type: expected int"),
        ({"augment": "yes"}, "dataset.augment='yes' has the wrong type: expected bool"),
    ],
)
def test_bad_augmentation_settings_are_one_line_errors_of_the_config(settings, expected):
    node = OmegaConf.merge(compose_train("dataset=cifarfs").dataset, {"augment": True, **settings})
    message = one_line_error(config.validate_component, "dataset", node)
    assert expected in message


@pytest.mark.parametrize("padding", [12, 40])
def test_a_padding_as_large_as_the_images_is_refused_by_the_source(padding):
    message = one_line_error(
        EpisodicImages, "fixture", SPLITS, **FIXED, augment=True, crop_padding=padding
    )
    assert f"crop_padding={padding} must be smaller than the 12×12 images" in message


def test_a_padding_the_images_cannot_take_is_only_refused_when_it_would_be_used():
    """An unused padding must not stop a dataset of small images (Omniglot at 8×8 pixels)."""
    EpisodicImages("fixture", SPLITS, **FIXED, augment=False, crop_padding=12)


@pytest.mark.parametrize("dataset", IMAGE_DATASETS)
def test_every_image_dataset_config_passes_augmentation_to_its_factory_off(dataset):
    cfg = compose_train(f"dataset={dataset}")
    module, name = cfg.dataset._target_.rsplit(".", 1)
    factory = getattr(__import__(module, fromlist=[name]), name)
    parameters = inspect.signature(factory).parameters

    assert {"augment", "crop_padding"} <= parameters.keys()  # values: the YAML's alone
    assert cfg.dataset.augment is False
    assert cfg.dataset.crop_padding == (4 if dataset in ("cifarfs", "fc100") else 8)


def test_no_preset_turns_augmentation_on():
    """The MAML papers' setups used none; a preset reproducing them must not either."""
    experiments = Path(__file__).parents[1] / "conf" / "experiment"
    presets = [p.stem for p in experiments.glob("*.yaml") if p.stem.startswith(IMAGE_DATASETS)]
    assert len(presets) >= 5
    for preset in presets:
        assert compose_train(f"experiment={preset}").dataset.augment is False, preset


def test_a_resumed_run_may_not_turn_augmentation_on_or_change_its_padding():
    saved = {"seed": 0, "dataset": {"name": "cifarfs", "augment": False, "crop_padding": 4}}
    for key, value, shown in (("augment", True, "False → True"), ("crop_padding", 2, "4 → 2")):
        requested = OmegaConf.create({**saved, "dataset": {**saved["dataset"], key: value}})
        with pytest.raises(MamlrunError, match=f"dataset.{key}: {shown}"):
            resume.continued_config(saved, requested, [f"dataset.{key}"])


@pytest.mark.slow
def test_training_cifar_fs_with_augmentation_through_the_cli_records_it(tmp_path):
    write_cifar_archive(tmp_path / "data")
    out = run_cli(
        "train", "experiment=cifarfs_5w1s", f"dataset.root={tmp_path / 'data'}",
        "dataset.query=1", "dataset.augment=true", "iterations=2", "val_every=2",
        "val_tasks=2", "eval_batch_size=2", "checkpoint_every=2", "final_test=false",
        "meta_optimizer.task_batching=loop", "device=cpu", "hydra.run.dir=run",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2
    assert (results["dataset"]["augment"], results["dataset"]["crop_padding"]) == (True, 4)
