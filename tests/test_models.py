import pytest
import torch

from mnist.cnn import CNN
from mnist.config import compose
from mnist.mlp import MLP
from mnist.models import build_model
from mnist.optimizers import build_optimizer


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())


def test_course_models_have_the_course_parameter_counts():
    assert n_parameters(MLP()) == 101_770
    assert n_parameters(CNN()) == 1_199_882


def test_models_from_config_match_the_course():
    assert n_parameters(build_model(compose(["model=mlp"]).model)) == 101_770
    assert n_parameters(build_model(compose(["model=cnn"]).model)) == 1_199_882
    # 784-128-64-10 and 784-256-10
    deep = build_model(compose(["model=mlp_deep"]).model)
    assert n_parameters(deep) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert n_parameters(build_model(compose(["model=mlp_sigmoid"]).model)) == 784 * 256 + 256 + 256 * 10 + 10


def test_variant_layers_are_the_ones_the_course_shows():
    deep = build_model(compose(["model=mlp_deep"]).model)
    kinds = [type(layer).__name__ for layer in deep.layers]
    assert kinds == ["Flatten", "Linear", "ReLU", "Linear", "LeakyReLU", "Linear"]
    assert deep.layers[4].negative_slope == 0.01
    sigmoid = build_model(compose(["model=mlp_sigmoid"]).model)
    assert [type(layer).__name__ for layer in sigmoid.layers] == ["Flatten", "Linear", "Sigmoid", "Linear"]


def test_outputs_are_log_probabilities_or_probabilities():
    x = torch.randn(5, 1, 28, 28)
    for name in ("mlp", "cnn", "mlp_deep"):
        out = build_model(compose([f"model={name}"]).model).eval()(x)
        assert out.shape == (5, 10)
        torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))
    probs = build_model(compose(["model=mlp_sigmoid"]).model)(x)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    assert (probs >= 0).all()


def test_every_optimizer_builds_with_the_course_learning_rate():
    expected = {"adadelta": 1.0, "sgd": 0.01, "sgd_momentum": 0.01, "sgd_plain": 0.01, "adam": 0.001,
                "adamw": 0.001, "rmsprop": 0.001, "adagrad": 0.01}
    model = MLP()
    for name, lr in expected.items():
        optimizer, scheduler = build_optimizer(compose([f"optimizer={name}"]).optimizer, model.parameters())
        assert type(optimizer).__name__.lower() == name.split("_")[0]
        assert optimizer.param_groups[0]["lr"] == lr
        assert (scheduler is not None) == (name == "adadelta")
    for name, momentum in (("sgd", 0.9), ("sgd_momentum", 0.9), ("sgd_plain", 0)):
        optimizer, _ = build_optimizer(compose([f"optimizer={name}"]).optimizer, model.parameters())
        assert optimizer.param_groups[0]["momentum"] == momentum


def test_reference_scheduler_is_steplr_one_epoch_gamma_point_seven():
    optimizer, scheduler = build_optimizer(compose([]).optimizer, MLP().parameters())
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.7


# -- mnist/registry.py: every name the config may use builds, and nothing else does --------------

def test_every_registered_architecture_and_output_builds_and_gives_that_output():
    import importlib
    import inspect

    from mnist import registry
    from mnist.config import CONF_DIR

    x = torch.randn(3, 1, 28, 28)
    for arch, (model_class, options, outputs) in registry.ARCHS.items():
        module, name = model_class.rsplit(".", 1)
        arguments = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
        assert arguments == list(options), f"{model_class} takes {arguments}, registry.ARCHS says {options}"
        model_files = [p.stem for p in (CONF_DIR / "model").glob("*.yaml") if f"arch: {arch}\n" in p.read_text()]
        assert model_files, f"no conf/model/*.yaml has arch: {arch}"
        for output in outputs:
            fitting_loss = ["loss=cross_entropy"] if output == "none" else []  # nll takes no logits
            cfg = compose([f"model={model_files[0]}", *fitting_loss, f"model.output={output}"]).model
            model = build_model(cfg).eval()
            assert model.output == output, (arch, output)  # mnist.losses reads it (nll on softmax: its log)
            out = model(x)
            probabilities = {"softmax": out, "log_softmax": out.exp(), "none": out.softmax(dim=1)}[output]
            torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))


def test_every_registered_activation_builds_into_the_mlp():
    from mnist import registry

    x = torch.randn(3, 1, 28, 28)
    for name in registry.ACTIVATIONS:
        model = build_model(compose(["model=mlp", "model.hidden=[8]", f"model.activations=[{name}]"]).model)
        assert model(x).shape == (3, 10), name


def test_every_registered_optimizer_and_scheduler_builds_and_steps():
    from omegaconf import OmegaConf

    from mnist import registry

    for name, (_, optimizer_options) in registry.OPTIMIZERS.items():
        for scheduler_name, (_, options) in registry.SCHEDULERS.items():
            cfg = OmegaConf.create({"name": name, "lr": 0.5, **optimizer_options,
                                    "scheduler": {"name": scheduler_name, **options}})  # torch takes every option
            model = MLP([8], ["relu"])
            optimizer, scheduler = build_optimizer(cfg, model.parameters())
            before = model.layers[1].weight.detach().clone()
            model(torch.randn(4, 1, 28, 28)).sum().backward()
            optimizer.step()
            scheduler.step()
            assert not torch.equal(before, model.layers[1].weight), (name, scheduler_name)


def test_an_unregistered_architecture_is_not_built_as_something_else():
    from omegaconf import OmegaConf

    with pytest.raises(KeyError):  # config.validate refuses it first; this is the builder's own guard
        build_model(OmegaConf.create({"arch": "resnet", "hidden": [8], "activations": ["relu"],
                                      "output": "log_softmax"}))


def test_every_registered_loss_takes_each_output_it_fits_and_steps():
    from mnist import registry
    from mnist.losses import Loss

    x, labels = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 9, 9])
    for name, entry in registry.LOSSES.items():
        for output in entry.fits:
            model = MLP([8], ["relu"], output)
            loss = Loss({"name": name, **entry.options}, output)  # torch takes every option
            mean = loss(model(x), labels)
            mean.backward()
            assert mean.ndim == 0 and torch.isfinite(mean) and model.layers[1].weight.grad.abs().sum() > 0, name
            summed = loss(model(x), labels, reduction="sum")
            torch.testing.assert_close(summed / 6, mean)  # the test set's average is the training loss's mean


# -- docs/models.md: a new model is a class in its own module, a registry line and a yaml file ----------

def documented_files():
    """{path: the text docs/models.md shows for it}: each code block under a line naming a file in backticks."""
    import re

    from conftest import ROOT

    page = (ROOT / "docs" / "models.md").read_text()
    block_after_a_file_name = r"`([\w/.]+\.(?:py|yaml))`[^\n]*(?:\n[^\n`]+)*\n\n```\w+\n(.*?)```"
    return dict(re.findall(block_after_a_file_name, page, re.DOTALL))


def test_the_model_page_shows_the_projects_own_files():
    from conftest import ROOT

    shown = documented_files()
    assert set(shown) == {"mnist/small_cnn.py", "mnist/registry.py", "conf/model/small_cnn.yaml"}, set(shown)
    for path, block in shown.items():
        text = (ROOT / path).read_text()
        assert (block in text) if path == "mnist/registry.py" else (block == text), f"docs/models.md's {path} differs"


def test_the_documented_model_trains_from_its_yaml(tiny_data, tmp_path):
    from conftest import run

    result = run(["model=small_cnn", "model.channels=8", "trainer.epochs=1", f"data.root={tiny_data}",
                  f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Test set: Average loss" in (tmp_path / "run" / "train.log").read_text()
    model = build_model(compose(["model=small_cnn", "model.channels=8"]).model)
    assert n_parameters(model) == 8 * 9 + 8 + 8 * 13 * 13 * 10 + 10


def test_a_model_option_its_class_cannot_take_is_one_paragraph():
    from mnist.errors import UserError

    with pytest.raises(UserError, match=r"model=small_cnn \(model.arch=small_cnn\) cannot be built from "
                                        r"model.channels=-4, model.output=log_softmax: .*conf/model/small_cnn.yaml"):
        build_model(compose(["model=small_cnn", "model.channels=-4"]).model)
