"""End-to-end runs of `python -m mnist.run` on tiny generated data, read the way a user reads them."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import imported_modules, run

from mnist import env
from mnist.errors import UserError

TRAIN_LINE = re.compile(r"^Train Epoch: (\d+) \[(\d+)/(\d+) \((\d+)%\)\]\tLoss: \d+\.\d{6}$")
TEST_LINE = re.compile(r"^Test set: Average loss: \d+\.\d{4}, Accuracy: (\d+)/(\d+) \((\d+)%\)$")
# where it trains: the CPU, or a GPU where there is one (trainer.device=auto)
WHERE_LINE = re.compile(r"^Training on (?:cpu|cuda:\d+ \(.+\)), (\d+) CPU threads?, 1 process$")
EPOCH_LINE = re.compile(r"^Epoch (\d+): \d+\.\d\d s, \d+ samples/s, lr [\d.e-]+$")


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_run_prints_the_course_lines_and_leaves_a_complete_run_folder(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run([f"data.root={tiny_data}", "trainer.epochs=2", "trainer.log_interval=2",
                  f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert WHERE_LINE.match(lines[0]), lines[0]  # where it trains, first; then the course's lines as they were

    train_lines = [TRAIN_LINE.match(line) for line in lines if line.startswith("Train Epoch")]
    assert all(train_lines) and len(train_lines) == 8  # 8 batches of 64, every 2nd one, 2 epochs
    assert [m.group(1, 2, 3, 4) for m in train_lines[:4]] == [
        ("1", "0", "512", "0"), ("1", "128", "512", "25"), ("1", "256", "512", "50"), ("1", "384", "512", "75")]
    test_lines = [TEST_LINE.match(line) for line in lines if line.startswith("Test set")]
    assert len(test_lines) == 2 and all(m and m.group(2) == "256" for m in test_lines)
    assert [EPOCH_LINE.match(line).group(1) for line in lines if line.startswith("Epoch ")] == ["1", "2"]

    assert (run_dir / "train.log").read_text() == result.stdout  # the full log, kept in the run folder
    metrics = read_metrics(run_dir)
    assert list(metrics[0]) == ["epoch", "train_loss", "test_loss", "accuracy", "seconds", "samples_per_s"]
    assert [row["epoch"] for row in metrics] == ["1", "2"]
    last_correct = int(test_lines[-1].group(1))
    assert float(metrics[-1]["accuracy"]) == last_correct / 256
    assert last_correct / 256 > 0.5  # the tiny data is learnable: training really trains

    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["model_name"] == "mlp"
    assert {"model", "optimizer", "scheduler", "rng", "metrics"} <= set(checkpoint)
    assert checkpoint["scheduler"]["last_epoch"] == 2

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["root"] == str(tiny_data) and config["trainer"]["epochs"] == 2
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["packages"]["torch"].startswith("2.")
    assert environment["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # trainer.device=auto
    assert environment["cpu_threads"] >= 1 and "slurm" in environment


def test_a_local_run_with_its_data_there_imports_neither_torchvision_nor_torch_dynamo(tiny_data, tmp_path):
    """torchvision is the downloader, torch._dynamo the compiler (trainer.compile): ~1 s each that an eager run
    with its data in place does without."""
    result = run([f"data.root={tiny_data}", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                 env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = imported_modules(result.stderr)
    assert "torch" in imported and "mnist.train" in imported
    assert sorted({"torchvision", "torch._dynamo", "torch._inductor"} & imported) == []


def test_threads_are_slurms_cpus_per_task_or_the_cpus_the_process_may_use_if_fewer(tiny_data, tmp_path,
                                                                                     monkeypatch):
    one_cpu = min(os.sched_getaffinity(0))  # a job step bound to one CPU of the two its job was given
    result = subprocess.run([sys.executable, "-m", "mnist.run", f"data.root={tiny_data}", "trainer.epochs=1",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "SLURM_CPUS_PER_TASK": "2", "SLURM_JOB_ID": "4242"},
                            preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Training on cpu, 1 CPU thread, 1 process"
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["cpu_threads"] == 1 and environment["slurm"]["SLURM_JOB_ID"] == "4242"
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # and fewer than the process may use: Slurm's
    assert env.cpu_threads() == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU that torch cannot see")
def test_a_job_given_a_gpu_that_torch_cannot_see_stops_at_once_naming_the_build_and_the_fix(tiny_data, tmp_path):
    gpu_job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0"}  # as Slurm sets them
    result = run([f"data.root={tiny_data}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=gpu_job)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    message = result.stderr
    assert "Slurm gave this job GPU 0 and trainer.device=auto, but torch sees no GPU" in message
    assert f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" in message
    assert f"needs an NVIDIA driver >= {env.DRIVER_FOR_CUDA[int(torch.version.cuda.split('.')[0])]}" in message
    assert "make install TORCH_CUDA=cu126" in message and "trainer.device=cpu and resources=cpu" in message


def test_in_a_job_without_gpus_auto_means_the_cpu_and_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node whose GPUs this job was not given
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for variable in env.GPU_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert env.pick_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="trainer.device=cuda, but this Slurm job asked for no GPU"):
        env.pick_device("cuda")


def test_ctrl_c_keeps_log_config_metrics_and_the_last_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist.run", f"data.root={tiny_data}", "trainer.epochs=1000",
         f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until the first epoch is done and checkpointed
        if line.startswith("Epoch 2:"):
            break
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and f"hydra.run.dir={run_dir}" in stderr and "Traceback" not in stderr
    epochs_done = torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]
    assert epochs_done >= 2
    assert len(read_metrics(run_dir)) == epochs_done
    assert (run_dir / "config.yaml").exists() and "Epoch 2:" in (run_dir / "train.log").read_text()
    assert not list(run_dir.glob(".*.tmp"))


def test_course_scripts_train_their_model(tiny_data, tmp_path):
    for module, name in (("mnist.mlp", "mlp"), ("mnist.cnn", "cnn")):
        run_dir = tmp_path / name
        result = run([f"data.root={tiny_data}", "trainer.epochs=1", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path, module=module)
        assert result.returncode == 0, result.stderr
        assert "Test set: Average loss" in result.stdout
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"] == name


def test_every_model_and_optimizer_trains_a_step(tiny_data, tmp_path):
    result = run(["-m", "model=mlp_deep,mlp_sigmoid", "optimizer=sgd,adam,adamw,rmsprop,adagrad",
                  f"data.root={tiny_data}", "data=fashion_mnist", "trainer.epochs=1",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = sorted((tmp_path / "sweep").glob("*/metrics.csv"))
    assert len(runs) == 10
    for metrics in runs:
        row = list(csv.DictReader(open(metrics)))[0]
        assert 0 < float(row["test_loss"]) < 10


def test_hydra_cfg_and_help_work(tmp_path):
    result = run(["--cfg", "job", "model=cnn"], cwd=tmp_path)
    assert result.returncode == 0 and yaml.safe_load(result.stdout)["model"]["name"] == "cnn"
    result = run(["--help"], cwd=tmp_path)
    assert result.returncode == 0 and "model: cnn, mlp, mlp_deep, mlp_sigmoid" in result.stdout


def test_asking_for_cuda_without_a_gpu_is_one_line_without_traceback(tiny_data, tmp_path):
    # The other bad inputs are test_bad_inputs.py's battery.
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run([f"data.root={tiny_data}", "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "trainer.device=cuda" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_a_corrupt_checkpoint_is_an_error_not_a_pickle_traceback(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"\x80\x02not really a checkpoint")
    result = run([f"data.root={tiny_data}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2 and "is not a readable checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == b"\x80\x02not really a checkpoint"
