"""``task_batching=auto`` bounded by ``meta_optimizer.max_memory`` (issue 26): the fastest
candidate whose measured peak for one meta-batch fits; ``2x_loop`` by default, so that no
mode holding more than twice the loop's memory is picked unless the user allows it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import compose_train
from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.config import ranges
from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint
from mamlrun.training import auto_batching, commands
from mamlrun.training.auto_batching import Measured, pick
from mamlrun.training.memory import PeakMemory, peak_growth

MiB, GiB = 2**20, 2**30


def probe(**candidates: tuple[float, float]) -> list[Measured]:
    """``name=(seconds, MiB)``; ``name=(None, None)`` for one that cannot run. Python names
    cannot hold ``:`` or ``+``: ``vmap_2`` is ``vmap:2``, ``threads_ckpt`` recomputes."""
    out = []
    for name, (seconds, mib) in candidates.items():
        name = name.replace("_", ":").replace(":ckpt", auto_batching.RECOMPUTED)
        if seconds is None:
            out.append(Measured(name, float("inf"), float("nan"), "no batching rule"))
        else:
            out.append(Measured(name, seconds, mib * MiB))
    return out


#: Issue 26's shape of a preset: the faster the mode, the more memory it holds.
PRESET = probe(
    loop=(2.0, 100), threads=(1.2, 190), vmap=(0.9, 1300), vmap_8=(1.0, 420),
    threads_ckpt=(1.4, 60),
)  # fmt: skip


# ---------------------------------------------------------------------- parsing the setting
@pytest.mark.parametrize(
    "text,expected",
    [
        ("2GiB", ("bytes", 2 * GiB)),
        ("500MiB", ("bytes", 500 * MiB)),
        ("1.5GB", ("bytes", 1.5e9)),
        ("64KiB", ("bytes", 64 * 2**10)),
        ("2x_loop", ("times_loop", 2.0)),
        ("1.5x_loop", ("times_loop", 1.5)),
        ("auto", ("free", None)),
        (None, ("unbounded", None)),
    ],
)
def test_max_memory_reads_sizes_multiples_of_the_loop_auto_and_null(text, expected):
    assert ranges.parse_max_memory(text) == expected


@pytest.mark.parametrize(
    "text", ["2G", "2gib", "2 GiB", "0MiB", "-1GiB", "1e9B", "lots", "0.5x_loop", "2x", ""]
)
def test_anything_else_is_one_line_naming_the_forms(text):
    with pytest.raises(MamlrunError) as error:
        ranges.parse_max_memory(text)
    message = str(error.value)
    assert "\n" not in message and f"max_memory={text!r} is not a memory bound" in message
    assert "2GiB" in message and "2x_loop" in message and "auto" in message


def test_the_default_is_twice_the_loop_written_once_in_the_yaml():
    cfg = compose_train("dataset=sinusoid")
    assert cfg.meta_optimizer.max_memory == "2x_loop"
    for choice in ("maml", "reptile", "imaml", "cavia"):  # every learner extends the base
        assert config.group_config("meta_optimizer", choice).max_memory == "2x_loop"


def test_a_bad_max_memory_stops_train_in_one_line_with_exit_2(cli_here):
    out = cli_here("train", "debug=smoke", "meta_optimizer.max_memory=2G")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mamlrun: error: meta_optimizer.max_memory='2G' is not a memory bound: use a size (a "
        "positive number and one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, as 2GiB, 500MiB or "
        "1.5GB), Nx_loop (N >= 1 times the loop's peak, as 2x_loop), auto (the device's free "
        "memory) or null (no bound)"
    ]


# ---------------------------------------------------------------------- the rule
def test_the_default_picks_the_fastest_within_twice_the_loops_peak():
    choice = pick(PRESET, "2x_loop", None)
    assert choice.chosen.name == "threads"  # 190 MiB <= 2 x 100; vmap:8 and vmap are faster
    assert choice.bound == 200 * MiB
    assert "vmap would be 1.3x faster but peaks at 1.27 GiB" in choice.reason
    assert "meta_optimizer.max_memory=1.3GiB or null allows it" in choice.reason


def test_twice_the_loop_is_a_hard_line_however_much_faster_a_mode_is():
    just_over = probe(loop=(2.0, 100), threads=(0.1, 201))
    assert pick(just_over, "2x_loop", None).chosen.name == "loop"
    assert pick(just_over, "2.1x_loop", None).chosen.name == "threads"


def test_below_16_mib_above_the_loop_peaks_do_not_count():
    """The sinusoid's MLP: peaks of a few KiB, which the polling resolves no better."""
    tiny = [Measured("loop", 0.05, 70e3), Measured("vmap", 0.01, 150e3)]
    assert pick(tiny, "2x_loop", None).chosen.name == "vmap"
    assert pick(tiny, "100KB", None).chosen.name == "loop"  # a size is a size


def test_null_is_the_fastest_whatever_its_memory():
    choice = pick(PRESET, None, None)
    assert choice.chosen.name == "vmap" and choice.bound is None


def test_a_size_and_auto_bound_the_peak_in_bytes():
    assert pick(PRESET, "500MiB", None).chosen.name == "vmap:8"
    assert pick(PRESET, "150MiB", None).chosen.name == "threads+checkpoint_inner"
    auto = pick(PRESET, "auto", free=2 * GiB)  # 80% of it: 1.6 GiB
    assert auto.chosen.name == "vmap" and auto.bound == pytest.approx(0.8 * 2 * GiB)
    assert pick(PRESET, "auto", free=600 * MiB).chosen.name == "vmap:8"


def test_nothing_fitting_is_one_line_naming_the_least_memory_and_what_to_change():
    with pytest.raises(MamlrunError) as error:
        pick(PRESET, "50MiB", None)
    assert str(error.value) == (
        "task_batching=auto: no task batching fits max_memory=50MiB (50 MiB): the least "
        "memory, threads+checkpoint_inner's, peaks at 60 MiB for one meta-batch; raise "
        "meta_optimizer.max_memory (null: no bound) or lower meta_batch_size"
    )


def test_candidates_that_cannot_run_are_never_picked():
    measured = probe(loop=(2.0, 100), vmap=(None, None), vmap_2=(None, None))
    assert pick(measured, None, None).chosen.name == "loop"
    with pytest.raises(MamlrunError, match="no task batching could run .loop: boom"):
        pick([Measured("loop", float("inf"), float("nan"), "boom")], None, None)


def test_without_a_measurable_peak_a_bound_keeps_the_loop():
    unknown = [Measured("loop", 2.0, float("nan")), Measured("vmap", 0.5, float("nan"))]
    assert pick(unknown, "2x_loop", None).chosen.name == "loop"
    assert pick(unknown, None, None).chosen.name == "vmap"


def test_the_log_has_one_line_per_candidate_then_the_choice():
    choice = pick(PRESET, "2x_loop", None)
    lines = auto_batching.lines(PRESET, choice, tasks=32)
    assert len(lines) == len(PRESET) + 1
    assert lines[0] == (
        "task_batching=auto: loop 2 s per meta-batch (16 tasks/s), peak 100 MiB, 1x the loop's"
    )
    assert lines[2].endswith("peak 1.27 GiB, 13x the loop's, over max_memory")
    assert not lines[1].endswith("over max_memory")
    assert lines[-1].startswith(
        "task_batching=auto chose threads: the fastest within max_memory=2x_loop "
        "(2 x the loop's 100 MiB = 200 MiB)"
    )


# ---------------------------------------------------------------------- the candidates
def test_recomputed_steps_are_candidates_only_for_second_order_many_step_maml(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu, modes = torch.device("cpu"), ("loop", "threads", "vmap")

    def names(**changes) -> list[str]:
        node = OmegaConf.merge(config.group_config("meta_optimizer", "maml"), changes)
        return auto_batching.candidates(modes, node, 8, cpu)

    assert names(inner_steps=5)[-2:] == ["loop+checkpoint_inner", "threads+checkpoint_inner"]
    assert not any("checkpoint" in n for n in names(inner_steps=1))
    assert not any("checkpoint" in n for n in names(inner_steps=5, first_order=True))
    assert not any("checkpoint" in n for n in names(inner_steps=5, checkpoint_inner=True))
    reptile = config.group_config("meta_optimizer", "reptile")
    assert not any("checkpoint" in n for n in auto_batching.candidates(modes, reptile, 8, cpu))


# ---------------------------------------------------------------------- measuring
def test_a_cpu_peak_counts_what_the_work_allocates_and_not_what_was_there_before():
    kept = torch.ones(64 * MiB // 4)  # allocated before: not the work's

    def work() -> None:
        buffer = torch.ones(32 * MiB // 4)
        (buffer * 2).sum()  # a second 32 MiB while the first is alive

    grown = peak_growth(work, torch.device("cpu"))
    assert 60 * MiB <= grown <= 80 * MiB, grown / MiB
    with PeakMemory() as peak:
        pass
    assert abs(peak.heap_growth) < 4 * MiB
    del kept


# ---------------------------------------------------------------------- in a run
SMOKE = (
    "dataset=sinusoid", "device=cpu", "iterations=2", "meta_batch_size=4", "val_every=2",
    "val_tasks=2", "eval_batch_size=2", "checkpoint_every=2", "final_test=false",
    "final_adapt=false",
)  # fmt: skip


def test_a_run_logs_every_candidates_speed_and_peak_and_keeps_them(tmp_path, caplog):
    cfg = compose_train(*SMOKE, "meta_optimizer.max_memory=1GiB")
    with caplog.at_level(logging.INFO, logger="mamlrun"):
        commands.train(cfg, run_dir=tmp_path)
    said = [r.message for r in caplog.records if r.message.startswith("task_batching=auto")]
    announced, said = said[0], said[1:]
    results = json.loads((tmp_path / "results.json").read_text())
    kept = results["task_batching_probe"]
    names = [c["name"] for c in kept["candidates"]]
    assert len(said) == len(names) + 1 and len(names) >= 2  # loop and vmap at least
    assert announced == (
        f"task_batching=auto: measuring {', '.join(names)} on a meta-batch of 4 tasks "
        "(max_memory=1GiB)"
    )
    for line, name in zip(said, names, strict=False):
        assert line.startswith(f"task_batching=auto: {name} ") and " peak " in line
    assert said[-1].startswith(f"task_batching=auto chose {results['task_batching']}: ")
    assert "within max_memory=1GiB (1 GiB)" in said[-1]
    assert kept["max_memory"] == "1GiB" and kept["bound_bytes"] == GiB
    assert all(c["seconds"] > 0 and c["peak_bytes"] is not None for c in kept["candidates"])
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["task_batching_probe"] == kept


def test_a_recomputing_choice_is_written_into_the_run_and_resumed_with(tmp_path, monkeypatch):
    """Where threads with checkpoint_inner wins, the run's config says checkpoint_inner=true
    (what a resumed run and test rebuild the algorithm from) and the mode is threads."""

    def measured(names, step, device, repeats=2):
        for name in names:
            step(name)  # every candidate really runs with its settings
        return [Measured(n, 0.5 if n == "threads+checkpoint_inner" else 1.0, MiB) for n in names]

    monkeypatch.setattr(auto_batching, "measure", measured)
    common = (*SMOKE, "meta_optimizer.inner_steps=2", "threads=2")
    commands.train(compose_train(*common), run_dir=tmp_path)
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["task_batching"] == "threads"
    assert saved["config"]["run"]["meta_optimizer"]["checkpoint_inner"] is True
    assert OmegaConf.load(tmp_path / "config.yaml").meta_optimizer.checkpoint_inner is True
    monkeypatch.setattr(auto_batching, "measure", None)  # a resumed run probes nothing
    commands.train(compose_train(*common, "iterations=4", "resume=true"), run_dir=tmp_path)
    resumed = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert resumed["progress"]["step"] == 4 and resumed["task_batching"] == "threads"
    assert resumed["config"]["run"]["meta_optimizer"]["checkpoint_inner"] is True
    assert resumed["task_batching_probe"]["chosen"] == "threads+checkpoint_inner"


def test_how_much_memory_auto_may_spend_is_not_a_difference_from_the_paper():
    """A run from before max_memory, or one that allowed more, computed the same thing."""
    from mamlrun.results import reference

    preset = {"meta_optimizer.inner_lr": 0.4, "meta_optimizer.max_memory": "2x_loop"}
    assert reference.differences({"meta_optimizer.inner_lr": 0.4}, preset) == []
    allowed = {**preset, "meta_optimizer.max_memory": None}
    assert reference.differences(allowed, preset) == []


def test_a_bound_below_every_candidates_peak_stops_the_run_before_training(cli_here, monkeypatch):
    """Peaks as measured on a conv4 preset: a sinusoid's are a few KiB, which the polling of
    a CPU's heap can miss altogether for a step of a few milliseconds."""

    def measured(names, step, device, repeats=2):
        return [Measured(n, 1.0, (50 + 10 * i) * MiB) for i, n in enumerate(names)]

    monkeypatch.setattr(auto_batching, "measure", measured)
    out = cli_here("train", "debug=smoke", "meta_optimizer.max_memory=40MiB")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mamlrun: error: task_batching=auto: no task batching fits max_memory=40MiB (40 MiB): "
        "the least memory, loop's, peaks at 50 MiB for one meta-batch; raise "
        "meta_optimizer.max_memory (null: no bound) or lower meta_batch_size"
    ]
