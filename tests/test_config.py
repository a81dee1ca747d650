import os

import pytest

from mnist.config import GROUPS, ConfigError, check_choices, choices, compose


def test_defaults_are_the_course_reference_settings():
    cfg = compose([])
    assert cfg.model.name == "mlp"
    assert cfg.optimizer.name == "adadelta" and cfg.optimizer.lr == 1.0
    assert dict(cfg.optimizer.scheduler) == {"step_size": 1, "gamma": 0.7}
    assert cfg.trainer.epochs == 3 and cfg.trainer.seed == 1 and cfg.trainer.log_interval == 10
    assert cfg.data.batch_size == 64 and cfg.data.test_batch_size == 1000
    assert (cfg.data.mean, cfg.data.std) == (0.1307, 0.3081)
    assert cfg.launcher.name == "local"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    assert choices(group), f"conf/{group}/ is empty"
    for option in choices(group):
        cfg = compose([f"{group}={option}"])
        assert cfg[group] is not None


def test_overrides_reach_the_config():
    cfg = compose(["model=cnn", "optimizer=sgd", "optimizer.lr=0.05", "trainer.epochs=10", "data=fashion_mnist"])
    assert (cfg.model.name, cfg.optimizer.name, cfg.optimizer.lr) == ("cnn", "sgd", 0.05)
    assert cfg.trainer.epochs == 10 and cfg.data.name == "fashion_mnist"


def test_data_root_defaults_to_env_then_dot_data_and_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.delenv("MNIST_DATA", raising=False)
    assert compose([]).data.root == os.path.abspath("data")
    monkeypatch.setenv("MNIST_DATA", str(tmp_path))
    assert compose([]).data.root == str(tmp_path)


@pytest.mark.parametrize("override, named", [
    ("trainer.epochs=0", "trainer.epochs=0"),
    ("trainer.epochs=-2", "trainer.epochs=-2"),
    ("trainer.epochs=three", "trainer.epochs='three'"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.test_batch_size=-5", "data.test_batch_size=-5"),
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
    ("trainer.device=tpu", "trainer.device='tpu'"),
    ("trainer.log_interval=0", "trainer.log_interval=0"),
    ("model.activations=[swish]", "swish"),
])
def test_bad_values_are_named_with_a_fix(override, named):
    with pytest.raises(ConfigError) as error:
        compose([override])
    message = str(error.value)
    assert named in message
    assert "Set" in message or "Choose" in message


@pytest.mark.parametrize("override", ["model=resnet", "optimizer=lion", "data=cifar", "model=mlp,vit"])
def test_unknown_group_options_list_the_choices(override):
    group = override.split("=")[0]
    with pytest.raises(ConfigError) as error:
        check_choices([override])
    assert f"Unknown {group}" in str(error.value)
    for option in choices(group):
        assert option in str(error.value)
