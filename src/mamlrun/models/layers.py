"""Layers that meta-learning needs to behave differently from ``torch.nn``'s: batch norm that
normalises with the statistics of the task it sees, with a second derivative autograd can be
trusted with, and the switch to the fused kernel for passes that are differentiated only once;
a convolution that avoids ``vmap``'s grouped convolution where that is slow; DropBlock, whose
strength follows the meta-training iteration.

Every backbone builds its batch norm from ``TaskBatchNorm2d``, so the algorithms' per-step
batch-norm weights and statistics (``algorithms.per_step``) find it in any backbone through
``batch_norm_layers``.

A layer whose training behaviour changes over meta-training declares
``set_training_step(step)`` (``ChangesOverTraining``). The runner tells the algorithm the
iteration (``meta_objective(..., step)``) and the algorithm passes it on with
``tell_training_step``, so neither the runner nor the algorithm knows which layers care.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from mamlrun.errors import MamlrunError


class TaskBatchNorm2d(nn.Module):
    """Batch norm over the batch it is given, one ``autograd.Function`` with a differentiable
    hand-written backward (``task_batch_norm``).

    Same result as ``nn.BatchNorm2d(track_running_stats=False)``, but its second derivative is
    built by autograd from the hand-written backward's operations: under ``torch.func.vmap`` +
    ``torch.func.grad`` the fused kernel's double backward gave a meta-gradient that disagreed
    with finite differences (relative error ~2e-2, torch 2.13), while this one agrees on both
    paths. Until issue 26 it was five plain tensor operations (mean, variance, rsqrt, scale,
    shift, kept as ``reference_batch_norm``), each a pass over the activations and a node of
    the graph the double backward walks; the Function's first backward is two sums and two
    fused multiply-adds, which is all the double backward walks (docs/PERFORMANCE.md, issue 26,
    for what that saves and where it does not).

    The layer owns no running statistics (``running_mean``/``running_var`` are registered as
    None, so checkpoints and ``buffers()`` hold none). An algorithm that keeps statistics
    (MAML++'s per-step statistics, ``bn_mode=per_step``) passes them in as buffers through
    ``functional_call``: in training mode they are then updated in place from the batch's
    statistics (momentum ``momentum``, unbiased variance, as ``nn.BatchNorm2d``), and in
    evaluation mode they replace the batch's statistics, so no example is normalised with
    statistics of the others.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", None)
        self.register_buffer("running_var", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.running_mean is None and _FUSED.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.running_mean is not None and not self.training:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
            return x * scale[:, None, None] + shift[:, None, None]
        if self.running_mean is not None:
            self._update_running_statistics(x.detach())
        return task_batch_norm(x, self.weight, self.bias, self.eps)

    @torch.no_grad()
    def _update_running_statistics(self, x: torch.Tensor) -> None:
        """One more pass over the batch, only where statistics are kept (``bn_mode=per_step``,
        which neither ``vmap`` nor ``checkpoint_inner`` runs)."""
        mean = x.mean(dim=_CHANNEL_SUMS)
        var = (x - mean[:, None, None]).square().mean(dim=_CHANNEL_SUMS)
        n = x.numel() // x.shape[1]
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)


#: The dimensions batch norm sums over: all but the channels of an (N, C, H, W) batch.
_CHANNEL_SUMS = (0, 2, 3)


def task_batch_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Batch norm of ``x`` (N, C, H, W) with the batch's own statistics, differentiable to any
    order (``_TaskBatchNorm``). ``x`` is computed in the dtype of its promotion with the weight,
    as the plain operations were: under bf16 autocast a bfloat16 activation is normalised in
    float32."""
    dtype = torch.promote_types(x.dtype, weight.dtype)
    x = x if x.dtype == dtype else x.to(dtype)
    if not torch.is_grad_enabled():  # evaluation: no Function, no saved tensors
        return _normalised(x, weight, bias, eps)[0]
    # The same Function in two styles: torch.func's transforms need ``setup_context``, but
    # ``apply`` then binds the arguments with ``inspect.signature`` on every call, which cost
    # about 50 µs per layer and inner step, as much as the normalisation of a 5-image batch.
    if torch._C._are_functorch_transforms_active():
        return _TaskBatchNormUnderTransforms.apply(x, weight, bias, eps)[0]
    return _TaskBatchNorm.apply(x, weight, bias, eps)[0]


def reference_batch_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``task_batch_norm`` as five plain operations (mean, variance, rsqrt, scale, shift) whose
    derivatives of every order autograd builds: what ``TaskBatchNorm2d`` ran before issue 26,
    kept as the reference the Function is tested (tests/test_task_batch_norm.py) and timed
    (scripts/bench_bn.py) against."""
    mean = x.mean(dim=_CHANNEL_SUMS, keepdim=True)
    var = (x - mean).square().mean(dim=_CHANNEL_SUMS, keepdim=True)
    scale = weight[:, None, None] * torch.rsqrt(var + eps)
    return (x - mean) * scale + bias[:, None, None]


class _TaskBatchNorm(torch.autograd.Function):
    """Batch norm whose backward is a few fused tensor expressions that autograd can itself
    differentiate, so second-order MAML's double backward runs through them (not through the
    fused kernel's double backward, which is wrong under vmap + grad).

    Besides the output it returns the normalised input ``xhat`` and the reciprocal standard
    deviation ``rstd`` and saves those outputs, not ``x``: the backward needs no second pass
    over ``x``, and because they are outputs, autograd links the backward's use of them back
    to this Function, whose backward then receives their gradients (``grad_xhat``,
    ``grad_rstd``, None where unused). That makes the second derivative exact, and the third.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, xhat, rstd = _normalised(x, weight, bias, eps)
        ctx.set_materialize_grads(False)  # no zero tensors for the unused xhat and rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return out, xhat, rstd

    @staticmethod
    def backward(ctx, grad_out, grad_xhat, grad_rstd):
        """dx = w·rstd·(grad_out − mean(grad_out) − xhat·mean(grad_out·xhat)),
        dw = Σ grad_out·xhat, db = Σ grad_out (sums and means over all but the channels)."""
        xhat, rstd, weight = ctx.saved_tensors
        if grad_xhat is not None or grad_rstd is not None:  # within a higher derivative
            return _through_xhat_and_rstd(xhat, rstd, weight, grad_out, grad_xhat, grad_rstd)
        if grad_out is None:
            return None, None, None, None
        # As few operations as the formula allows: each is a node the double backward walks.
        grad_b = grad_out.sum(_CHANNEL_SUMS, keepdim=True)
        grad_w = (grad_out * xhat).sum(_CHANNEL_SUMS, keepdim=True)
        k = weight.view(-1, 1, 1) * rstd
        m = k / -(xhat.numel() // xhat.shape[1])
        grad_x = torch.addcmul(torch.addcmul(m * grad_b, grad_out, k), xhat, m * grad_w)
        return grad_x, grad_w.view(-1), grad_b.view(-1), None


class _TaskBatchNormUnderTransforms(torch.autograd.Function):
    """``_TaskBatchNorm`` in the style ``torch.func`` (vmap, grad) can transform."""

    generate_vmap_rule = True  # torch.func.vmap batches it like the operations it is made of

    @staticmethod
    def forward(x, weight, bias, eps):
        return _normalised(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], output[2], inputs[1])

    backward = staticmethod(_TaskBatchNorm.backward)


def _normalised(x, weight, bias, eps):
    """Batch norm's output, the normalised input xhat and 1/std, per channel (1, C, 1, 1).
    Two passes for the variance, not ``torch.var_mean``: its Welford reduction over all but the
    channels was 5-10 times slower on this CPU (torch 2.13)."""
    centred = x - x.mean(dim=_CHANNEL_SUMS, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(dim=_CHANNEL_SUMS, keepdim=True) + eps)
    xhat = centred.mul_(rstd)  # in place: a fresh tensor, and one allocation fewer
    return torch.addcmul(bias.view(-1, 1, 1), xhat, weight.view(-1, 1, 1)), xhat, rstd


def _through_xhat_and_rstd(xhat, rstd, weight, grad_out, grad_xhat, grad_rstd):
    """``_TaskBatchNorm``'s backward when the saved ``xhat`` and ``rstd`` were used by a
    backward being differentiated: with g = w·grad_out + grad_xhat (either may be None),
    dx = rstd·(g − mean(g) − xhat·(mean(g·xhat) + rstd·grad_rstd/N)), the last term being
    d rstd/dx = −rstd²·xhat/N."""
    n = xhat.numel() // xhat.shape[1]
    grad_w = grad_b = None
    g = grad_xhat
    if grad_out is not None:
        grad_b = grad_out.sum(_CHANNEL_SUMS)
        grad_w = (grad_out * xhat).sum(_CHANNEL_SUMS)
        w = weight[:, None, None]
        g = grad_out * w if g is None else torch.addcmul(g, grad_out, w)
    along_xhat = 0.0 if grad_rstd is None else grad_rstd * rstd / n
    if g is None:
        return -xhat * (along_xhat * rstd), grad_w, grad_b, None
    along_xhat = along_xhat + (g * xhat).mean(_CHANNEL_SUMS, keepdim=True)
    centred = g - g.mean(_CHANNEL_SUMS, keepdim=True)
    return torch.addcmul(centred, xhat, -along_xhat) * rstd, grad_w, grad_b, None


class TaskConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, given one weight per task under ``torch.func.vmap`` (the adapted
    weights of ``task_batching=vmap`` after inner step 0), can compute a layer with few input
    channels as im2col + one batched matrix multiply over the tasks (``conv2d_as_matmul``)
    instead of the grouped convolution ``vmap`` makes of ``F.conv2d``.

    Off by default (``MATMUL_MAX_IN_CHANNELS = 0``), because measured it did not reliably pay:
    on most single layers it was faster than oneDNN's grouped kernel (up to 4× on the first),
    but on whole presets it was level on Omniglot (0.98-1.18×; 20w5s once 0.55×, then 0.99×),
    and 1.3× slower on miniImageNet's 3-channel first layer, since the inner backward of the
    shared step-0 pass stays grouped (docs/PERFORMANCE.md, "Task-batched convolution", issue
    26). The switch stays so that ``scripts/bench_conv.py --presets`` can measure it again on
    other hardware. A weight shared by every task (θ at inner step 0) always takes
    ``F.conv2d``, which ``vmap`` runs as one ordinary convolution over all tasks' images, and
    so do ``loop`` and ``threads``. Same parameters and state dict as ``nn.Conv2d``.
    """

    #: Layers with at most this many input channels take the matrix multiply under vmap.
    MATMUL_MAX_IN_CHANNELS = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.in_channels <= self.MATMUL_MAX_IN_CHANNELS
            and self._plain()
            and per_task(self.weight)
        ):
            return conv2d_as_matmul(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x)

    def _plain(self) -> bool:
        """The settings ``conv2d_as_matmul`` covers: square stride and zero padding, no
        dilation or groups."""
        stride, pad = self.stride, self.padding
        return (
            self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
            and stride[0] == stride[1] and not isinstance(pad, str) and pad[0] == pad[1]
        )  # fmt: skip


def per_task(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by a ``vmap`` at any level (under ``torch.func.grad``'s
    wrappers too): a weight that differs between tasks. torch.func has no public way to ask."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def conv2d_as_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """``F.conv2d`` of one task's images ``x`` (n, C, H, W), written as im2col by a single
    ``index_select`` and one matrix multiply, so that under ``vmap`` with a per-task weight it
    is one ``bmm`` over the tasks, (O × C·k·k) @ (C·k·k × pixels·images) each.

    Every op here has a derivative made of ops with batching rules (``index_select``'s is one
    ``index_add``, whose own is ``index_select`` again), so ``vmap(grad(...))`` and the outer
    backward of second-order MAML go through it. ``F.unfold`` (im2col) would do the same, but
    torch's CPU im2col took 85% of the time; k·k stacked slices were 1.5× slower (each slice's
    backward fills a zero tensor of the input's size).
    """
    n, (channels, k) = x.shape[0], weight.shape[1:3]
    xp = F.pad(x, [padding] * 4)
    height, width = xp.shape[-2:]
    ho, wo = (height - k) // stride + 1, (width - k) // stride + 1
    offsets = torch.arange(k, device=x.device)
    rows = offsets[:, None] + stride * torch.arange(ho, device=x.device)  # (k, ho)
    cols = offsets[:, None] + stride * torch.arange(wo, device=x.device)  # (k, wo)
    index = (rows[:, None, :, None] * width + cols[None, :, None, :]).flatten()  # (k,k,ho,wo)
    pixels = xp.flatten(-2).permute(1, 2, 0)  # (C, H·W, n): columns come out image-minor
    columns = pixels.index_select(1, index).reshape(channels * k * k, ho * wo * n)
    out = (weight.flatten(1) @ columns).unflatten(1, (ho, wo, n)).permute(3, 0, 1, 2)
    out = out if bias is None else out + bias[:, None, None]
    return out.contiguous()  # images-innermost strides would send the next layers down slow paths


_FUSED: ContextVar[bool] = ContextVar("fused_batch_norm", default=False)


@contextmanager
def fused_batch_norm() -> Iterator[None]:
    """Within this block ``TaskBatchNorm2d`` (without running statistics) uses the fused
    kernel: same values, a first derivative 1.0-2.0 times faster than the Function's
    (docs/PERFORMANCE.md, issue 26), but a second derivative that cannot be trusted (see the
    class). Only for passes that are differentiated at most once, such as MAML's query passes,
    and not under ``vmap``.
    """
    token = _FUSED.set(True)
    try:
        yield
    finally:
        _FUSED.reset(token)


def batch_norm_layers(backbone: nn.Module) -> dict[str, TaskBatchNorm2d]:
    """The backbone's batch-norm layers, by module name (what per-step weights apply to)."""
    return {n: m for n, m in backbone.named_modules() if isinstance(m, TaskBatchNorm2d)}


@runtime_checkable
class ChangesOverTraining(Protocol):
    """A layer whose training-time behaviour follows the meta-training iteration."""

    def set_training_step(self, step: int | None) -> None:
        """``step`` is the training iteration from 0; None (a one-off call such as the
        batching probe) means the settings of the end of the schedule."""
        ...


def changes_over_training(model: nn.Module) -> bool:
    """Whether ``model`` has a layer that ``tell_training_step`` would tell anything (a model
    without one need not be walked every iteration)."""
    return any(isinstance(module, ChangesOverTraining) for module in model.modules())


def tell_training_step(model: nn.Module, step: int | None) -> None:
    """Pass the training iteration to every layer of ``model`` that declares it cares."""
    for module in model.modules():
        if isinstance(module, ChangesOverTraining):
            module.set_training_step(step)


_TASK_THREAD = threading.local()


@contextmanager
def task_thread() -> Iterator[None]:
    """Marks the current thread as a worker of ``task_batching=threads`` (``batching``)."""
    _TASK_THREAD.on = True
    try:
        yield
    finally:
        _TASK_THREAD.on = False


class RandomnessUnderVmap(MamlrunError, RuntimeError):
    """A layer drew random numbers under ``vmap``, which cannot batch them. A RuntimeError
    too, so that ``task_batching=auto``'s probe counts vmap as unusable and picks loop."""


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018) as MetaOptNet's ResNet-12 applies it: in training, zero
    ``block_size``×``block_size`` squares of each feature map and rescale the rest, so that a
    fraction ``1 - keep_prob`` of the activations is dropped on average; in evaluation
    (``model.eval()``) the identity.

    The keep probability falls linearly from 1 at iteration 0 to ``keep_prob`` at
    ``ramp_iterations`` and stays there (MetaOptNet ramps over a count of forward passes
    instead; here it is the training iteration the algorithm passes on, see
    ``tell_training_step``, so the schedule is the same whether tasks run in a loop or
    batched, and after a resume). A block larger than the feature map is shrunk to it.

    The masks come from the global torch generator of the input's device: ``components.build``
    seeds it from ``seed`` and every checkpoint saves and restores it, so a resumed run draws
    the same masks as an uninterrupted one; ``checkpoint_inner``'s recomputation replays its
    state (``functional._RecomputedStep``). ``vmap`` cannot batch random draws, so in training
    DropBlock needs ``task_batching=loop`` (``auto`` finds that out by itself).
    """

    def __init__(self, block_size: int, keep_prob: float, ramp_iterations: int) -> None:
        super().__init__()
        if block_size < 1 or not 0 < keep_prob <= 1 or ramp_iterations < 0:
            raise ValueError(
                "DropBlock needs block_size >= 1, 0 < keep_prob <= 1 and ramp_iterations >= 0, "
                f"got {block_size}, {keep_prob}, {ramp_iterations}"
            )
        self.block_size = block_size
        self.final_keep_prob = keep_prob
        self.ramp_iterations = ramp_iterations
        self.training_step: int | None = None

    def set_training_step(self, step: int | None) -> None:
        self.training_step = step

    def keep_prob(self) -> float:
        """The keep probability at the current training step."""
        step, ramp = self.training_step, self.ramp_iterations
        if step is None or step >= ramp:
            return self.final_keep_prob
        return 1.0 - (1.0 - self.final_keep_prob) * step / ramp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if getattr(_TASK_THREAD, "on", False):
            raise RandomnessUnderVmap(
                "DropBlock (backbone.drop_block=true) draws its masks from the global generator, "
                "which task threads would draw from in a varying order: use "
                "meta_optimizer.task_batching=loop (or auto)"
            )
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        seeds_shape = (*x.shape[:-2], height - size + 1, width - size + 1)
        # Block centres are drawn where a whole block fits; gamma makes the expected dropped
        # fraction 1 - keep_prob (Ghiasi et al., eq. 1, for a rectangular map).
        fits = seeds_shape[-2] * seeds_shape[-1]
        gamma = (1.0 - self.keep_prob()) / size**2 * (height * width) / fits
        # Drawn in at least float32: bfloat16 (precision=bf16's query passes) rounds the
        # uniform draws so coarsely that ``< gamma`` holds a third more often than gamma.
        dtype = torch.promote_types(x.dtype, torch.float32)
        try:
            seeds = torch.rand(seeds_shape, device=x.device, dtype=dtype) < gamma
        except RuntimeError as ex:
            if "vmap" not in str(ex):
                raise
            raise RandomnessUnderVmap(
                "DropBlock (backbone.drop_block=true) draws random masks in training, which vmap "
                "cannot batch: use meta_optimizer.task_batching=loop (or auto)"
            ) from None
        dropped = F.max_pool2d(F.pad(seeds.to(x.dtype), [size - 1] * 4), size, stride=1)
        mask = 1.0 - dropped
        return x * mask * (mask.numel() / mask.sum().clamp(min=1.0))
