"""Shared helpers: run the CLI as a user would, and compose configs as the CLI does."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamlrun import errors
from mamlrun.data.tasks import TaskBatch
from mamlrun.training.episodes import backward

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Tests read real data from ``../shared/data`` (or ``$MAMLRUN_DATA``), never from src."""
    return Path(os.environ.get("MAMLRUN_DATA", REPO.parent / "shared" / "data"))


HAS_OMNIGLOT = all(
    (data_root() / "omniglot" / f"{s}.zip").is_file()
    for s in ("images_background", "images_evaluation")
)

#: The one marker for tests that read the real Omniglot zips: a clone without the shared data
#: skips them (with the reason shown by ``pytest -rs``) instead of downloading 9 MB.
OMNIGLOT_MISSING = f"needs the real Omniglot zips in {data_root()}/omniglot"
needs_omniglot = pytest.mark.skipif(not HAS_OMNIGLOT, reason=OMNIGLOT_MISSING)


@pytest.fixture(scope="session", autouse=True)
def _no_leaks(tmp_path_factory):
    """No test reads or writes the user's data or cache: ``$MAMLRUN_DATA`` is the shared data
    when it is there, else an empty folder (so nothing is downloaded into a real place), and
    ``$XDG_CACHE_HOME`` (where ``download.user_cache_dir`` lives) is one temporary folder per
    session, shared so that the real data's derived caches are built once. Session-wide, so
    that module-scoped fixtures (a training run shared by a file's tests) see them too;
    subprocesses inherit both. Tests that need a cache of their own set it themselves."""
    root = data_root() if data_root().is_dir() else tmp_path_factory.mktemp("no-data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAMLRUN_DATA", str(root))
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        patch.setenv(errors.STRICT, "1")  # an object's repr in any message fails its test
        yield


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """Every test starts with torch's own thread count: a test that sets ``threads`` without
    going through a command (which gives the count back itself) does not slow the rest."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def adapts_after_training(cwd: Path, env: dict | None = None, run: str = "run") -> dict:
    """``mamlrun adapt`` on the training run ``cwd/run`` (its best.pt), on two tasks for two
    steps: the third command of a dataset's smoke cycle (train with final test, then adapt).
    Returns its results.json, checked to hold the curve after 0, 1 and 2 inner steps, each an
    accuracy over the two tasks' query images (a whole number of them right)."""
    out = run_cli(
        "adapt", f"checkpoint={run}", "test_tasks=2", "eval_batch_size=2", "inner_steps=2",
        "baseline.steps=1", "hydra.run.dir=adapted", cwd=cwd, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads((cwd / "adapted" / "results.json").read_text())
    assert result["steps"] == [0, 1, 2] and len(result["mean"]) == 3
    trained = json.loads((cwd / run / "results.json").read_text())["dataset"]
    predictions = 2 * trained["ways"] * trained["query"]
    assert result["metric"] == "accuracy" and result["test_tasks"] == 2
    for mean in result["mean"]:
        assert mean * predictions == pytest.approx(round(mean * predictions), abs=1e-6), mean
    return result


@pytest.fixture
def as_on_an_accelerator(monkeypatch):
    """Image sources on the CPU take the paths they take on an accelerator: ``storage=cpu``
    copies each meta-batch's images over, ``storage=device`` reads a cached split whole into
    "device" memory. On a plain CPU both storages are one place and take one path, so a test
    comparing them would compare that path with itself."""
    from mamlrun.data import episodic

    monkeypatch.setattr(episodic, "host_is_device", lambda device: False)


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """``mamlrun ARGS`` in a subprocess, as a user would type it (stdout and stderr captured)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR") if full_env["HYDRA_FULL_ERROR"] == "0" else None
    return subprocess.run(
        [sys.executable, "-m", "mamlrun.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli(tmp_path):
    def call(*args: str, **kwargs):
        return run_cli(*args, cwd=kwargs.pop("cwd", tmp_path), **kwargs)

    return call


@pytest.fixture
def cli_here(tmp_path, monkeypatch, capfd):
    """``mamlrun ARGS`` through the CLI's own ``main`` in this process, in ``tmp_path``, with the
    same exit status and output a subprocess would give: for commands that stop before any
    work (mistakes, ``--help``, ``--cfg``), where starting an interpreter would be most of the
    cost (~2 s a call on two cores). ``run_cli`` keeps the tests that need a real process."""
    from mamlrun.cli import main

    def call(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        capfd.readouterr()
        saved = _logging_state()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        finally:
            _restore_logging(saved)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


def _logging_state() -> dict:
    """Every logger's handlers, level, propagation and switch: Hydra's job logging rewrites
    them (file handlers into the run folder, ``disable_existing_loggers``), which a process of
    its own would simply throw away."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return {lg: (lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers}


def _restore_logging(saved: dict) -> None:
    for lg in [logging.getLogger()] + list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(lg, logging.Logger):
            continue
        handlers, level, propagate, disabled = saved.get(lg, ([], logging.NOTSET, True, False))
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.level, lg.propagate, lg.disabled = level, propagate, disabled


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Spy on ``module.name``: each call appends to the returned list, and still runs."""
    calls: list[int] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def compose_train(*overrides: str):
    """The `train` config as the CLI composes it, with these overrides."""
    from hydra import compose, initialize_config_dir

    from mamlrun import config

    config.register_schemas()
    with initialize_config_dir(config_dir=str(config.config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def maml(**settings):
    """MAML with ``conf/meta_optimizer/maml.yaml``'s values, ``settings`` changed."""
    from mamlrun import config

    return config.algorithm("maml", **settings)


def reptile(**settings):
    from mamlrun import config

    return config.algorithm("reptile", **settings)


def meta_gradient(algo, model, batch, task_type: str, batching: str, step: int | None = None):
    """Accumulate the meta-gradient into ``.grad`` as the training loop does; returns the
    logged (mean loss, mean metric)."""
    return backward(algo.bind(task_type, batching).meta_objective(model, batch, step))


def finite_difference_error(meta_loss, params: list, exact: torch.Tensor, every: int) -> float:
    """Relative error of the gradient ``exact`` (all ``params`` flattened) against central
    differences of ``meta_loss`` at every ``every``-th coordinate of each parameter."""
    numeric, analytic, eps, offset = [], [], 1e-6, 0
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for j in range(0, p.numel(), every):
                flat[j] += eps
                up = meta_loss()
                flat[j] -= 2 * eps
                down = meta_loss()
                flat[j] += eps
                numeric.append((up - down) / (2 * eps))
                analytic.append(float(exact[offset + j]))
            offset += p.numel()
    numeric, analytic = torch.tensor(numeric), torch.tensor(analytic)
    return float((numeric - analytic).norm() / numeric.norm())


def image_batch(tasks: int = 2, ways: int = 3, shots: int = 2, query: int = 2) -> TaskBatch:
    """Tiny float64 classification tasks of random 8×8 images, labels in class order."""
    g = torch.Generator().manual_seed(0)

    def images(n):
        return torch.rand(tasks, n, 1, 8, 8, generator=g, dtype=torch.float64)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).expand(tasks, -1).clone()

    return TaskBatch(images(ways * shots), labels(shots), images(ways * query), labels(query))
