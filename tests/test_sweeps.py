"""Sweeps that finish sooner and ask for what they need: a lean job start, packing several runs into one
array task, and requests sized from what past runs used."""
import csv
import re
import subprocess
import sys
import time

import pytest
import submitit
from omegaconf import OmegaConf

from conftest import run, write_dataset
from mnist import rundir
from mnist.config import compose
from mnist.launch.job import TrainJob
from test_slurm import submitted_id, wait_for

NOT_FOR_TRAINING = {"torchvision", "torch._dynamo", "torch._inductor", "sympy", "PIL", "hydra", "matplotlib"}


def test_a_job_imports_torch_and_nothing_training_does_not_need(tiny_data, tmp_path):
    cfg = compose([f"data.root={tiny_data}", "trainer.epochs=1", "launcher=slurm"])
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit", python=f"{sys.executable} -X importtime")
    job = executor.submit(TrainJob(OmegaConf.to_container(cfg, resolve=True), tmp_path / "run", 0))
    assert [row["epoch"] for row in job.result()] == [1]
    imported = {line.rsplit("|", 1)[-1].strip() for line in job.stderr().splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "mnist.train" in imported
    assert sorted(NOT_FOR_TRAINING & imported) == []


def read(path):
    return path.read_text() if path.exists() else ""


def metrics(run_dir):
    return [(r["epoch"], r["train_loss"], r["test_loss"], r["accuracy"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))]


def sweep(args, tmp_path, data, **kwargs):
    """`python -m mnist.run -m launcher=slurm ...` as a user types it, logs and runs under tmp_path."""
    return run(["-m", "launcher=slurm", f"data.root={data}", f"launcher.log_dir={tmp_path / 'logs'}",
                "resources.mem=2G", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args], cwd=tmp_path, **kwargs)


def test_a_packed_sweep_asks_for_one_task_per_n_runs_with_their_summed_time(tiny_data, tmp_path):
    script = sweep(["trainer.seed=range(5)", "launcher.runs_per_task=2", "dry_run=true"], tmp_path, tiny_data)
    assert script.returncode == 0, script.stderr
    assert "#SBATCH --array=0-2%3" in script.stdout  # 5 runs in 3 tasks
    assert "#SBATCH --time=10" in script.stdout  # two runs of the MLP's 5 minutes


@pytest.mark.parametrize("value", ["0", "two", "1.5"])
def test_a_bad_runs_per_task_names_the_value_and_the_fix(tiny_data, tmp_path, value):
    result = sweep(["trainer.seed=1,2", f"launcher.runs_per_task={value}", "dry_run=true"], tmp_path, tiny_data)
    assert result.returncode == 2 and "launcher.runs_per_task=" in result.stderr, result.stderr
    assert "e.g. launcher.runs_per_task=5" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slurm
def test_packed_runs_keep_their_folders_and_a_requeued_task_skips_the_finished_one(slurm_env, tmp_path):
    """Two identical runs (they differ in log interval only) in one task; the second is preempted mid-way."""
    write_dataset(tmp_path / "data", "MNIST", n_train=4000, n_test=200)
    job_id = submitted_id(sweep(["trainer.log_interval=10,11", "trainer.epochs=20", "launcher.runs_per_task=2",
                                 "launcher.max_requeues=2"], tmp_path, tmp_path / "data"))
    log, runs = tmp_path / "logs" / f"mlp_{job_id}.out", [tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"]
    deadline = time.time() + 180
    while time.time() < deadline and "Train Epoch: 1 [0/4000" not in read(log).partition("Run 2 of 2")[2]:
        time.sleep(0.5)
    assert "Run 2 of 2" in read(log), read(log)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # as a preemption does
    assert wait_for(job_id) == {job_id: "COMPLETED"}  # one task: a plain job

    text = read(log)
    assert f"Run 1 of 2 in this task: {runs[0]}\n" in text and f"Run 2 of 2 in this task: {runs[1]}\n" in text
    assert f"Run 1 of 2 in this task: {runs[0]} (done; skipped)" in text
    assert "asking Slurm to requeue" in text and "Resuming from" in text
    assert metrics(runs[1]) == metrics(runs[0]) and len(metrics(runs[0])) == 20  # an exact resume
    for run_dir in runs:
        assert [a["end"] for a in rundir.read_usage(run_dir)][-1] == "completed"
    listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout
    for run_dir in runs:  # one line a run, with the run's own state
        assert re.search(rf"^{job_id}\s+mlp\s+COMPLETED\s.*Epoch 20: .*{run_dir}$", listing, re.M), listing
