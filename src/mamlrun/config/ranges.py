"""The ranges of every setting, in one place: what ``config.validate`` checks once the types
and the components' signatures are right, before anything is built.

A value that is wrong whatever the data and the network (a count below one, a learning rate
that is not positive, a name that is not one of the choices, two flags that exclude each
other) is refused here, in one line naming the key. The components keep only what they alone
can know: that the images fit the backbone, that a split holds enough classes and images for
N-way K-shot tasks, that ``adapt_params`` names parameters of this backbone.

The choices of the string settings are defined here. ``algorithms/`` imports its own from
here (the config cannot import upward); ``data/`` and ``models/`` stand beside the config and
import nothing of it, so the few choices they implement are named here too, and
tests/test_config.py checks that the two lists agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mamlrun.errors import MamlrunError
from mamlrun.models import precision

#: ``transductive``: every forward pass normalises with the statistics of the batch it sees
#: (the task's support or query set), as the original MAML. ``per_step``: running statistics
#: per inner step, collected while meta-training and used at evaluation (MAML++'s BNRS).
BN_MODES = ("transductive", "per_step")
INNER_OPTIMIZERS = ("sgd", "adam")
#: ``mean``: the mean cross-entropy (or MSE); ``tf_maml``: the original code's N × mean.
LOSS_NORMALIZATION = ("mean", "tf_maml")
#: ``none``; ``per_element`` (Meta-SGD); ``per_layer_per_step`` (MAML++'s LSLR).
LEARNED_LR = ("none", "per_element", "per_layer_per_step")
#: How the tasks of a meta-batch run (``algorithms/batching.py``); ``vmap:C`` chunks them.
BATCHING_MODES = ("loop", "threads", "vmap")
#: Where a dataset's images are kept (``data/episodic.py``).
STORAGE = ("device", "cpu")
#: Omniglot's class splits (``data/omniglot.py``, ``character_splits``).
OMNIGLOT_SPLITS = ("maml", "background_evaluation")
#: How ``dataset=images`` fits an image to its size, and the channels it converts to
#: (``data/folders.py``).
IMAGE_RESIZE = ("crop", "pad")
IMAGE_CHANNELS = (1, 3)
#: The transfer baseline's new head (``training/transfer.py``): Chen et al.'s Baseline and
#: Baseline++.
BASELINE_HEADS = ("linear", "cosine")
#: conv4's downsampling and head (``models/conv4.py``).
DOWNSAMPLE = ("stride", "max_pool")
HEADS = ("mean", "flatten")

#: Keys of one command that must be >= 1, and that must be >= 0.
POSITIVE = {
    "train": (
        "iterations",
        "meta_batch_size",
        "val_every",
        "val_tasks",
        "eval_batch_size",
        "checkpoint_every",
        "log_every",
        "test_tasks",
    ),
    "test": ("test_tasks", "eval_batch_size"),
    "pretrain": ("batch_size", "log_every", "val_every", "val_tasks", "checkpoint_every"),
}
NON_NEGATIVE = {
    "train": ("progress_seconds",),
    "test": ("progress_seconds", "inner_steps"),
    "pretrain": ("progress_seconds", "momentum", "weight_decay"),
}
#: ``mamlrun pretrain``'s learning-rate schedules (``training/pretrain.py``, ``learning_rate``).
PRETRAIN_SCHEDULES = ("cosine", "step")


def check_command(cfg: Mapping[str, Any], command: str) -> None:
    """The top-level settings of ``train`` or ``test``/``adapt`` (the components' are checked
    with their signatures, ``config.validate_component``)."""
    for name in POSITIVE[command]:
        if cfg[name] < 1:
            raise MamlrunError(f"{name} must be positive, got {cfg[name]}")
    for name in NON_NEGATIVE[command]:
        if cfg[name] is not None and cfg[name] < 0:
            raise MamlrunError(f"{name} must be >= 0, got {cfg[name]}")
    if cfg.get("max_minutes") is not None and cfg["max_minutes"] <= 0:
        raise MamlrunError(f"max_minutes must be positive (or null), got {cfg['max_minutes']}")
    if cfg.get("threads") is not None and cfg["threads"] < 1:
        raise MamlrunError(
            f"threads must be positive (or null: torch's default), got {cfg['threads']}"
        )
    if "precision" in cfg:
        precision.check(cfg["precision"])
    if cfg.get("baseline") is not None:
        check_baseline(cfg["baseline"])


def check_baseline(node: Mapping[str, Any]) -> None:
    """The transfer baseline's head and fine-tuning recipe (``conf/baseline/default.yaml``)."""
    _one_of(node, "baseline", "head", BASELINE_HEADS)
    for key in ("finetune_epochs", "finetune_batch_size"):
        if node[key] < 1:
            raise MamlrunError(f"baseline.{key} must be positive, got {node[key]}")
    for key in ("finetune_lr", "cosine_scale"):
        if not node[key] > 0:
            raise MamlrunError(f"baseline.{key} must be positive, got {node[key]}")
    for key in ("finetune_momentum", "finetune_dampening"):
        if not 0 <= node[key] <= 1:
            raise MamlrunError(f"baseline.{key} must be in [0, 1], got {node[key]}")
    if node["finetune_weight_decay"] < 0:
        raise MamlrunError(
            f"baseline.finetune_weight_decay must be >= 0, got {node['finetune_weight_decay']}"
        )


def check_pretrain(cfg: Mapping[str, Any]) -> None:
    """``mamlrun pretrain``'s recipe: how long (epochs or iterations, one of them), the rate
    and its schedule."""
    epochs, iterations = cfg["epochs"], cfg["iterations"]
    if (epochs is None) == (iterations is None):
        raise MamlrunError(
            f"set one of epochs and iterations (the other null), got epochs={epochs} "
            f"and iterations={iterations}"
        )
    for key in ("epochs", "iterations"):
        if cfg[key] is not None and cfg[key] < 1:
            raise MamlrunError(f"{key} must be positive (or null), got {cfg[key]}")
    if not cfg["lr"] > 0 or not 0 < cfg["gamma"] <= 1:
        raise MamlrunError(
            f"lr must be positive and gamma in (0, 1], got lr={cfg['lr']} gamma={cfg['gamma']}"
        )
    if cfg["schedule"] not in PRETRAIN_SCHEDULES:
        raise MamlrunError(
            f"schedule must be one of {', '.join(PRETRAIN_SCHEDULES)}, got {cfg['schedule']!r}"
        )
    if any(m < 1 for m in cfg["milestones"]) or list(cfg["milestones"]) != sorted(
        cfg["milestones"]
    ):
        raise MamlrunError(
            f"milestones must be increasing epochs (>= 1), got {list(cfg['milestones'])}"
        )


def check_dataset(node: Mapping[str, Any]) -> None:
    """Task shapes and storage; whether the data can serve them is the dataset's to say."""
    for key in ("ways", "shots", "query", "image_size"):
        if key in node and node[key] < 1:
            raise MamlrunError(f"dataset.{key} must be a positive integer, got {node[key]!r}")
    _one_of(node, "dataset", "storage", STORAGE)
    _one_of(node, "dataset", "split", OMNIGLOT_SPLITS)
    _one_of(node, "dataset", "resize", IMAGE_RESIZE)
    if "channels" in node and node["channels"] not in IMAGE_CHANNELS:
        raise MamlrunError(f"dataset.channels must be 1 or 3, got {node['channels']!r}")
    fractions = node.get("split_fractions")
    if fractions is not None and (
        len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1)
    ):
        raise MamlrunError(
            f"dataset.split_fractions must be three shares (train, val, test) adding up to 1, "
            f"got {list(fractions)}"
        )
    if node.get("crop_padding", 0) < 0:
        raise MamlrunError(
            f"dataset.crop_padding must be a non-negative integer, got {node['crop_padding']!r}"
        )
    for key in ("mean", "std"):
        values = node.get(key) or []
        if not all(map(math.isfinite, values)) or (key == "std" and min(values, default=1) <= 0):
            raise MamlrunError(f"dataset.{key} must be finite (std positive), got {list(values)}")
    for key in ("amplitude", "phase", "x_range"):
        if key in node and not node[key][0] <= node[key][1]:
            raise MamlrunError(f"dataset.{key} must be [low, high] with low <= high")


def check_backbone(node: Mapping[str, Any]) -> None:
    """Layer sizes and choices; whether the input fits the network is the backbone's to say."""
    for key in ("filters", "drop_block_size"):
        if key in node and node[key] < 1:
            raise MamlrunError(f"backbone.{key} must be a positive integer, got {node[key]!r}")
    for key in ("hidden", "widths"):
        if any(size < 1 for size in node.get(key, ())):
            raise MamlrunError(f"backbone.{key} must be positive sizes, got {list(node[key])}")
    if "widths" in node and len(node["widths"]) != 4:
        raise MamlrunError(
            f"backbone.widths needs one width per block (4), got {list(node['widths'])}"
        )
    _one_of(node, "backbone", "downsample", DOWNSAMPLE)
    _one_of(node, "backbone", "head", HEADS)
    if "keep_prob" in node and not 0 < node["keep_prob"] <= 1:
        raise MamlrunError(f"backbone.keep_prob must be in (0, 1], got {node['keep_prob']}")
    if node.get("drop_block_ramp", 0) < 0:
        raise MamlrunError(f"backbone.drop_block_ramp must be >= 0, got {node['drop_block_ramp']}")


def check_meta_optimizer(node: Mapping[str, Any]) -> None:
    """The inner loop's settings, their choices, and the combinations that cannot run. Only
    the keys a node has are checked: an algorithm of one's own may have others."""
    get = node.get
    if get("inner_lr", 1) <= 0:
        raise MamlrunError(f"meta_optimizer.inner_lr must be positive, got {node['inner_lr']}")
    if get("inner_steps", 1) < 1 or get("inner_steps_test", 0) < 0:
        raise MamlrunError(
            "meta_optimizer.inner_steps must be >= 1 and inner_steps_test >= 0, got "
            f"{get('inner_steps')} and {get('inner_steps_test')}"
        )
    _one_of(node, "meta_optimizer", "loss_normalization", LOSS_NORMALIZATION)
    _one_of(node, "meta_optimizer", "learned_inner_lr", LEARNED_LR)
    _one_of(node, "meta_optimizer", "bn_mode", BN_MODES)
    _one_of(node, "meta_optimizer", "inner_optimizer", INNER_OPTIMIZERS)
    adapt = get("adapt_params", "all")
    prefixes = not isinstance(adapt, str) and isinstance(adapt, Sequence)
    if adapt not in ("all", "head", "body") and not prefixes:
        raise MamlrunError(
            f"meta_optimizer.adapt_params must be all, head, body or a list of name prefixes, "
            f"got {adapt!r}"
        )
    if get("inner_optimizer") == "adam" and not get("first_order", True):
        raise MamlrunError(
            "meta_optimizer.inner_optimizer=adam needs first_order=true (Adam's square root "
            "has no second derivative where a gradient is zero)"
        )
    if get("checkpoint_inner") and get("bn_mode") == "per_step":
        raise MamlrunError(
            "meta_optimizer.checkpoint_inner=true is not possible with bn_mode=per_step: "
            "recomputing an inner step would update its running statistics a second time"
        )
    if get("task_batching", "auto") != "auto":
        modes = batching_modes(get("bn_mode"), bool(get("checkpoint_inner")))
        check_batching(node["task_batching"], modes, get("bn_mode"), bool(get("checkpoint_inner")))
    if get("multi_step_loss") and get("msl_iterations", 0) < 1:
        raise MamlrunError("meta_optimizer.multi_step_loss needs msl_iterations >= 1")
    if get("max_memory") is not None:
        parse_max_memory(node["max_memory"])


#: The units of a size in ``meta_optimizer.max_memory``, in bytes: decimal and binary.
SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[A-Za-z]+)")
_TIMES_LOOP = re.compile(r"(?P<factor>\d+(?:\.\d+)?)x_loop")


def parse_max_memory(value: object) -> tuple[str, float | None]:
    """What ``meta_optimizer.max_memory`` bounds ``task_batching=auto``'s pick by:
    ``("times_loop", 2.0)`` for ``2x_loop`` (twice the loop's measured peak), ``("bytes", n)``
    for a size (``2GiB``, ``500MiB``, ``1.5GB``: a number and one of ``SIZE_UNITS``, exactly
    as written there), ``("free", None)`` for ``auto`` (the device's free memory, less a
    margin), ``("unbounded", None)`` for null (the fastest mode, whatever its memory).
    Anything else is one line naming the forms."""
    if value is None:
        return "unbounded", None
    text = str(value)
    if text == "auto":
        return "free", None
    loop, size = _TIMES_LOOP.fullmatch(text), _SIZE.fullmatch(text)
    if loop and float(loop["factor"]) >= 1:
        return "times_loop", float(loop["factor"])
    if size and size["unit"] in SIZE_UNITS and float(size["number"]) > 0:
        return "bytes", float(size["number"]) * SIZE_UNITS[size["unit"]]
    raise MamlrunError(
        f"meta_optimizer.max_memory={text!r} is not a memory bound: use a size (a positive "
        f"number and one of {', '.join(SIZE_UNITS)}, as 2GiB, 500MiB or 1.5GB), Nx_loop "
        "(N >= 1 times the loop's peak, as 2x_loop), auto (the device's free memory) or null "
        "(no bound)"
    )


def parse_batching(mode: str) -> tuple[str, int | None]:
    """``("vmap", 8)`` for ``vmap:8``, ``(mode, None)`` otherwise; ValueError if unknown."""
    name, _, chunk = mode.partition(":")
    valid = name in BATCHING_MODES
    if not valid or (chunk and (name != "vmap" or not chunk.isdigit() or int(chunk) < 1)):
        raise ValueError(
            f"unknown task batching {mode!r} (one of {', '.join(BATCHING_MODES)}, or vmap:C for "
            "chunks of C tasks)"
        )
    return name, int(chunk) if chunk else None


def batching_modes(bn_mode: str, checkpoint_inner: bool) -> tuple[str, ...]:
    """The ways of running a meta-batch's tasks that these inner-loop settings allow."""
    if bn_mode == "per_step":  # statistics updated in place: one module, in order
        return ("loop",)
    return ("loop", "threads") if checkpoint_inner else BATCHING_MODES


def check_batching(
    batching: str, modes: tuple[str, ...], bn_mode: str, checkpoint_inner: bool
) -> None:
    """``batching`` is well formed and one of ``modes``, or one line saying why not: the
    setting that rules it out when one of these does, else the modes there are (a member of
    the family may run its tasks in fewer ways for reasons of its own)."""
    try:
        how = parse_batching(batching)[0]
    except ValueError as ex:
        raise MamlrunError(f"meta_optimizer.task_batching: {ex}") from None
    if how in modes:
        return
    if how not in batching_modes(bn_mode, checkpoint_inner):
        _ruled_out_by_a_setting(batching, bn_mode)
    raise MamlrunError(
        f"meta_optimizer.task_batching={batching} is not possible with these settings: they "
        f"run a meta-batch's tasks only as {' or '.join(modes)}; use {' or '.join(modes)} or auto"
    )


def _ruled_out_by_a_setting(batching: str, bn_mode: str) -> None:
    if bn_mode == "per_step":
        raise MamlrunError(
            f"meta_optimizer.task_batching={batching} is not possible with bn_mode=per_step: "
            "its running statistics are updated in place, task after task on one module, "
            "which neither vmap nor threads can do; use loop or auto"
        )
    raise MamlrunError(
        f"meta_optimizer.task_batching={batching} is not possible with checkpoint_inner=true: "
        "the recomputed inner step is a custom autograd function that vmap cannot batch; "
        "use loop, threads or auto"
    )


def _one_of(node: Mapping[str, Any], group: str, key: str, choices: tuple[str, ...]) -> None:
    if key in node and node[key] not in choices:
        raise MamlrunError(f"{group}.{key} must be one of {', '.join(choices)}, got {node[key]!r}")


#: The range checks of each component group.
COMPONENTS = {
    "dataset": check_dataset,
    "backbone": check_backbone,
    "meta_optimizer": check_meta_optimizer,
}
