"""The run folder's contract (mnist/rundir.py): one process trains into a folder at a time, a killed
one's folder resumes, a finished run has nothing left to do, and a report reads what a run left."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run, write_dataset

from mnist import rundir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir") / "data"
    write_dataset(root, "MNIST", n_train=2048, n_test=256)
    return root


def start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "mnist.run", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def slow_run(data, run_dir, epochs=3):
    """A CNN run long enough (seconds) for a second process to try the same folder meanwhile (on the CPU: a
    GPU would end it first)."""
    return ["model=cnn", f"trainer.epochs={epochs}", "trainer.threads=1", "trainer.device=cpu", f"data.root={data}",
            f"hydra.run.dir={run_dir}"]


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_one_keeps_it(data, tmp_path):
    run_dir = tmp_path / "run"
    first = start(slow_run(data, run_dir), tmp_path)
    wait_for(lambda: (run_dir / "train.log").exists() and "Train Epoch" in (run_dir / "train.log").read_text(),
             "the first run to train")
    second = run(slow_run(data, run_dir), cwd=tmp_path)
    out, err = first.communicate(timeout=300)

    assert second.returncode == 2 and second.stdout == ""
    assert f"{run_dir} is in use: process {first.pid} on " in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and "run this again to resume" in second.stderr
    assert first.returncode == 0, err
    assert (run_dir / "train.log").read_text() == out  # the first run's lines, and only them
    assert [int(r["epoch"]) for r in metrics(run_dir)] == [1, 2, 3]


def test_the_folder_of_a_killed_run_is_taken_over_and_the_run_resumes(data, tmp_path):
    run_dir = tmp_path / "run"
    killed = start(slow_run(data, run_dir), tmp_path)
    wait_for(lambda: (run_dir / "metrics.csv").exists() and len(metrics(run_dir)) >= 1, "the first epoch")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = len(metrics(run_dir))
    assert done < 3

    resumed = run(slow_run(data, run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {run_dir / 'checkpoint.pt'} after epoch {done}" in resumed.stdout
    assert [int(r["epoch"]) for r in metrics(run_dir)] == [1, 2, 3]


HOLD = """import sys, time
from mnist import rundir
with rundir.lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
    open(sys.argv[1] + "/letting-go", "w").close()
"""


def hold(run_dir, job_id, seconds):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), job_id, str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_requeued_jobs_new_attempt_waits_for_its_old_one_and_another_job_is_refused(tmp_path):
    old_attempt = hold(tmp_path, "777_3", seconds=2)
    with pytest.raises(rundir.RunFolderError, match="is in use: Slurm job 777_3"):
        with rundir.lock(tmp_path, "777_4"):  # another task of the array
            pass
    with rundir.lock(tmp_path, "777_3"):  # the same task, requeued: waits the old attempt out
        assert (tmp_path / "letting-go").exists()
        assert rundir.holder(tmp_path)["pid"] == os.getpid()
    assert rundir.holder(tmp_path) is None
    old_attempt.wait()


def test_a_finished_run_has_nothing_left_to_do_and_nothing_is_submitted(data, tmp_path):
    run_dir = tmp_path / "run"
    args = ["trainer.epochs=1", f"data.root={data}", f"hydra.run.dir={run_dir}"]
    assert run(args, cwd=tmp_path).returncode == 0
    log = (run_dir / "train.log").read_text()

    again = run(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"Nothing left to do: {run_dir} has all 1 epochs of trainer.epochs=1 done.")
    assert "trainer.epochs=4" in again.stdout and "Train Epoch" not in again.stdout
    assert len(rundir.read_usage(run_dir)) == 1  # the attempt that trained it, no other

    submitted = run([*args, "launcher=slurm"], cwd=tmp_path, env={"SLURM_CONF": str(tmp_path / "no-slurm.conf")})
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.startswith("Nothing left to do") and not (tmp_path / "logs").exists()
    assert (run_dir / "train.log").read_text().startswith(log) and len(metrics(run_dir)) == 1


def test_a_run_that_stops_before_training_leaves_no_folder(tmp_path):
    result = run([f"data.root={tmp_path / 'no-data'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2 and "python -m mnist.data download" in result.stderr
    assert not (tmp_path / "run").exists()


def report(args, cwd):
    return run(["--no-figures", *args], cwd=cwd, module="mnist.report")


def test_the_report_names_a_damaged_run_and_still_reports_the_others(data, tmp_path):
    sweep = tmp_path / "sweep"
    result = run(["-m", "trainer.epochs=1", "trainer.seed=1,2,3", f"data.root={data}", f"hydra.sweep.dir={sweep}"],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (sweep / "1" / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")
    (sweep / "2" / "config.yaml").write_text("trainer: [\n")

    shown = report([str(sweep)], tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines() if line[:1].isdigit()}
    assert "COMPLETED" in rows["0"]
    assert "DAMAGED (metrics.csv)" in rows["1"] and "DAMAGED (config.yaml)" in rows["2"]
    assert f"damaged: {sweep / '1' / 'metrics.csv'} is damaged (its header is epoch,train_loss)" in shown.stdout
    assert f"damaged: {sweep / '2' / 'config.yaml'} is damaged (line 2" in shown.stdout


def test_the_report_labels_a_run_by_its_first_command_and_finds_the_run_started_last(data, tmp_path):
    first, second = tmp_path / "outputs" / "day" / "1", tmp_path / "outputs" / "day" / "2"
    assert run(["trainer.epochs=1", "trainer.seed=5", f"data.root={data}", f"hydra.run.dir={first}"],
               cwd=tmp_path).returncode == 0
    time.sleep(1.1)  # start records have whole seconds
    assert run(["trainer.epochs=1", f"data.root={data}", f"hydra.run.dir={second}"], cwd=tmp_path).returncode == 0
    resumed = run([f"hydra.run.dir={first}", "trainer.epochs=2", "trainer.threads=1"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    shown = report([str(first)], tmp_path)  # writes report.csv into the first run's folder
    assert "trainer.epochs=1 trainer.seed=5" in shown.stdout and "threads" not in shown.stdout
    latest = report([], tmp_path)
    assert latest.returncode == 0, latest.stderr
    assert f"1 run in {os.path.join('outputs', 'day', '2')}" in latest.stdout
