"""Every shipped config composes and validates; bad configs fail with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.errors import MamlrunError

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
    return sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))


@pytest.mark.parametrize("path", every_yaml_in_conf())
def test_every_yaml_file_in_conf_composes(path):
    """New files are covered as they are added: primary configs, every group, presets for
    Hydra's own groups (launchers, sweepers) included."""
    from hydra.utils import get_class

    rel = Path(path)
    schemas = {"train": config.TrainConfig, "test": config.TestConfig, "adapt": config.AdaptConfig}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        if rel.parent == Path("."):
            extra = [] if rel.stem == "train" else ["checkpoint=x.pt"]
            config.validate(compose(rel.stem, overrides=extra), schemas[rel.stem])
            return
        group, choice = rel.parts[0], rel.relative_to(rel.parts[0]).with_suffix("").as_posix()
        if group == "hydra":  # hydra/launcher/x.yaml is the group hydra/launcher's choice x
            group, choice = rel.parent.as_posix(), rel.stem
        cfg = compose("train", overrides=[f"{group}={choice}"], return_hydra_config=True)
    config.validate(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), config.TrainConfig
    )
    if group.startswith("hydra/"):
        node = OmegaConf.select(cfg, group.replace("/", "."))
        assert get_class(node._target_), f"{path}: {node._target_} does not import"
    if group == "hparams_search":
        assert cfg.hydra.mode.name == "MULTIRUN"
        assert "OptunaSweeper" in cfg.hydra.sweeper._target_
        assert cfg.hydra.sweeper.direction == "maximize"
