"""Killed, interrupted and resumed runs end exactly where an uninterrupted run ends."""
import csv
import signal
import subprocess
import sys

import pytest
import torch
from conftest import run

EPOCHS = 2
N_TRAIN, BATCHES = 1024, 16
STOP_AT = "Train Epoch: 2 [320/"  # batch 5 of 16: well inside the epoch


@pytest.fixture(scope="session")
def data(sixteen_batches_data):
    return sixteen_batches_data


def args(data, run_dir, *more):
    return [f"data.root={data}", "model=cnn", f"trainer.epochs={EPOCHS}", "trainer.log_interval=1",
            "trainer.threads=1", f"hydra.run.dir={run_dir}", *more]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    result = run(args(data, run_dir), cwd=run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


def signal_when(line_start, sig, command, cwd):
    """Start a run, send `sig` when it prints a line starting with `line_start`; return (rc, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, "-m", "mnist.run", *command], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(line_start):
            process.send_signal(sig)
            break
    out, err = process.communicate(timeout=120)
    return process.returncode, "".join(seen) + out, err


def course_lines(text):
    return [line for line in text.splitlines() if line.startswith(("Train Epoch", "Test set"))]


def metrics_without_timing(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")} for row in csv.DictReader(f)]


def assert_same_run(run_dir, straight):
    assert metrics_without_timing(run_dir) == metrics_without_timing(straight)
    ours = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    theirs = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert ours["epoch"] == theirs["epoch"] == EPOCHS and ours["partial"] is None
    for key, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][key], tensor), key  # bit for bit
    assert torch.equal(ours["rng"], theirs["rng"])


def test_a_run_killed_in_epoch_two_resumes_bit_for_bit(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    rc, killed_out, _ = signal_when(STOP_AT, signal.SIGKILL, args(data, run_dir), tmp_path)
    assert rc == -signal.SIGKILL
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = run(args(data, run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout and "after epoch 1" in resumed.stdout
    assert_same_run(run_dir, straight)
    epoch_one = [line for line in course_lines(killed_out) if not line.startswith("Train Epoch: 2")]
    assert epoch_one + course_lines(resumed.stdout) == course_lines((straight / "train.log").read_text())


def test_ctrl_c_mid_epoch_checkpoints_where_it_was_and_resumes_exactly(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, err = signal_when(STOP_AT, signal.SIGINT, args(data, run_dir), tmp_path)
    assert rc == 130, err
    assert "Interrupted" in err and f"python -m mnist.run hydra.run.dir={run_dir}" in err
    assert "Traceback" not in err and not list(run_dir.glob(".*.tmp"))
    partial = torch.load(run_dir / "checkpoint.pt", weights_only=True)["partial"]
    assert partial["epoch"] == 2 and 5 < partial["batches"] < BATCHES
    assert len(metrics_without_timing(run_dir)) == 1  # only whole epochs are rows

    resumed = run(args(data, run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at epoch 2, batch {partial['batches']}" in resumed.stdout
    assert_same_run(run_dir, straight)
    # It prints on from that batch: the uninterrupted run's lines for the batches left (one a batch here), losses too.
    straight_lines = course_lines((straight / "train.log").read_text())
    epoch_two = [line for line in straight_lines if line.startswith("Train Epoch: 2 [")]
    assert course_lines(resumed.stdout) == epoch_two[partial["batches"]:] + straight_lines[-1:]


def test_resuming_uses_the_runs_own_config_and_refuses_a_conflicting_override(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    assert run(args(data, run_dir, "trainer.epochs=1"), cwd=tmp_path).returncode == 0
    conflict = run([f"hydra.run.dir={run_dir}", "optimizer=sgd", "optimizer.lr=0.5"], cwd=tmp_path)
    assert conflict.returncode == 2 and "Traceback" not in conflict.stderr
    assert "optimizer.name ('sgd', but the run has 'adadelta')" in conflict.stderr
    assert "optimizer.lr (0.5, but the run has 1.0)" in conflict.stderr
    # No overrides at all: the run's own config (cnn, its data.root) is used, and it trains on.
    resumed = run([f"hydra.run.dir={run_dir}", f"trainer.epochs={EPOCHS}", "trainer.threads=1"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, straight)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own (this machine's CI runs as root), to fill: (folder, resize); resize(bytes) mounts it at
    that size, and resize(bytes, "remount") grows it, keeping its files, as freeing space would."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()

    def resize(size, *more):
        subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*more, f"size={size}"]), "tmpfs", str(disk)],
                       check=True)

    yield disk, resize
    subprocess.run(["umount", str(disk)], check=False)


def test_a_disk_that_fills_while_a_checkpoint_is_written_keeps_the_last_one_and_the_run_resumes(data, straight,
                                                                                                 small_disk):
    """Room for one checkpoint and a half: epoch 1's is written, epoch 2's cannot be. The error names the folder and
    the space left, epoch 1's checkpoint stays whole, and once space is freed the same command ends the run as an
    uninterrupted one."""
    small_disk, resize = small_disk
    size = (straight / "checkpoint.pt").stat().st_size * 3 // 2
    resize(size)
    run_dir = small_disk / "run"
    full = run(args(data, run_dir), cwd=small_disk)
    assert full.returncode == 2, full.stderr
    message = full.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert f"No space left to write checkpoint.pt in {run_dir}: " in message and " free on its disk; the previous " \
        "checkpoint.pt (" in message and "run the same command again" in message, message
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1  # whole, and epoch 1's
    assert [p.name for p in run_dir.glob(".*.tmp")] == []
    assert len(metrics_without_timing(run_dir)) == 1

    resize(size * 4, "remount")
    resumed = run(args(data, run_dir), cwd=small_disk)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    assert_same_run(run_dir, straight)
