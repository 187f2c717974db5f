"""Another dataset's images at a model's input shape: the source of a cross-domain test.

A model meta-trained on 84×84 RGB miniImageNet tested on CUB (Chen et al. 2019's cross-domain
benchmark) sees CUB's images as it saw its own; a model of 28×28 greyscale Omniglot tested on
CIFAR sees them 28×28 and grey. Each sampled batch is resized on the device (bilinear with
antialiasing, the same filter family the benchmarks' caches were made with) and its channels
converted: grey to RGB by repeating the channel, RGB to grey by the ITU-R 601 luma weights
(applied to the inputs as normalised by the test dataset's own statistics, a linear map of the
pixels, so the weights mean what they mean on pixels up to an offset and scale). Other channel
counts, or inputs that are not images, cannot be brought over, and say so.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mamlrun.data.tasks import TaskBatch, TaskSource
from mamlrun.errors import MamlrunError

_LUMA = (0.299, 0.587, 0.114)


class Reshaped:
    """``source``'s tasks with images brought to ``input_shape`` (C, H, W)."""

    def __init__(self, source: TaskSource, input_shape: tuple[int, ...]) -> None:
        check_convertible(tuple(source.input_shape), tuple(input_shape))
        self.source = source
        self.input_shape = tuple(input_shape)
        self.task_type, self.output_size = source.task_type, source.output_size
        self.device = source.device

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        batch = self.source.sample(split, num_tasks, generator)
        return TaskBatch(self._bring(batch[0]), batch[1], self._bring(batch[2]), batch[3])

    def _bring(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]
        images = x.reshape(-1, *x.shape[-3:])
        channels, size = self.input_shape[0], self.input_shape[1:]
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        if images.shape[1] == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] == 3 and channels == 1:
            luma = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
            images = torch.einsum("nchw,c->nhw", images, luma).unsqueeze(1)
        return images.reshape(*lead, *self.input_shape).contiguous()

    def describe(self) -> dict:
        return {**self.source.describe(), "resized_to": list(self.input_shape)}

    def save_splits(self, directory: Path) -> None:
        self.source.save_splits(directory)


def check_convertible(found: tuple[int, ...], wanted: tuple[int, ...]) -> None:
    """Images of shape ``found`` can be brought to ``wanted``, or one line why not."""
    if found == wanted:
        return
    if len(found) != 3 or len(wanted) != 3:
        raise MamlrunError(
            f"the test data's inputs have shape {found} and the model takes {wanted}: only "
            "images (C, H, W) can be brought to another shape"
        )
    if found[0] != wanted[0] and {found[0], wanted[0]} != {1, 3}:
        raise MamlrunError(
            f"the test data's images have {found[0]} channels and the model takes {wanted[0]}: "
            "only greyscale and RGB convert into each other"
        )
