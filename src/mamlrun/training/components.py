"""From a config to the objects a run is made of: device, task source, model, algorithm.

Every component is named by ``_target_`` in its config group and built through
``config.instantiate``; the runner knows them only through their interfaces
(``data.tasks.TaskSource``, ``algorithms.base.Algorithm``, an ``nn.Module`` backbone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mamlrun import config
from mamlrun.algorithms.base import MEMBERS, Algorithm, SupportsPrecision
from mamlrun.data.tasks import TaskSource
from mamlrun.errors import MamlrunError
from mamlrun.models import precision
from mamlrun.training import warm_start

COMPONENTS = ("dataset", "backbone", "meta_optimizer")


@dataclass
class Components:
    source: TaskSource
    model: torch.nn.Module
    algorithm: Algorithm
    make_optimizer: Callable[..., torch.optim.Optimizer]
    make_scheduler: Callable[[torch.optim.Optimizer], Any]
    init: warm_start.Init | None = None  # the file the backbone's weights came from, if any


def build(
    cfg: DictConfig,
    device: torch.device,
    seed: int,
    precision_name: str = "fp32",
    source: TaskSource | None = None,
    warm: bool = False,
) -> Components:
    """Dataset → backbone → meta-optimizer, with the initialisation fixed by ``seed``;
    ``source`` instead of ``cfg.dataset``'s where a test reads other data (cross-domain).

    The model is the backbone plus whatever extra meta-parameters the algorithm learns
    (``algorithm.meta_model``), so optimizer and checkpoints cover those too. The algorithm
    runs its forward passes in ``precision_name`` (``with_precision``). ``warm``: a new run,
    whose backbone starts from ``backbone.init`` when it names a file (``warm_start``), before
    the algorithm wraps it; a resumed run and a test load their own weights over it instead.
    """
    start = config.own_settings("backbone", cfg.backbone) if warm else None
    weights = warm_start.read(start.init) if start is not None and start.init else None
    torch.manual_seed(seed)
    source = source or config.instantiate(cfg.dataset, device=device)
    backbone = _backbone(cfg, source, device)
    init = None
    if weights is not None:  # before meta_model: the algorithm's extras built around them
        node = OmegaConf.to_container(cfg.backbone, resolve=True)
        init = warm_start.load_into(backbone, weights, source.input_shape, node)
    algorithm, make_optimizer = config.build_meta_optimizer(cfg.meta_optimizer)
    if not isinstance(algorithm, Algorithm):
        missing = [m for m in MEMBERS if not hasattr(algorithm, m)]
        raise MamlrunError(
            f"meta_optimizer._target_ builds a {type(algorithm).__name__}, which lacks "
            f"{', '.join(sorted(missing))} (see mamlrun.algorithms.base.Algorithm)"
        )
    algorithm = in_precision(algorithm, precision.choose(precision_name, device))
    model = algorithm.meta_model(backbone)
    scheduler = config.build_scheduler(cfg.meta_optimizer)
    make_scheduler = scheduler or (lambda _: None)
    return Components(source, model, algorithm, make_optimizer, make_scheduler, init)


def fresh_model(cfg: DictConfig, built: Components, seed: int) -> torch.nn.Module:
    """Another model for ``built``'s data and algorithm, initialised from ``seed`` as
    ``build`` would (a baseline beside a restored one, without building the data again)."""
    torch.manual_seed(seed)
    return built.algorithm.meta_model(_backbone(cfg, built.source, built.source.device))


def _backbone(cfg: DictConfig, source: TaskSource, device: torch.device) -> torch.nn.Module:
    """The backbone for ``source``'s inputs and outputs. What a backbone refuses to build is
    the pair's incompatibility (its settings were checked with the config), so the message
    names both choices before the backbone's reason."""
    try:
        backbone = config.instantiate(
            cfg.backbone, in_shape=tuple(source.input_shape), out_features=source.output_size
        )
    except MamlrunError as ex:
        pair = f"{config.choice('backbone', cfg.backbone)} cannot take "
        raise MamlrunError(f"{pair}{config.choice('dataset', cfg.dataset)}: {ex}") from ex
    return backbone.to(device)


def in_precision(algorithm: Algorithm, chosen: precision.Precision) -> Algorithm:
    """The algorithm with its forward passes in ``chosen``; ``fp32`` and ``tf32`` need
    nothing of an algorithm that does not declare ``SupportsPrecision``, ``bf16`` does."""
    if isinstance(algorithm, SupportsPrecision):
        return algorithm.with_precision(chosen)
    if chosen.name == "bf16":
        raise MamlrunError(
            f"precision=bf16 needs an algorithm that can run its forward passes in it; "
            f"{type(algorithm).__name__} has no with_precision "
            "(see mamlrun.algorithms.base.SupportsPrecision): use precision=fp32"
        )
    return algorithm


def component_config(cfg: DictConfig) -> dict[str, Any]:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in COMPONENTS}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MamlrunError(
            f"device={name!r} is not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MamlrunError(
                f"device={name} was requested but CUDA is not available here "
                f"(torch {torch.__version__}); use device=cpu or device=auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MamlrunError(
                f"device={name} does not exist: this machine has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    elif device.type != "cpu":
        raise MamlrunError(f"device={name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device
