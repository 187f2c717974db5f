"""The arithmetic of a run's forward passes: ``fp32``, ``tf32`` or ``bf16`` (``precision=``).

A command turns the name into a ``Precision`` once (``choose``, which also sets PyTorch's
process-wide TF32 switches), and the runner hands it to the algorithm
(``algorithms.base.SupportsPrecision``). The algorithm applies it in one place, around each
forward pass of the network (``Precision.forward``): bf16 autocast runs the convolutions and
matrix products in bfloat16, while the parameters stay float32 leaves, so the inner-loop
gradients (gradients of float32 leaves), the inner update ``θ - α·g``, the losses (computed on
outputs cast back to float32) and the meta-gradient are all float32. Autocast wraps only the
forward passes, never a backward (inner or outer), as PyTorch's AMP guide asks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from mamlrun.errors import MamlrunError

log = logging.getLogger("mamlrun")

#: ``fp32``: float32 throughout (TF32 off on CUDA, where cuDNN's default would allow it).
#: ``tf32``: float32 whose CUDA matmuls and convolutions may use TF32 tensor cores.
#: ``bf16``: forward passes under bfloat16 autocast, everything else float32.
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Precision:
    """How forward passes run; ``FP32`` (nothing changed) is every algorithm's default."""

    name: str = "fp32"
    device_type: str = "cpu"

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on this device type for ``bf16``, else nothing."""
        if self.name != "bf16":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def forward(self, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """``fn(*args)`` (a network's forward pass) in this precision, its output at least
        float32 so that the loss and metric computed from it are float32."""
        with self.autocast():
            out = fn(*args)
        if out.is_floating_point() and out.dtype.itemsize < 4:
            return out.float()
        return out


FP32 = Precision()


def check(name: str, key: str = "precision") -> None:
    if name not in PRECISIONS:
        raise MamlrunError(f"{key} must be one of {', '.join(PRECISIONS)}, got {name!r}")


def choose(name: str, device: torch.device) -> Precision:
    """The ``Precision`` named ``name`` on ``device``, with PyTorch's TF32 switches set.

    On CUDA both switches (cuBLAS matmuls, cuDNN convolutions) are on for ``tf32`` and off
    otherwise: cuDNN allows TF32 by default, so without this ``fp32`` would not be float32.
    TF32 is an NVIDIA tensor-core format, so on a CPU ``tf32`` says so and runs as ``fp32``.
    """
    check(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        torch.backends.cudnn.allow_tf32 = name == "tf32"
    elif name == "tf32":
        log.warning(f"precision=tf32 does nothing on {device.type} (TF32 is CUDA's); runs as fp32")
    if name == "bf16" and not _bf16_autocast(device):
        raise MamlrunError(
            f"precision=bf16 is not available on {device}: it has no bfloat16 autocast "
            "(a CUDA GPU needs compute capability 8.0 or newer); use precision=fp32"
        )
    return Precision(name, device.type)


def _bf16_autocast(device: torch.device) -> bool:
    if not torch.amp.is_autocast_available(device.type):
        return False
    return device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
