"""Experiment presets (`+experiment=<name>`, conf/experiment/), used locally, in sweeps, on Slurm and
in the report, against the settings the course material fixes (docs: seed-facts)."""
import csv
import re
import time

import pytest
import yaml
from conftest import run

# The material's recipes, as it states them.
SLIDES = {"loss": "nll", "optimizer": ("adadelta", 1.0), "epochs": 3, "seed": 1, "batch_size": 64,
          "test_batch_size": 1000, "shuffle": False}
NOTEBOOK_SGD = {"optimizer": ("sgd_momentum", 0.01, 0.9), "epochs": 10, "batch_size": 64, "shuffle": True,
                "mean": 0.5, "std": 0.5}


def cfg_job(args, cwd):
    result = run(["--cfg", "job", *args], cwd=cwd)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def slides_settings(config):
    return {"loss": config["loss"]["name"], "optimizer": (config["optimizer"]["name"], config["optimizer"]["lr"]),
            "epochs": config["trainer"]["epochs"], "seed": config["trainer"]["seed"],
            "batch_size": config["data"]["batch_size"], "test_batch_size": config["data"]["test_batch_size"],
            "shuffle": config["data"]["shuffle"]}


def test_cfg_job_shows_what_each_preset_sets(tmp_path):
    for name, model in (("course_mlp", "mlp"), ("course_cnn", "cnn")):
        config = cfg_job([f"+experiment={name}"], tmp_path)
        assert slides_settings(config) == SLIDES and config["model"]["name"] == model
        assert config["optimizer"]["scheduler"] == {"step_size": 1, "gamma": 0.7}
        assert config["experiment"] == name
    config = cfg_job(["+experiment=notebook_sgd"], tmp_path)
    optimizer = config["optimizer"]
    assert {"optimizer": (optimizer["name"], optimizer["lr"], optimizer["momentum"]),
            "epochs": config["trainer"]["epochs"], "batch_size": config["data"]["batch_size"],
            "shuffle": config["data"]["shuffle"], "mean": config["data"]["mean"],
            "std": config["data"]["std"]} == NOTEBOOK_SGD


def test_the_command_line_still_wins_over_a_preset(tmp_path):
    config = cfg_job(["+experiment=notebook_sgd", "model=cnn", "data=fashion_mnist", "trainer.epochs=2"], tmp_path)
    assert (config["model"]["name"], config["data"]["name"], config["trainer"]["epochs"]) == ("cnn", "fashion_mnist", 2)
    assert (config["data"]["mean"], config["data"]["std"]) == (0.5, 0.5)  # the recipe's normalisation stays


def test_presets_sweep_locally_and_the_report_labels_runs_by_preset(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    result = run(["-m", "+experiment=course_mlp,course_cnn", f"data.root={tiny_data}", "trainer.epochs=1",
                  f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for n, model in ((0, "mlp"), (1, "cnn")):
        config = yaml.safe_load((sweep / str(n) / "config.yaml").read_text())
        assert config["model"]["name"] == model and slides_settings(config) == {**SLIDES, "epochs": 1}
        assert len(list(csv.DictReader(open(sweep / str(n) / "metrics.csv")))) == 1
    report = run([str(sweep), "--no-figures"], cwd=tmp_path, module="mnist.report",
                 env={"SLURM_CONF": str(tmp_path / "no-such-cluster.conf")})
    assert report.returncode == 0, report.stderr
    assert [row["label"] for row in csv.DictReader(open(sweep / "report.csv"))] == ["course_mlp", "course_cnn"]
    single = run([str(sweep / "1"), "--no-figures", "--out", str(tmp_path / "one")], cwd=tmp_path,
                 module="mnist.report", env={"SLURM_CONF": str(tmp_path / "no-such-cluster.conf")})
    assert single.returncode == 0, single.stderr
    assert [row["label"] for row in csv.DictReader(open(tmp_path / "one" / "report.csv"))] == ["course_cnn"]


def test_a_preset_on_slurm_dry_run_asks_for_its_models_resources(tiny_data, tmp_path):
    result = run(["+experiment=course_cnn", "launcher=slurm", "dry_run=true", f"data.root={tiny_data}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --job-name=cnn" in result.stdout and "#SBATCH --time=15" in result.stdout


@pytest.mark.slurm
def test_a_preset_sweep_on_slurm_is_one_array_labelled_by_preset(slurm_env, tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    result = run(["-m", "+experiment=course_mlp,course_cnn", "launcher=slurm", f"data.root={tiny_data}",
                  "trainer.epochs=1", "resources.mem=2G", f"launcher.log_dir={tmp_path / 'logs'}",
                  f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = re.search(r"Submitted job array (\d+)", result.stdout).group(1)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(sweep.glob("*/metrics.csv"))) < 2:
        time.sleep(2)
    time.sleep(3)
    report = run([str(sweep), "--no-figures"], cwd=tmp_path, module="mnist.report")
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [(r["label"], r["model"], r["state"], r["job_id"]) for r in rows] == [
        ("course_mlp", "mlp", "COMPLETED", f"{job}_0"), ("course_cnn", "cnn", "COMPLETED", f"{job}_1")]
