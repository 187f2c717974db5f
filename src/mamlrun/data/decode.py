"""Image files and encoded images decoded to uint8 RGB pixels, in parallel where it pays:
``decode_image`` (one), ``resize_files`` (a list of files), ``DecodePool`` (encoded images in
order, in bounded memory), both over forked worker processes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import torch
from PIL import Image, UnidentifiedImageError

from mamlrun.errors import MamlrunError

#: Below this many images a process pool costs more than it saves.
_PARALLEL_FROM = 256


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def resize_file(path: str, size: int) -> bytes:
    """One image file as RGB ``size``×``size`` pixels (Lanczos), raw bytes in HWC order."""
    return decode_image(path, size, str(path))


def decode_image(source: str | bytes, size: int, where: str) -> bytes:
    """One image (a path, or the bytes of an encoded PNG/JPEG) as RGB ``size``×``size``
    pixels, raw bytes in HWC order; ``where`` names it in the error.

    RGB conversion first because ImageNet and CUB hold some greyscale and CMYK JPEGs; Lanczos
    because the MAML code (and the miniImageNet scripts it used) resized with Pillow's
    antialiasing filter, which is Lanczos. An image already at ``size`` is not resampled.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    except UnidentifiedImageError as e:  # its message holds the repr of our BytesIO
        raise MamlrunError(
            f"{where}: not a readable image (no image format Pillow knows); replace it with the "
            "file from your copy of the dataset"
        ) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MamlrunError(
            f"{where}: not a readable image ({one_line(e)}); replace it with the file from your "
            "copy of the dataset"
        ) from e
    return rgb.tobytes()


def _resize_chunk(paths: list[str], size: int) -> bytes:
    return b"".join(resize_file(path, size) for path in paths)


def resize_files(paths: Sequence[str], size: int, workers: int | None = None) -> torch.Tensor:
    """uint8 ``[len(paths), size, size, 3]``: every image resized, in order (``forked_map``
    from ``_PARALLEL_FROM`` images on)."""
    workers = workers or min(4, os.cpu_count() or 1)
    paths = [str(p) for p in paths]
    if workers > 1 and len(paths) >= _PARALLEL_FROM:
        step = -(-len(paths) // (workers * 4))
        chunks = [paths[i : i + step] for i in range(0, len(paths), step)]
        parts = forked_map(_resize_chunk, chunks, [size] * len(chunks), workers=workers)
        pixels = b"".join(parts)
    else:
        pixels = _resize_chunk(paths, size)
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(-1, size, size, 3)


def forked_map(function: Callable, *arguments: Sequence, workers: int) -> list:
    """``function`` over the argument lists, results in order, in ``workers`` forked processes
    (in this one where there is one worker or no fork).

    Forked, not spawned: the workers need only Pillow (and zipfile), and re-importing torch in
    each would cost more than it saves. Python 3.12+ warns that forking a process with threads
    (torch's) may deadlock the child; that risk is in children that use those threads' locks,
    and these never call into torch.
    """
    if workers > 1 and "fork" in _start_methods():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                return list(pool.map(function, *arguments))
    return [function(*call) for call in zip(*arguments, strict=True)]


def _start_methods() -> list[str]:
    return multiprocessing.get_all_start_methods()


# ---------------------------------------------------------------------------------------------
# Encoded images (PNG/JPEG bytes from a pickle or an archive) decoded in order, in bounded memory


def _decode_chunk(blobs: list[bytes], size: int, label: str, start: int) -> bytes:
    return b"".join(
        decode_image(blob, size, f"{label}, image {start + i}") for i, blob in enumerate(blobs)
    )


class DecodePool:
    """Decodes batches of encoded images to uint8 ``[n, size, size, 3]`` and hands each to
    ``deliver(start, pixels)`` in submission order.

    With ``expected`` images or more (a large dataset, not a test fixture) the batches go to
    forked worker processes, at most two per worker in flight, so a dataset of any size passes
    through in bounded memory; fewer are decoded in this process. ``label`` names the source
    in errors (``<file>, image <i>``).
    """

    def __init__(
        self,
        size: int,
        deliver: Callable[[int, torch.Tensor], None],
        label: str,
        expected: int = 0,
        workers: int | None = None,
    ) -> None:
        self.size, self.deliver, self.label = size, deliver, label
        workers = workers or min(4, os.cpu_count() or 1)
        parallel = workers > 1 and expected >= _PARALLEL_FROM and "fork" in _start_methods()
        self._pool = _fork_pool(workers) if parallel else None
        self._ahead = 2 * workers
        self._pending: deque[tuple[int, Future]] = deque()

    def submit(self, start: int, blobs: list[bytes]) -> None:
        if self._pool is None:
            self._hand_on(start, _decode_chunk(blobs, self.size, self.label, start))
            return
        self._pending.append(
            (start, self._pool.submit(_decode_chunk, blobs, self.size, self.label, start))
        )
        while len(self._pending) > self._ahead:
            self._next()

    def _next(self) -> None:
        start, future = self._pending.popleft()
        self._hand_on(start, future.result())

    def _hand_on(self, start: int, pixels: bytes) -> None:
        tensor = torch.frombuffer(bytearray(pixels), dtype=torch.uint8)
        self.deliver(start, tensor.view(-1, self.size, self.size, 3))

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, exc_type, error, trace) -> None:
        try:
            while self._pending and exc_type is None:
                self._next()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)


def _fork_pool(workers: int) -> ProcessPoolExecutor:
    """Forked, not spawned, for the reason ``forked_map`` gives."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
