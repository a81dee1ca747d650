"""search=optuna's search space (mnist/search/space.py): the -m overrides as hydra-optuna-sweeper's users write
them, Optuna's distributions, a trial's overrides back, and the settings in conf/search/optuna.yaml."""
import json
import subprocess
import sys

import optuna
import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from mnist.config import CONF_DIR, compose
from mnist.errors import UserError
from mnist.search.space import Param, Space, check_settings, distributions, grid, overrides, parse

ISSUE_EXAMPLE = ['optimizer.lr=tag(log, interval(0.01, 3))', 'model.hidden=choice([64],[128],[256])',
                 'data.batch_size=choice(32,64,128)', 'trainer.epochs=5']


@pytest.fixture(scope="module")
def cfg():
    return compose(["model=mlp"])


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_issue_example_is_three_parameters_and_one_fixed_value(cfg):
    space = parse(ISSUE_EXAMPLE, cfg)

    assert space.fixed == ["trainer.epochs=5"]
    assert list(space.params) == ["optimizer.lr", "model.hidden", "data.batch_size"]
    assert space.params["optimizer.lr"] == Param("float", 0.01, 3.0, None, True)
    assert space.params["model.hidden"] == Param("categorical", choices=["[64]", "[128]", "[256]"])
    assert space.params["data.batch_size"] == Param("categorical", choices=["32", "64", "128"])


def test_the_issue_example_gives_optunas_distributions(cfg):
    found = distributions(parse(ISSUE_EXAMPLE, cfg))

    assert found == {
        "optimizer.lr": optuna.distributions.FloatDistribution(0.01, 3.0, log=True),
        "model.hidden": optuna.distributions.CategoricalDistribution(["[64]", "[128]", "[256]"]),
        "data.batch_size": optuna.distributions.CategoricalDistribution(["32", "64", "128"]),
    }


def test_a_trials_overrides_compose_to_exactly_its_values(cfg):
    space = parse(ISSUE_EXAMPLE, cfg)
    lr = 10 ** -1.5  # 0.03162277660168379: all of a float's digits travel
    sampled = {"optimizer.lr": lr, "model.hidden": "[128]", "data.batch_size": "64"}

    lines = overrides(space, sampled)

    assert lines == ["trainer.epochs=5", "optimizer.lr=0.03162277660168379", "model.hidden=[128]",
                     "data.batch_size=64"]
    trial_cfg = compose(lines)
    assert list(trial_cfg.model.hidden) == [128]
    assert trial_cfg.optimizer.lr == lr
    assert trial_cfg.data.batch_size == 64
    assert trial_cfg.trainer.epochs == 5


def test_what_optuna_suggests_is_what_the_trial_trains_with(cfg):
    space = parse([*ISSUE_EXAMPLE, "model=choice(mlp,mlp_sigmoid)", "trainer.seed=int(interval(1, 100))"], cfg)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))

    for _ in range(3):
        trial = study.ask(distributions(space))
        trial_cfg = compose(overrides(space, trial.params))
        assert trial_cfg.optimizer.lr == trial.params["optimizer.lr"]
        assert 0.01 <= trial_cfg.optimizer.lr <= 3
        assert str(list(trial_cfg.model.hidden)).replace(" ", "") == trial.params["model.hidden"]
        assert trial_cfg.data.batch_size == int(trial.params["data.batch_size"])
        assert trial_cfg.model.name == trial.params["model"]
        assert trial_cfg.trainer.seed == trial.params["trainer.seed"]
        study.tell(trial, 0.5)


@pytest.mark.parametrize("override, key, param", [
    ("optimizer.lr=interval(0.1, 2)", "optimizer.lr", Param("float", 0.1, 2.0)),
    ("optimizer.lr=interval(1, 2)", "optimizer.lr", Param("float", 1.0, 2.0)),  # interval() is always float
    ("optimizer.lr=tag(log, interval(1e-4, 1))", "optimizer.lr", Param("float", 0.0001, 1.0, None, True)),
    ("trainer.seed=int(interval(1, 10))", "trainer.seed", Param("int", 1, 10)),
    ("trainer.seed=tag(log, int(interval(1, 1024)))", "trainer.seed", Param("int", 1, 1024, None, True)),
    # range: Hydra's values, stop excluded (range(1,5) is 1..4); floats if any of start, stop, step is one
    ("trainer.epochs=range(1, 5)", "trainer.epochs", Param("int", 1, 4, 1)),
    ("trainer.epochs=range(2, 11, 3)", "trainer.epochs", Param("int", 2, 8, 3)),
    ("trainer.epochs=range(10, 1, -4)", "trainer.epochs", Param("int", 2, 10, 4)),
    ("trainer.epochs=tag(log, range(1, 9))", "trainer.epochs", Param("int", 1, 8, 1, True)),
    ("optimizer.lr=range(0.1, 1.0, 0.2)", "optimizer.lr", Param("float", 0.1, 0.9, 0.2)),
    ("optimizer.lr=range(1, 2, 0.25)", "optimizer.lr", Param("float", 1.0, 1.75, 0.25)),
    ("optimizer.lr=range(0.1, 1.0, 0.3)", "optimizer.lr", Param("float", 0.1, 0.7, 0.3)),  # Hydra's adds 1.0
    ("optimizer.lr=range(1.0, 0.0, -0.25)", "optimizer.lr", Param("float", 0.25, 1.0, 0.25)),
    ("trainer.epochs=shuffle(range(3, 0, -1))", "trainer.epochs", Param("categorical", choices=["1", "2", "3"])),
    # choices: each as override text Hydra reads back as the value
    ("data.batch_size=32,64", "data.batch_size", Param("categorical", choices=["32", "64"])),
    ("optimizer.lr=choice(0.1, 1e-3, 1)", "optimizer.lr", Param("categorical", choices=["0.1", "0.001", "1"])),
    ("model.activations=choice([relu],[tanh])", "model.activations",
     Param("categorical", choices=["[relu]", "[tanh]"])),
    ("data.shuffle=choice(true, false)", "data.shuffle", Param("categorical", choices=["true", "false"])),
    ("model=choice(mlp,cnn)", "model", Param("categorical", choices=["mlp", "cnn"])),
    ("optimizer=adam,sgd", "optimizer", Param("categorical", choices=["adam", "sgd"])),
    ("+experiment=choice(course_cnn,course_mlp)", "+experiment",
     Param("categorical", choices=["course_cnn", "course_mlp"])),
    ("model=glob(mlp*)", "model", Param("categorical", choices=["mlp", "mlp_deep", "mlp_sigmoid"])),
    # a key conf/ lacks, added with +
    ("+optimizer.weight_decay=choice(0, 0.01)", "+optimizer.weight_decay",
     Param("categorical", choices=["0", "0.01"])),
    ("+optimizer.weight_decay=interval(0, 0.1)", "+optimizer.weight_decay", Param("float", 0.0, 0.1)),
])
def test_each_sweep_maps_as_hydra_optuna_sweeper_maps_it(cfg, override, key, param):
    space = parse([override], cfg)

    assert space.params == {key: param}
    assert space.fixed == []


def test_plain_values_stay_fixed_as_written(cfg):
    fixed = ["trainer.epochs=5", "model=mlp", "+experiment=course_mlp", "~optimizer.scheduler", "++trainer.extra=1",
             "launcher=slurm", "resources.cpus_per_task=4", "search.n_trials=50", "dry_run=true",
             "hydra.job.chdir=true"]

    space = parse([*fixed, "optimizer.lr=interval(0.1, 2)"], cfg)

    assert space.fixed == fixed
    assert list(space.params) == ["optimizer.lr"]


def test_a_group_choice_composes_each_option(cfg):
    space = parse(["model=choice(mlp,cnn)", "trainer.epochs=1"], cfg)

    assert compose(overrides(space, {"model": "cnn"})).model.arch == "cnn"
    assert compose(overrides(space, {"model": "mlp"})).model.arch == "mlp"


def test_float_range_values_are_written_on_the_grid_without_float_noise(cfg):
    space = parse(["optimizer.lr=range(0.1, 1.0, 0.2)"], cfg)

    assert overrides(space, {"optimizer.lr": 0.7000000000000001}) == ["optimizer.lr=0.7"]
    assert overrides(space, {"optimizer.lr": 0.30000000000000004}) == ["optimizer.lr=0.3"]


def test_a_trials_value_outside_its_choices_is_a_bug_not_an_override(cfg):
    space = parse(ISSUE_EXAMPLE, cfg)
    with pytest.raises(ValueError, match=r"model.hidden=\[512\]"):
        overrides(space, {"optimizer.lr": 0.1, "model.hidden": "[512]", "data.batch_size": "64"})


def test_a_space_survives_json(cfg):
    space = parse([*ISSUE_EXAMPLE, "trainer.seed=range(1, 10, 2)", "+optimizer.weight_decay=choice(0, 0.01)"], cfg)

    back = Space.from_dict(json.loads(json.dumps(space.to_dict())))

    assert back == space
    assert list(back.params) == list(space.params)
    assert Param.from_dict(space.params["optimizer.lr"].to_dict()) == Param("float", 0.01, 3.0, None, True)


@pytest.mark.parametrize("given, named, fix", [
    # what Hydra cannot parse: the override and Hydra's own reason
    (["optimizer.lr=interval(0.1"], "optimizer.lr=interval(0.1", "Write"),
    (["data.batch_size=choice()"], "empty choice is not legal", "Write"),
    (["optimizer.lr=interval(0.1, 1, 3)"], "too many positional arguments", "Write"),
    (["trainer.epochs"], "trainer.epochs", "key=value"),
    # bounds
    (["optimizer.lr=interval(3, 0.01)"], "optimizer.lr=interval(3, 0.01)", "`optimizer.lr=interval(0.01, 3.0)`"),
    (["trainer.seed=int(interval(5, 5))"], "trainer.seed=int(interval(5, 5))", "`trainer.seed=5`"),
    (["optimizer.lr=tag(log, interval(0, 1))"], "optimizer.lr=tag(log, interval(0, 1))", "above 0"),
    (["trainer.seed=tag(log, int(interval(-1, 8)))"], "trainer.seed=tag(log, int(interval(-1, 8)))",
     "`trainer.seed=tag(log, int(interval(1, 8)))`"),
    (["trainer.epochs=range(5, 1)"], "trainer.epochs=range(5, 1)", "Write e.g. range(1, 5) if"),
    (["trainer.epochs=range(1, 9, -2)"], "trainer.epochs=range(1, 9, -2)", "Write e.g. range(1, 9, 2) if"),
    (["optimizer.lr=range(0.5, 0.1, 0.1)"], "optimizer.lr=range(0.5, 0.1, 0.1)", "Write e.g. range(0.1, 0.5, 0.1) if"),
    (["optimizer.lr=choice(1,choice(2,3))"], "optimizer.lr=choice(1,choice(2,3))", "plain values only"),
    (["model=glob(zz*)"], "model=glob(zz*)", "Fix the pattern"),
    (["trainer.epochs=range(1, 5, 0)"], "trainer.epochs=range(1, 5, 0)", "cannot be 0"),
    (["optimizer.lr=tag(log, range(0.1, 1, 0.1))"], "optimizer.lr=tag(log, range(0.1, 1, 0.1))", "interval(0.1, 1)"),
    (["trainer.epochs=tag(log, range(1, 9, 2))"], "trainer.epochs=tag(log, range(1, 9, 2))", "int(interval(1, 9))"),
    (["optimizer.lr=tag(lgo, interval(0.01, 3))"], "tag lgo", "tag(log, interval"),
    (["data.batch_size=tag(log, choice(32, 64))"], "data.batch_size=tag(log, choice(32, 64))", "Remove the tag"),
    (["data.batch_size=choice(32,32,64)"], "lists 32 more than once", "List each value once"),
    # no parameter at all
    (["trainer.epochs=5", "model=cnn"], "needs at least one parameter", "optimizer.lr=tag(log, interval(0.01, 3))"),
    ([], "needs at least one parameter", "optimizer.lr=tag(log, interval(0.01, 3))"),
    # keys and config groups
    (["model.hiden=choice([64],[128])"], "model.hiden=choice([64],[128])", "Did you mean `model.hidden`?"),
    (["trainer.epoch=range(1, 4)"], "trainer.epoch=range(1, 4)", "Did you mean `trainer.epochs`?"),
    (["+optimizer.lr=interval(0.1, 1)"], "+optimizer.lr=interval(0.1, 1)", "Drop the +"),
    (["model=choice(mlp,resnet)"], "Unknown model 'resnet'", "cnn, mlp"),
    (["model=range(1, 3)"], "model=range(1, 3)", "model=choice("),
    (["experiment=choice(course_cnn,course_mlp)"], "experiment=choice(course_cnn,course_mlp)", "+experiment"),
    (["data.batch_size=glob(3*)"], "data.batch_size=glob(3*)", "choice(a, b)"),
    (["trainer.epochs=5", "trainer.epochs=range(1, 4)"], "trainer.epochs=range(1, 4)", "Keep one"),
    (["~optimizer.scheduler=choice(1,2)"], "~optimizer.scheduler=choice(1,2)", "without the ~"),
    # how the search runs is not searched
    (["launcher.array_parallelism=choice(4,8)"], "launcher.array_parallelism=choice(4,8)", "one value"),
    (["launcher=local,slurm"], "launcher=local,slurm", "`launcher=local`"),
    (["resources.cpus_per_task=range(1, 4)"], "resources.cpus_per_task=range(1, 4)", "one value"),
    (["search.n_trials=choice(10,20)"], "search.n_trials=choice(10,20)", "one value"),
    (["hydra.job.chdir=true,false"], "hydra.job.chdir=true,false", "one value"),
    (["hydra/launcher=basic,mnist_slurm"], "hydra/launcher=basic,mnist_slurm", "one value"),
    (["dry_run=true,false"], "dry_run=true,false", "`dry_run=true`"),
])
def test_a_bad_search_is_one_line_naming_it_and_the_fix(cfg, given, named, fix):
    with pytest.raises(UserError) as error:
        parse(given, cfg)
    message = str(error.value)

    assert named in message
    assert fix in message
    assert "\n" not in message and "Traceback" not in message and "HYDRA_FULL_ERROR" not in message


def test_a_grid_is_every_value_of_each_choice_and_range(cfg):
    space = parse(["model.hidden=choice([64],[128])", "trainer.epochs=range(1, 4)", "optimizer.lr=range(0.1, 0.4, 0.1)",
                   "data.batch_size=32"], cfg)

    assert grid(space) == {"model.hidden": ["[64]", "[128]"], "trainer.epochs": [1, 2, 3],
                           "optimizer.lr": [0.1, 0.2, 0.3]}


def test_optunas_grid_sampler_runs_each_combination_once(cfg):
    space = parse(["model.hidden=choice([64],[128])", "trainer.epochs=range(1, 4)"], cfg)
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid(space), seed=0))

    seen = []
    for _ in range(6):
        trial = study.ask(distributions(space))
        seen.append(tuple(overrides(space, trial.params)))
        try:
            study.tell(trial, 0.0)
        except RuntimeError as e:  # optuna 4: the tell that ends the grid calls study.stop(), which only works
            if "Study.stop" not in str(e):  # inside study.optimize; the trial is recorded COMPLETE all the same
                raise

    assert sorted(seen) == sorted((f"model.hidden=[{h}]", f"trainer.epochs={e}") for h in (64, 128) for e in (1, 2, 3))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6


def test_an_interval_in_a_grid_search_is_refused_naming_it(cfg):
    space = parse(["model.hidden=choice([64],[128])", "optimizer.lr=tag(log, interval(0.01, 3))"], cfg)

    with pytest.raises(UserError) as error:
        grid(space)

    message = str(error.value)
    assert message.startswith("optimizer.lr is searched over an interval (tag(log, interval(...)) from 0.01 to 3.0)")
    assert "search.sampler=tpe" in message and "range(" in message and "choice(" in message
    assert "\n" not in message


def optuna_yaml(**changes):
    settings = OmegaConf.load(CONF_DIR / "search" / "optuna.yaml")
    settings.update(changes)
    return settings


def test_the_shipped_settings_pass():
    settings = optuna_yaml()

    assert settings.name == "optuna" and settings.n_trials == 20 and settings.workers == 1
    assert (settings.direction, settings.objective, settings.sampler, settings.pruner) == (
        "maximize", "accuracy", "tpe", "median")
    assert settings.seed is None and settings.prune_after == 2
    check_settings(settings)
    check_settings(settings, cpus=1)
    check_settings(optuna_yaml(objective="test_loss", direction="minimize", sampler="grid", pruner="none", seed=7))
    check_settings(optuna_yaml(sampler="random", pruner="asha", workers=8, n_trials=1))


@pytest.mark.parametrize("changes, named, fix", [
    ({"n_trials": 0}, "search.n_trials=0", "search.n_trials=20"),
    ({"n_trials": "many"}, "search.n_trials='many'", "search.n_trials=20"),
    ({"n_trials": True}, "search.n_trials=True", "search.n_trials=20"),
    ({"workers": 0}, "search.workers=0", "search.workers=1"),
    ({"workers": 2.5}, "search.workers=2.5", "search.workers=1"),
    ({"direction": "max"}, "search.direction='max'", "maximize, minimize"),
    ({"objective": "loss"}, "search.objective='loss'", "accuracy, test_loss"),
    ({"sampler": "cmaes"}, "search.sampler='cmaes'", "tpe, random, grid"),
    ({"pruner": "hyperband"}, "search.pruner='hyperband'", "median, asha, none"),
    ({"pruner": None}, "search.pruner=None", "median, asha, none"),
    ({"seed": "abc"}, "search.seed='abc'", "search.seed=null"),
    ({"prune_after": 0}, "search.prune_after=0", "search.prune_after=2"),
    ({"prune_after": "two"}, "search.prune_after='two'", "search.prune_after=2"),
    ({"objective": "test_loss"}, "search.objective=test_loss with search.direction=maximize",
     "Set search.direction=minimize"),
    ({"direction": "minimize"}, "search.objective=accuracy with search.direction=minimize",
     "Set search.direction=maximize"),
])
def test_bad_settings_are_one_line_naming_the_value_and_the_fix(changes, named, fix):
    with pytest.raises(UserError) as error:
        check_settings(optuna_yaml(**changes))
    message = str(error.value)

    assert named in message
    assert fix in message
    assert "\n" not in message


def test_more_workers_than_cpus_here_is_refused():
    check_settings(optuna_yaml(workers=4), cpus=None)  # on Slurm: one array task each
    check_settings(optuna_yaml(workers=4), cpus=4)

    with pytest.raises(UserError) as error:
        check_settings(optuna_yaml(workers=4), cpus=2)

    assert "search.workers=4" in str(error.value) and "search.workers to at most 2" in str(error.value)
    assert "launcher=slurm" in str(error.value)


def test_a_missing_setting_is_named():
    with pytest.raises(UserError, match="search.pruner is not set"):
        check_settings({"n_trials": 5, "workers": 1, "direction": "maximize", "objective": "accuracy",
                        "sampler": "tpe", "seed": None, "prune_after": 2})


def test_reading_the_space_imports_neither_torch_nor_optuna():
    code = ("import sys\nfrom mnist.search import space\n"
            "print(sorted(m for m in ('torch', 'optuna', 'hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    assert out.strip() == "[]"
