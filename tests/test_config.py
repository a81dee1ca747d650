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


@pytest.mark.parametrize("override", ["model=resnet", "optimizer=lion", "data=cifar", "model=mlp,vit", "loss=hinge",
                                      "logger=wandb", "+experiment=course_mpl"])
def test_unknown_group_options_list_the_choices(override):
    group = override.split("=")[0].lstrip("+")
    with pytest.raises(ConfigError) as error:
        check_choices([override])
    assert f"Unknown {group}" in str(error.value)
    for option in choices(group):
        assert option in str(error.value)


# -- names the config may use come from mnist/registry.py, checked on the login node -------------

@pytest.mark.parametrize("overrides, named, choices_named", [
    (["model.arch=resnet"], "model.arch='resnet'", "mlp, cnn"),
    (["model=cnn", "model.output=logits"], "model.output='logits'", "model.output=log_softmax"),
    (["loss=huber", "+loss.reduction=sum"], "reduction", "delta"),
    (["loss=huber", "loss.delta=-1"], "loss.delta=-1", "loss.delta=1.0"),
    (["optimizer=adam", "+optimizer.momentum=0.9"], "momentum", "weight_decay"),
    (["optimizer=sgd_plain", "optimizer.momentum=-0.5"], "optimizer.momentum=-0.5", "optimizer.momentum=0.0"),
    (["logger.name=wandb"], "logger.name='wandb'", "none, tensorboard"),
    (["model.activations=[gelu]"], "'gelu'", "relu, sigmoid, tanh, leaky_relu, elu"),
    (["optimizer.name=lion"], "optimizer.name='lion'", "adadelta, sgd, sgd_momentum, sgd_plain, adam"),
    (["+optimizer.scheduler.name=cosine"], "optimizer.scheduler.name='cosine'", "step_lr"),
    (["+optimizer.scheduler.last_epoch=3"], "last_epoch", "step_size, gamma"),
    (["optimizer.scheduler.gamma=0"], "optimizer.scheduler.gamma=0", "optimizer.scheduler.gamma=0.7"),
    (["optimizer.scheduler=5"], "optimizer.scheduler=5", "optimizer.scheduler=null"),
])
def test_names_the_code_cannot_build_are_refused_with_the_choices(overrides, named, choices_named):
    with pytest.raises(ConfigError) as error:
        compose(overrides)
    message = str(error.value)
    assert named in message and choices_named in message, message
    assert "\n" not in message


def test_a_new_optimizer_file_naming_an_unbuildable_optimizer_is_refused_before_submitting(monkeypatch, tmp_path):
    import shutil

    import mnist.config

    conf = tmp_path / "conf"
    shutil.copytree(mnist.config.CONF_DIR, conf)
    (conf / "optimizer" / "lion.yaml").write_text("name: lion\nlr: 0.0001\nscheduler: null\n")
    monkeypatch.setattr(mnist.config, "CONF_DIR", conf)
    with pytest.raises(ConfigError) as error:
        compose(["optimizer=lion", "launcher=slurm"])
    assert "optimizer.name='lion'" in str(error.value) and "mnist/registry.py" in str(error.value)


def test_the_scheduler_may_be_named_or_left_out():
    assert compose(["+optimizer.scheduler.name=step_lr"]).optimizer.scheduler.name == "step_lr"
    assert compose(["optimizer.scheduler=null"]).optimizer.scheduler is None
