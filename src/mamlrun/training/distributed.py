"""Data-parallel meta-training over ``torch.distributed``, started by ``torchrun``.

Every rank draws the *whole* meta-batch from the same seeded generator and keeps its own
contiguous share of the tasks. Drawing a batch is cheap next to adapting to it, and this
way the task stream does not depend on the number of processes: N ranks train on exactly
the tasks one process would, a resumed run continues the same stream, and the result
matches a single process on the full meta-batch (tests/test_distributed.py).

After the local meta-gradient, one all-reduce sums ``grad · n_rank / n_total`` over ranks
(the mean over all tasks), together with the loss and metric for logging; the outer
optimizer then takes the same step everywhere, so parameters never drift apart.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError

T = TypeVar("T")
#: Rank 0 validates and checkpoints while the others wait in the next collective.
TIMEOUT = datetime.timedelta(minutes=60)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Context:
    """This process's place in the job; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank logs, validates, checkpoints and writes results."""
        return self.rank == 0

    # ------------------------------------------------------------------ the meta-batch
    def share(self, num_tasks: int) -> slice:
        """This rank's contiguous slice of a meta-batch; sizes differ by at most one."""
        base, extra = divmod(num_tasks, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def shard(self, batch: TaskBatch) -> TaskBatch:
        if not self.enabled:
            return batch
        part = self.share(batch.num_tasks)
        return TaskBatch(*(t[part] for t in batch))

    def average_gradients(
        self,
        model: nn.Module,
        loss: torch.Tensor,
        metric: torch.Tensor,
        local_tasks: int,
        total_tasks: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn each rank's mean over its tasks into the mean over all tasks, in one
        all-reduce. A parameter without a gradient on every rank keeps ``grad=None``, so
        optimizers that skip such parameters behave as in one process."""
        if not self.enabled:
            return loss, metric
        params = [p for p in model.parameters() if p.requires_grad]
        weight = local_tasks / total_tasks
        pieces = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten() * weight
            for p in params
        ]
        like = pieces[0]
        has_grad = torch.tensor([float(p.grad is not None) for p in params]).to(like)
        logged = torch.stack([loss.detach(), metric.detach()]).to(like) * weight
        flat = torch.cat([*pieces, has_grad, logged])
        dist.all_reduce(flat)
        offset = 0
        for p, present in zip(params, flat[-len(params) - 2 : -2].tolist(), strict=True):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone() if present else None
            offset += n
        return flat[-2].detach(), flat[-1].detach()

    def average_buffers(self, model: nn.Module) -> None:
        """Running statistics (``bn_mode=per_step``) are updated from each rank's own tasks;
        averaging them keeps one model. (Not bitwise a single process: the momentum update
        of a mean is not the mean of momentum updates over shares.)"""
        if not self.enabled:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(self.world_size)

    # ------------------------------------------------------------------ agreement
    def any(self, *flags: bool | int) -> list[bool]:
        """Each flag, true if it is true on any rank (a signal, rank 0's time budget)."""
        if not self.enabled:
            return [bool(f) for f in flags]
        t = torch.tensor([float(bool(f)) for f in flags], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a run directory, the chosen task batching)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result, or its user error, to every rank, so
        that a mistake found by rank 0 stops all ranks with the same message instead of
        leaving the others waiting."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except MamlrunError as ex:
                error = str(ex)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise MamlrunError(error)
        return result

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = Context()


@contextmanager
def session(device: torch.device) -> Iterator[tuple[Context, torch.device]]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), or do nothing.

    gloo on CPU, NCCL on CUDA, where each rank takes the GPU of its ``LOCAL_RANK``. Yields the
    context and the device this rank computes on.
    """
    world_size = world_size_from_env()
    if world_size <= 1:
        yield SINGLE, device
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MamlrunError(
                f"rank {rank} wants GPU {local_rank} but this node has "
                f"{torch.cuda.device_count()}: lower --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield Context(rank, world_size, local_rank), device
        # Leave together: a rank that tore its group down while rank 0 was still writing the
        # results sometimes died in gloo's teardown (SIGABRT, "terminate called without an
        # active exception"), failing a run whose work was done.
        dist.barrier()
    finally:
        dist.destroy_process_group()
