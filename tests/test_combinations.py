"""Features where they meet, on a real one-node Slurm: resubmit while a packed task is still going, a sweep
submitted again into its folder, a requeued job's end read without accounting. Tests read what a user reads:
`python -m mnist.jobs`, `resubmit`'s answer, the report."""
import csv
import re
import subprocess
import time

import pytest
from conftest import run, write_dataset
from test_failures import ended, jobs, row, rows

from mnist.launch import record

pytestmark = pytest.mark.slurm


def sweep(tmp_path, data, *args):
    return run(["-m", "launcher=slurm", f"data.root={data}", "resources.mem=2G",
                f"launcher.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args], tmp_path)


def wait_until(check, what, timeout=180):
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.2)


def test_resubmit_leaves_alone_the_runs_a_running_packed_task_has_not_reached(slurm_env, tmp_path):
    """Three runs in one task, the first one training: the other two are WAITING, and resubmitting the sweep
    reruns none of them (it reran those two, and two jobs then fought over their folders)."""
    data = tmp_path / "data"
    write_dataset(data, "MNIST", n_train=2048, n_test=256)  # CNN epochs of a few seconds
    result = sweep(tmp_path, data, "trainer.seed=1,2,3", "model=cnn", "trainer.epochs=20", "trainer.threads=1",
                   "launcher.runs_per_task=3")
    assert result.returncode == 0, result.stderr
    job = re.search(r"Submitted job (\d+)", result.stdout).group(1)
    log = tmp_path / "sweep" / "0" / "train.log"
    try:
        wait_until(lambda: log.exists() and "Train Epoch: 1" in log.read_text(), "the task's first run training")
        listing = jobs([], tmp_path, tmp_path / "logs").stdout
        assert [cells["STATE"] for cells in rows(listing)] == ["RUNNING", "WAITING", "WAITING"], listing
        again = jobs(["resubmit", tmp_path / "sweep", "dry_run=true"], tmp_path, tmp_path / "logs")
        assert again.stdout.startswith(f"Nothing to rerun in {tmp_path / 'sweep'}"), again.stdout + again.stderr
        assert f"is still WAITING as {job}" in again.stdout and "#SBATCH" not in again.stdout
    finally:
        subprocess.run(["scancel", job], check=True)


def test_a_sweep_submitted_again_into_its_folder_submits_only_what_is_not_complete(slurm_env, tiny_data, tmp_path):
    """It sent every run again, each job only to print "Nothing left to do", and the report then showed those
    no-op jobs for runs other jobs had trained."""
    first = sweep(tmp_path, tiny_data, "trainer.seed=1,2,3", "trainer.epochs=1")
    array = re.search(r"Submitted job array (\d+)", first.stdout).group(1)
    ended(tmp_path / "logs", tmp_path, [f"{array}_{t}" for t in range(3)])

    again = sweep(tmp_path, tiny_data, "trainer.seed=1,2,3", "trainer.epochs=1")
    assert again.returncode == 0, again.stderr
    assert f"{tmp_path / 'sweep'}: 3 of 3 runs already complete. Nothing to submit." in again.stdout, again.stdout
    assert "Submitted" not in again.stdout and len(record.read(tmp_path / "logs")) == 3

    changed = sweep(tmp_path, tiny_data, "trainer.seed=1,2,3", "trainer.epochs=1", "optimizer.lr=0.5")
    assert changed.returncode == 2 and "resumes with its own config" in changed.stderr, changed.stderr
    assert "optimizer.lr (0.5, but the run has 1.0)" in changed.stderr and len(record.read(tmp_path / "logs")) == 3

    for name in ("checkpoint.pt", "metrics.csv"):  # run 2 lost: it is trained again, the others are left alone
        (tmp_path / "sweep" / "2" / name).unlink()
    rest = sweep(tmp_path, tiny_data, "trainer.seed=1,2,3", "trainer.epochs=1")
    assert "2 of 3 runs already complete. Submitting the other 1." in rest.stdout, rest.stdout
    new = re.search(r"Submitted job (\d+)", rest.stdout).group(1)
    assert [e.run_dir for e in record.read(tmp_path / "logs")][3:] == [str(tmp_path / "sweep" / "2")]
    ended(tmp_path / "logs", tmp_path, [new])

    report = run([str(tmp_path / "sweep"), "--logs", str(tmp_path / "logs"), "--no-figures"], tmp_path,
                 module="mnist.report")
    assert report.returncode == 0, report.stderr
    table = {cells["RUN"]: cells for cells in rows(report.stdout.split("\n", 2)[2])}
    assert [(table[r]["STATE"], table[r]["JOB"]) for r in "012"] == [
        ("COMPLETED", f"{array}_0"), ("COMPLETED", f"{array}_1"), ("COMPLETED", new)], report.stdout
    with open(tmp_path / "sweep" / "report.csv", newline="") as f:
        attempts = [row["attempt"] for row in csv.DictReader(f)]
    assert attempts == [f"{array}_0#0", f"{array}_1#0", f"{new}#0"]  # the attempt that trained each


def test_without_accounting_a_requeued_job_that_then_failed_reads_failed(slurm_env_no_accounting, tiny_data, tmp_path):
    """Each requeue appends slurmstepd's "DUE TO JOB REQUEUE" line to the job's .err; the job's end is its last
    attempt's (it read CANCELLED, from that first line). The second attempt finds a damaged checkpoint."""
    result = run(["launcher=slurm", f"data.root={tiny_data}", "resources.mem=2G", "trainer.epochs=1000",
                  f"launcher.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    job = re.search(r"Submitted job (\d+)", result.stdout).group(1)
    log = tmp_path / "run" / "train.log"
    wait_until(lambda: log.exists() and "Train Epoch: 2" in log.read_text(), "the job training")
    subprocess.run(["scontrol", "requeuehold", job], check=True)
    wait_until(lambda: "DUE TO JOB REQUEUE" in next((tmp_path / "logs").glob(f"*_{job}.err")).read_text(),
               "the requeue's line in the .err")
    wait_until(lambda: subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                      text=True).stdout.strip() == "PENDING", "the first attempt's end")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    subprocess.run(["scontrol", "release", job], check=True)
    shown = row(ended(tmp_path / "logs", tmp_path, [job]), job)
    assert shown["STATE"] == "FAILED", shown
    cause = next(line for line in jobs(["show", job], tmp_path, tmp_path / "logs").stdout.splitlines()
                 if line.strip().startswith("cause:"))
    assert f"stopped: {tmp_path / 'run' / 'checkpoint.pt'}" in cause, cause
