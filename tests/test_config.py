"""Every shipped config composes and validates; bad configs fail with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.errors import MamlrunError
from mamlrun.models.conv4 import conv4

CONF = config.config_dir()
config.register_schemas()


def test_config_dir_is_the_checkout_conf_or_the_packaged_one():
    assert (CONF / "train.yaml").is_file()
    assert CONF.name == "conf"


@pytest.mark.parametrize(
    "name,schema", [("test", config.TestConfig), ("adapt", config.AdaptConfig)]
)
def test_test_and_adapt_configs_compose(name, schema):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=["checkpoint=x.pt"])
    assert config.validate(cfg, schema).test_tasks == 600


def test_paper_preset_sets_the_papers_hyperparameters():
    cfg = compose_train("experiment=sinusoid_maml_paper")
    assert (cfg.dataset.shots, cfg.meta_batch_size, cfg.iterations) == (10, 25, 70000)
    mo = cfg.meta_optimizer
    assert (mo.inner_lr, mo.inner_steps, mo.inner_steps_test) == (0.01, 1, 10)
    assert mo.optimizer._target_ == "torch.optim.Adam" and mo.optimizer.lr == 0.001
    assert cfg.backbone.hidden == [40, 40]


def test_presets_override_the_primary_config():
    """`_self_` before the groups: a preset must win over train.yaml's defaults."""
    assert compose_train("debug=smoke").iterations == 20


def test_fomaml_is_maml_with_the_first_order_flag():
    mo = compose_train("meta_optimizer=fomaml").meta_optimizer
    assert mo.first_order is True and mo._target_.endswith("MAML")


def test_unknown_component_key_is_rejected_with_its_name():
    cfg = compose_train("+meta_optimizer.inner_lrr=0.1")
    with pytest.raises(MamlrunError, match=r"unknown key meta_optimizer\.inner_lrr"):
        config.validate(cfg, config.TrainConfig)


def test_wrong_component_type_is_rejected():
    cfg = compose_train("meta_optimizer.inner_lr=fast")
    with pytest.raises(MamlrunError, match=r"meta_optimizer\.inner_lr='fast'.*float"):
        config.validate(cfg, config.TrainConfig)


def test_wrong_top_level_type_is_rejected():
    cfg = OmegaConf.create(OmegaConf.to_container(compose_train()))
    cfg.iterations = "many"
    with pytest.raises(MamlrunError, match="iterations"):
        config.validate(cfg, config.TrainConfig)


def test_keys_that_mamlrun_injects_cannot_be_set():
    cfg = compose_train("+dataset.device=cuda")
    with pytest.raises(MamlrunError, match="dataset.device is set by mamlrun"):
        config.validate(cfg, config.TrainConfig)


def test_tuple_lengths_are_checked():
    cfg = compose_train("dataset.amplitude=[0.1,5.0,9.0]")
    with pytest.raises(MamlrunError, match="dataset.amplitude"):
        config.validate(cfg, config.TrainConfig)


def every_yaml_in_conf() -> list[str]:
    """Every file but the components' bases, which are no choice of their own: each composes
    through the choices that extend it (the image datasets' below, the algorithms' in
    tests/test_algorithm_settings.py)."""
    paths = (p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))
    return sorted(p for p in paths if not p.startswith(("dataset/base/", "meta_optimizer/base/")))


@pytest.mark.parametrize("path", every_yaml_in_conf())
def test_every_yaml_file_in_conf_composes(path):
    """New files are covered as they are added: primary configs, every group, presets for
    Hydra's own groups (launchers, sweepers) included."""
    from hydra.utils import get_class

    rel = Path(path)
    schemas = {"train": config.TrainConfig, "test": config.TestConfig,
               "adapt": config.AdaptConfig, "pretrain": config.PretrainConfig}  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        if rel.parent == Path("."):
            extra = [] if rel.stem in ("train", "pretrain") else ["checkpoint=x.pt"]
            config.validate(compose(rel.stem, overrides=extra), schemas[rel.stem])
            return
        group, choice = rel.parts[0], rel.relative_to(rel.parts[0]).with_suffix("").as_posix()
        if group == "hydra":  # hydra/launcher/x.yaml is the group hydra/launcher's choice x
            group, choice = rel.parent.as_posix(), rel.stem
        command = "pretrain" if group in ("preset", "pretrain_debug") else "train"  # its groups
        cfg = compose(command, overrides=[f"{group}={choice}"], return_hydra_config=True)
    config.validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), schemas[command])
    if group.startswith("hydra/"):
        node = OmegaConf.select(cfg, group.replace("/", "."))
        assert get_class(node._target_), f"{path}: {node._target_} does not import"
    if group == "hparams_search":
        assert cfg.hydra.mode.name == "MULTIRUN"
        assert "OptunaSweeper" in cfg.hydra.sweeper._target_
        assert cfg.hydra.sweeper.direction == "maximize"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["iterations=0"], "iterations must be positive, got 0"),
        (["progress_seconds=-1"], "progress_seconds must be >= 0, got -1"),
        (["max_minutes=0"], "max_minutes must be positive (or null), got 0"),
        (["threads=0"], "threads must be positive (or null: torch's default), got 0"),
        (["threads=-1"], "threads must be positive (or null: torch's default), got -1"),
        (["meta_optimizer.inner_lr=-1"], "meta_optimizer.inner_lr must be positive, got -1"),
        (["meta_optimizer.inner_steps=0"], "meta_optimizer.inner_steps must be >= 1"),
        (["meta_optimizer.bn_mode=batch"], "meta_optimizer.bn_mode must be one of transductive"),
        (["meta_optimizer.loss_normalization=sum"], "loss_normalization must be one of mean"),
        (["meta_optimizer.learned_inner_lr=all"], "learned_inner_lr must be one of none"),
        (["meta_optimizer.inner_optimizer=adam"], "inner_optimizer=adam needs first_order=true"),
        (["meta_optimizer.adapt_params=neck"], "adapt_params must be all, head, body or a list"),
        (["meta_optimizer.task_batching=vmap:0"], "task_batching: unknown task batching"),
        (
            ["meta_optimizer.bn_mode=per_step", "meta_optimizer.task_batching=threads"],
            "task_batching=threads is not possible with bn_mode=per_step",
        ),
        (
            ["meta_optimizer.multi_step_loss=true", "meta_optimizer.msl_iterations=0"],
            "multi_step_loss needs msl_iterations >= 1",
        ),
        (
            ["meta_optimizer=reptile", "+meta_optimizer.checkpoint_inner=true"],
            "unknown key meta_optimizer.checkpoint_inner",
        ),
        (["dataset.shots=0"], "dataset.shots must be a positive integer, got 0"),
        (["dataset.amplitude=[5.0,0.1]"], "dataset.amplitude must be [low, high] with low <= high"),
        (["dataset=omniglot", "dataset.ways=0"], "dataset.ways must be a positive integer"),
        (["dataset=omniglot", "dataset.split=lake"], "dataset.split must be one of maml"),
        (["dataset=cifarfs", "dataset.storage=gpu"], "dataset.storage must be one of device, cpu"),
        (["dataset=cub", "dataset.crop_padding=-1"], "dataset.crop_padding must be a non-negative"),
        (["dataset=miniimagenet", "dataset.std=[0.2,0.0,0.2]"], "dataset.std must be finite"),
        (["backbone=conv4", "backbone.head=max"], "backbone.head must be one of mean, flatten"),
        (["backbone=conv4", "backbone.filters=0"], "backbone.filters must be a positive integer"),
        (["backbone.hidden=[40,0]"], "backbone.hidden must be positive sizes, got [40, 0]"),
        (["backbone=resnet12", "backbone.keep_prob=0"], "backbone.keep_prob must be in (0, 1]"),
    ],
)
def test_a_setting_out_of_range_is_refused_in_one_line_before_anything_is_built(overrides, message):
    """``validate`` checks every range at once, for the CLI and ``commands.train`` alike:
    nothing is loaded or built (no dataset here exists on disk)."""
    with pytest.raises(MamlrunError) as error:
        config.validate(compose_train(*overrides), config.TrainConfig)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_test_command_checks_its_own_ranges():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("test", overrides=["checkpoint=x.pt", "test_tasks=0"])
    with pytest.raises(MamlrunError, match="test_tasks must be positive, got 0"):
        config.validate(cfg, config.TestConfig)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("adapt", overrides=["checkpoint=x.pt", "threads=0"])
    with pytest.raises(MamlrunError, match="threads must be positive"):
        config.validate(cfg, config.AdaptConfig)


def test_an_algorithm_built_from_python_gets_the_same_checks():
    with pytest.raises(MamlrunError, match="meta_optimizer.inner_lr must be positive"):
        config.algorithm("maml", inner_lr=0.0)


def test_the_choices_the_config_checks_are_those_data_and_models_implement():
    """``data/`` and ``models/`` cannot import the config (they stand beside it), so the
    choices are named twice; this keeps the two lists the same."""
    from mamlrun.config import ranges
    from mamlrun.data import omniglot

    assert ranges.OMNIGLOT_SPLITS == omniglot.SPLIT_NAMES
    for downsample in ranges.DOWNSAMPLE:
        for head in ranges.HEADS:
            conv4((1, 28, 28), 5, filters=2, downsample=downsample, head=head)


IMAGE_DATASETS = ("cifarfs", "cub", "fc100", "miniimagenet", "tieredimagenet")


@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_an_image_dataset_extends_the_one_base_with_only_what_differs(name):
    base = OmegaConf.load(CONF / "dataset" / "base" / "images.yaml")
    own = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
    assert list(own.defaults) == ["base/images@_here_", "_self_"]
    changed = [k for k in own if k not in ("defaults", "_target_", "_preset_")]
    assert all(k in base and own[k] != base[k] for k in changed), changed
    composed = config.group_config("dataset", name)
    assert set(composed) == set(base) | {"_target_", "_preset_"}


def test_the_base_of_the_image_datasets_is_no_dataset_choice():
    from mamlrun.cli import helptext

    names = [name for name, _ in helptext.choices("dataset")]
    assert set(IMAGE_DATASETS) <= set(names) and not any("base" in n for n in names)
