"""The transfer baseline for classification: Chen et al. (2019, "A Closer Look at Few-shot
Classification", ICLR)'s Baseline and Baseline++.

Every few-shot paper since has to answer whether meta-learning beats a network pre-trained by
plain classification on all training classes, whose features are frozen and which gets a new
N-way head fine-tuned on each test task's support set. The network comes from a ``mamlrun
pretrain`` checkpoint (``baseline.checkpoint``); its head is dropped (replaced by the
identity), so the features are the input of its classification layer. The new head is linear
(Baseline, ``baseline.head=linear``) or the cosine similarity of the normalised features with
a per-class weight whose norm is learned, times a fixed scale (Baseline++, ``cosine``: the
code's ``distLinear``, weight-normalised). It is fine-tuned with Chen et al.'s recipe
(``conf/baseline/default.yaml``, sources there): SGD with momentum, dampening and weight decay
over mini-batches of the support set, for a number of epochs.

The tasks are those of the meta-learned model's evaluation (``episodes.evaluate`` with the
same ``Evaluation``); this class answers ``evaluate(model, batch, steps)`` as an algorithm
does. Batch norm in our backbones always normalises with the statistics of the batch it sees
(``models.layers.TaskBatchNorm2d``), so a task's support features are computed in one pass
over its support set and its query features in one over its query set, as MAML's forward
passes are. The inner-step axis maps to epochs (``report_epochs``): inner step k of S is shown
beside the baseline after round(k·E/S) of its E epochs, so the last row is the whole recipe.

The heads of all tasks of a batch are fine-tuned together, each with its own parameters
(``fine_tune`` sums the tasks' losses, so each head gets its own task's gradient), and the
randomness of a task (its new head, the order of its support examples in each epoch) comes
from its own generator, seeded by ``baseline.seed`` and the task's index in the evaluation:
the results do not depend on ``eval_batch_size``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mamlrun import config
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint

log = logging.getLogger("mamlrun")

#: What ``baseline.head`` chooses, by the name Chen et al. give the method.
METHODS = {"linear": "Baseline", "cosine": "Baseline++"}
#: The keys a ``mamlrun pretrain`` checkpoint holds that the baseline reads (WARM.md's contract).
PRETRAIN_KEYS = ("model", "head", "classes", "input_shape", "backbone")
#: Added to a feature's norm before dividing by it (``distLinear.forward``'s 0.00001).
COSINE_EPS = 1e-5


@dataclass(frozen=True)
class Recipe:
    """How a new head is fine-tuned on a support set (``baseline.*`` of the YAML)."""

    head: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    scale: float

    @classmethod
    def of(cls, baseline: Any) -> Recipe:
        b = baseline
        return cls(b.head, b.finetune_epochs, b.finetune_batch_size, b.finetune_lr,
                   b.finetune_momentum, b.finetune_dampening, b.finetune_weight_decay,
                   b.cosine_scale)  # fmt: skip

    @property
    def method(self) -> str:
        return METHODS[self.head]

    def sgd_steps(self, support: int, epochs: int | None = None) -> int:
        """SGD steps after ``epochs`` (default: all) on a support set of ``support`` examples:
        every epoch is ceil(support / batch_size) mini-batches, the last one smaller."""
        return (self.epochs if epochs is None else epochs) * math.ceil(support / self.batch_size)


def report_epochs(epochs: int, steps: int) -> list[int]:
    """The epochs shown at inner steps 0…``steps``: round(k·epochs/steps), so step 0 is the
    new head untrained (chance) and the last step the whole recipe; 0 steps: the whole recipe."""
    if steps == 0:
        return [epochs]
    return [round(k * epochs / steps) for k in range(steps + 1)]


# --------------------------------------------------------------------------- the arithmetic
def new_heads(head: str, ways: int, dim: int, generators: list[torch.Generator]) -> dict:
    """One new head per task, as ``nn.Linear(dim, ways)`` initialises one (weight and bias
    uniform in ±1/sqrt(dim)); the cosine head has no bias and is weight-normalised as
    ``WeightNorm`` starts: ``v`` that weight, ``g`` its rows' norms."""
    bound = 1.0 / math.sqrt(dim)
    weights, biases = [], []
    for g in generators:
        weights.append((torch.rand(ways, dim, generator=g) * 2 - 1) * bound)
        biases.append((torch.rand(ways, generator=g) * 2 - 1) * bound)
    weight = torch.stack(weights)
    if head == "linear":
        return {"weight": weight, "bias": torch.stack(biases)}
    return {"g": weight.norm(dim=-1, keepdim=True), "v": weight}


def support_orders(epochs: int, support: int, generators: list[torch.Generator]) -> torch.Tensor:
    """``[tasks, epochs, support]``: the order each task's support examples are visited in
    each epoch (a fresh permutation per epoch, as ``np.random.permutation`` in Chen et al.)."""
    return torch.stack([torch.rand(epochs, support, generator=g).argsort(-1) for g in generators])


def logits(recipe: Recipe, head: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """``[tasks, n, ways]``: the scores of features ``z`` (``[tasks, n, dim]``) by each task's
    head."""
    if recipe.head == "linear":
        return z @ head["weight"].transpose(-1, -2) + head["bias"][:, None, :]
    unit = z / (z.norm(dim=-1, keepdim=True) + COSINE_EPS)
    weight = head["g"] * head["v"] / head["v"].norm(dim=-1, keepdim=True)
    return recipe.scale * (unit @ weight.transpose(-1, -2))


def fine_tune(
    recipe: Recipe,
    head: dict[str, torch.Tensor],
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    orders: torch.Tensor,
    at: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-tune each task's ``head`` on its support features and labels (``[tasks, n, dim]``,
    ``[tasks, n]``) for ``recipe.epochs`` epochs, visiting them in ``orders``; the query
    cross-entropy and accuracy (``[tasks, len(at)]``) after each number of epochs in ``at``.

    SGD as ``torch.optim.SGD`` computes it: d = grad + weight_decay·p; the momentum buffer
    starts as d and is then momentum·buffer + (1 − dampening)·d; p −= lr·buffer."""
    zs, ys = support
    params = {k: t.clone() for k, t in head.items()}
    buffers: dict[str, torch.Tensor] = {}
    scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for epoch in range(recipe.epochs + 1):
        if epoch in at:
            scores[epoch] = _scored(recipe, params, query)
        if epoch == recipe.epochs:
            break
        for start in range(0, zs.shape[1], recipe.batch_size):
            chosen = orders[:, epoch, start : start + recipe.batch_size]
            z = torch.gather(zs, 1, chosen[..., None].expand(-1, -1, zs.shape[-1]))
            grads = _gradients(recipe, params, z, torch.gather(ys, 1, chosen))
            params = _sgd(recipe, params, grads, buffers)
    losses, metrics = (torch.stack([scores[e][i] for e in at], dim=1) for i in range(2))
    return losses, metrics


def _gradients(recipe: Recipe, params: dict, z: torch.Tensor, y: torch.Tensor) -> dict:
    """Each task's gradient of its mini-batch's mean cross-entropy (the sum over tasks of
    independent heads gives each head its own)."""
    leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
    with torch.enable_grad():
        out = logits(recipe, leaves, z)
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
        total = loss.view(y.shape).mean(1).sum()
        return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values())), strict=True))


def _sgd(recipe: Recipe, params: dict, grads: dict, buffers: dict) -> dict[str, torch.Tensor]:
    updated = {}
    for name, p in params.items():
        d = grads[name] + recipe.weight_decay * p
        if recipe.momentum:
            if name in buffers:
                d = buffers[name] * recipe.momentum + (1 - recipe.dampening) * d
            buffers[name] = d
        updated[name] = p - recipe.lr * d
    return updated


def _scored(recipe: Recipe, head: dict, query: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    zq, yq = query
    out = logits(recipe, head, zq)
    loss = F.cross_entropy(out.flatten(0, 1), yq.flatten(), reduction="none").view(yq.shape)
    return loss.mean(1), (out.argmax(-1) == yq).to(out.dtype).mean(1)


# --------------------------------------------------------------------------- on test tasks
class TransferBaseline:
    """The baseline as the evaluation loop sees an algorithm: ``evaluate(features, batch,
    steps)`` gives each task's query loss and accuracy at the epochs ``report_epochs`` maps to
    inner steps 0…``steps``. One object per evaluation (it counts the tasks it has seen)."""

    def __init__(self, recipe: Recipe, ways: int, seed: int) -> None:
        self.recipe, self.ways, self.seed = recipe, ways, seed
        self.seen = 0
        self.support = 0  # support examples per task (results.json: SGD steps per epoch)

    def generators(self, tasks: int) -> list[torch.Generator]:
        first, self.seen = self.seen, self.seen + tasks
        return [torch.Generator().manual_seed(hash((self.seed, first + i)) & (2**63 - 1))
                for i in range(tasks)]  # fmt: skip

    def evaluate(self, features: nn.Module, batch: TaskBatch, steps: int):
        with torch.no_grad():
            zs = torch.stack([features(x) for x in batch.x_support])
            zq = torch.stack([features(x) for x in batch.x_query])
        self.support = zs.shape[1]
        gens = self.generators(batch.num_tasks)
        head = new_heads(self.recipe.head, self.ways, zs.shape[-1], gens)
        orders = support_orders(self.recipe.epochs, zs.shape[1], gens)
        head = {k: t.to(zs) for k, t in head.items()}
        at = report_epochs(self.recipe.epochs, steps)
        support, query = (zs, batch.y_support), (zq, batch.y_query)
        return fine_tune(self.recipe, head, support, query, orders.to(zs.device), at)


# --------------------------------------------------------------------------- the checkpoint
@dataclass
class Pretrained:
    """A ``mamlrun pretrain`` checkpoint read back: its backbone without its head."""

    features: nn.Module
    path: Path
    saved: dict[str, Any]


def pretrain_path(path: str) -> Path:
    """``baseline.checkpoint``: a file, or a pretrain run's directory (its checkpoints/best.pt)."""
    given = Path(path)
    if given.is_dir() and (given / "checkpoints" / "best.pt").is_file():
        return given / "checkpoints" / "best.pt"
    if not given.is_file():
        raise MamlrunError(
            f"baseline.checkpoint={path}: no such file (give the checkpoints/best.pt of a "
            "`mamlrun pretrain` run, or its directory)"
        )
    return given


def read_pretrained(path: str, input_shape: tuple[int, ...], dataset: str) -> dict:
    """The checkpoint's contents, refused in one line unless it is a pretrain checkpoint of
    images shaped like this test's (``dataset``: the one to pretrain on, the model's own)."""
    file = pretrain_path(path)
    try:
        saved = checkpoint.load(file)
    except MamlrunError as ex:
        raise MamlrunError(f"baseline.checkpoint={path}: {ex}") from None
    kind = saved.get("kind")
    if kind is None and "progress" in saved:
        raise MamlrunError(
            f"baseline.checkpoint={path} is a `mamlrun train` checkpoint: its network was "
            "meta-learned, and the transfer baseline is a network pre-trained by plain "
            "classification on all training classes; give a `mamlrun pretrain` checkpoint"
        )
    missing = [k for k in PRETRAIN_KEYS if k not in saved]
    if kind != "pretrain" or missing:
        what = f"kind={kind!r}" if kind != "pretrain" else f"no {', '.join(missing)}"
        raise MamlrunError(f"baseline.checkpoint={path} is not a `mamlrun pretrain` "
                           f"checkpoint ({what})")  # fmt: skip
    shape = tuple(int(s) for s in saved["input_shape"])
    if shape != tuple(input_shape):
        raise MamlrunError(
            f"baseline.checkpoint={path} was pretrained on {saved.get('dataset', '?')} images "
            f"of shape {list(shape)}; this test's images are {list(input_shape)}: pretrain "
            f"on the model's training data (mamlrun pretrain dataset={dataset})"
        )
    return {**saved, "path": file}


def load_features(saved: dict, device: torch.device) -> nn.Module:
    """The pretrained backbone built as ``pretrain`` built it, its weights loaded strictly,
    its classification head (``saved["head"]``) replaced by the identity, frozen, in
    evaluation mode (no DropBlock)."""
    node = OmegaConf.create(saved["backbone"])
    config.validate_component("backbone", node)
    shape = tuple(int(s) for s in saved["input_shape"])
    network = config.instantiate(node, in_shape=shape, out_features=int(saved["classes"]))
    try:
        network.load_state_dict(saved["model"])
    except RuntimeError as ex:
        raise MamlrunError(
            f"baseline.checkpoint={saved['path']}: its weights do not fit its own backbone "
            f"config: {str(ex).splitlines()[0]}"
        ) from None
    network.set_submodule(saved["head"], nn.Identity())
    return network.to(device).eval().requires_grad_(False)


def prepare(baseline: Any, input_shape: tuple[int, ...], dataset: str,
            device: torch.device) -> Pretrained:  # fmt: skip
    """The frozen features of ``baseline.checkpoint``, checked before anything is computed
    (``dataset``: the model's training data, named in the hint of a refusal)."""
    saved = read_pretrained(baseline.checkpoint, input_shape, dataset)
    return Pretrained(load_features(saved, device), saved["path"], saved)


def describe(recipe: Recipe, pretrained: Pretrained, support: int) -> dict[str, Any]:
    """What results.json records about the baseline beside its numbers."""
    return {
        "method": recipe.method,
        "head": recipe.head,
        "checkpoint": str(pretrained.path.resolve()),
        "pretrained_on": pretrained.saved.get("dataset"),
        "pretrain_classes": int(pretrained.saved["classes"]),
        "recipe": {k: v for k, v in vars(recipe).items() if k != "head"},
        "sgd_steps_per_epoch": recipe.sgd_steps(support, 1),
    }
