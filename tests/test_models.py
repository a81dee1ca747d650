import pytest
import torch

from mnist.cnn import CNN
from mnist.config import compose
from mnist.mlp import MLP
from mnist.models import build_model, build_optimizer


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
    from mnist import registry
    from mnist.models import BUILDERS

    assert set(BUILDERS) == set(registry.ARCHS), "a builder in mnist/models.py per registry.ARCHS entry"
    x = torch.randn(3, 1, 28, 28)
    for arch, outputs in registry.ARCHS.items():
        for output in outputs:
            fitting_loss = ["loss=cross_entropy"] if output == "none" else []  # nll takes no logits
            cfg = compose(["model=mlp", f"model.arch={arch}", *fitting_loss, f"model.output={output}"]).model
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
