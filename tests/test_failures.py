"""When a cluster run goes wrong, on a real one-node Slurm (with and without accounting): the cause,
the figures of what each job used against its own usage.json, and `resubmit` of only what did not finish.
Small data, 1-CPU jobs; 2G where a job must not be killed."""
import csv
import json
import re
import subprocess
import sys
import time

import pytest
from conftest import run, write_dataset

from mnist import figures
from mnist.launch import outcome, record

pytestmark = pytest.mark.slurm


def jobs(args, cwd, logs):
    result = run(["--logs", str(logs), *[str(a) for a in args]], cwd, timeout=120, module="mnist.jobs")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    return result


def rows(listing):
    """The status table's rows as {header: cell}; cells are two or more spaces apart."""
    lines = [line for line in listing.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, re.split(r"\s{2,}", line.strip()))) for line in lines[1:] if re.match(r"\d", line)]


def row(listing, job_id):
    """A job's (first) row of the status table."""
    return next(cells for cells in rows(listing) if cells["JOB"] == job_id)


def ended(logs, cwd, job_ids, timeout=180):
    """Poll `python -m mnist.jobs` as a user would until these jobs have ended; returns the last listing."""
    deadline = time.time() + timeout
    while True:
        listing = jobs([], cwd, logs).stdout
        states = [cells["STATE"] for cells in rows(listing) if cells["JOB"] in job_ids]  # a packed task: a row a run
        if all(s not in outcome.GOING for s in states) or time.time() > deadline:
            return listing
        time.sleep(1)


def usage_of(run_dir):
    [attempt] = json.loads((run_dir / "usage.json").read_text())["attempts"]
    return attempt, attempt["ranks"]["0"]


def submit(tmp_path, data, run_dir, *args):
    result = run(["launcher=slurm", f"data.root={data}", f"launcher.log_dir={tmp_path / 'logs'}",
                  f"hydra.run.dir={run_dir}", *args], tmp_path)
    assert result.returncode == 0, result.stderr
    return re.search(r"Submitted job (\d+)", result.stdout).group(1)


def mib(cell):
    return figures.memory_bytes(cell.replace(".0", "")) if cell[-1] in "KMG" else None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures") / "data"
    write_dataset(root, "MNIST", n_train=512, n_test=256)
    return root


@pytest.fixture(scope="module")
def finished(slurm_cluster, data, tmp_path_factory):
    """A job that completes (the default MLP, 2 epochs, 2G)."""
    tmp = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
        job = submit(tmp, data, tmp / "run", "trainer.epochs=2", "resources.mem=2G")
        ended(tmp / "logs", tmp, [job])
    return job, tmp


def test_the_figures_of_a_finished_job_agree_with_its_usage_json(slurm_env, finished):
    job, tmp = finished
    listing = jobs([], tmp, tmp / "logs").stdout
    shown = row(listing, job)
    attempt, own = usage_of(tmp / "run")
    assert shown["STATE"] == "COMPLETED" and attempt["end"] == "completed" and shown["CAUSE"] == "-"
    assert shown["CPU"] == f"{100 * own['cpu_s'] / (own['wall_s'] * own['cpus']):.0f}%"  # its own CPU and wall seconds
    peak, asked = shown["MEM"].split("/")
    assert asked == "2.0G" and abs(mib(peak) - own["peak_rss"]) <= 0.1 * own["peak_rss"], (peak, own)
    used, limit = (figures.duration_s(x) for x in shown["TIME"].split("/"))
    assert limit == 300 and abs(used - own["wall_s"]) <= 5, (shown["TIME"], own["wall_s"])  # Slurm's elapsed
    details = jobs(["show", job], tmp, tmp / "logs").stdout
    assert f"on 1 CPUs: efficiency {shown['CPU']}" in details and f"{own['cpu_s']:.1f} CPU s" in details
    assert "attempt 0:" in details and "; completed" in details and f"run folder:  {tmp / 'run'}" in details


def test_a_job_over_its_memory_is_explained_with_asked_and_peak(slurm_env, finished, data, tmp_path):
    """Asks 100M more than the finished job's peak, and trains a model whose weights, gradients and optimizer
    state need ~200M more: killed once it trains, its peak against its own record."""
    _, done = finished
    asked = (usage_of(done / "run")[1]["peak_rss"] >> 20) + 100
    job = submit(tmp_path, data, tmp_path / "run", "trainer.epochs=1000", f"resources.mem={asked}M",
                 "model.hidden=[16384]")
    listing = ended(tmp_path / "logs", tmp_path, [job])
    shown = row(listing, job)
    attempt, own = usage_of(tmp_path / "run")
    assert shown["STATE"] in ("FAILED", "OUT_OF_MEMORY") and attempt["end"] is None, (shown, attempt)
    peak = mib(shown["MEM"].split("/")[0])
    assert abs(peak - own["peak_rss"]) <= 0.1 * own["peak_rss"], (shown["MEM"], own["peak_rss"])
    assert shown["CAUSE"].startswith(f"killed for memory: peak {shown['MEM'].split('/')[0]} > "
                                     f"{figures.human_bytes(asked << 20)} asked; try resources.mem="), shown["CAUSE"]
    fit = shown["CAUSE"].rsplit("resources.mem=", 1)[1]
    assert figures.memory_bytes(fit) >= 1.2 * max(peak, own["peak_rss"])  # what would have fitted, with a margin
    assert figures.memory_bytes(fit) >= 2 * (asked << 20)  # the peak before a kill is a lower bound
    details = jobs(["show", job], tmp_path, tmp_path / "logs").stdout
    assert f"\n  fix:         python -m mnist.jobs resubmit {job} resources.mem={fit} " in details, details  # ./logs
    assert "own record" in details
    more = jobs(["resubmit", job, "--more", "dry_run=true"], tmp_path, tmp_path / "logs")
    assert f"#SBATCH --mem={fit}\n" in more.stdout and more.stdout.startswith("#!/bin/bash")  # what the cause says


def test_a_sweep_with_two_tasks_cancelled_reruns_them_as_one_array_and_they_resume(slurm_env, data, tmp_path):
    """Four runs that train alike (they differ only in trainer.log_interval): the two left alone are the
    uninterrupted runs the two cancelled and resubmitted ones must end equal to."""
    logs, sweep = tmp_path / "logs", tmp_path / "sweep"
    result = run(["-m", "launcher=slurm", "trainer.log_interval=4,5,6,7", f"data.root={data}", "model=cnn",
                  "trainer.epochs=6", "trainer.threads=1", "resources.mem=2G", "launcher.array_parallelism=4",
                  f"launcher.log_dir={logs}", f"hydra.sweep.dir={sweep}"], tmp_path)
    array = re.search(r"Submitted job array (\d+)", result.stdout).group(1)
    deadline, waiting = time.time() + 180, [2, 3]
    while waiting:  # each cancelled as soon as its first epoch is done: a checkpoint to resume from, epochs left
        assert time.time() < deadline, f"tasks {waiting} never finished an epoch"
        for task in list(waiting):
            metrics = sweep / str(task) / "metrics.csv"
            if metrics.exists() and metrics.read_text().count("\n") >= 2:
                subprocess.run(["scancel", f"{array}_{task}"], check=True)  # at once: epochs are ~1.5 s here
                waiting.remove(task)
        time.sleep(0.2)
    listing = ended(logs, tmp_path, [f"{array}_{t}" for t in range(4)])
    assert [row(listing, f"{array}_{t}")["STATE"] for t in range(4)] == ["COMPLETED"] * 2 + ["CANCELLED"] * 2
    assert row(listing, f"{array}_2")["CAUSE"].startswith("cancelled at epoch ")

    again = jobs(["resubmit", sweep], tmp_path, logs)
    assert f"Rerunning 2 of 4 runs in {sweep} (2 left alone: 0 completed; 1 completed)" in again.stdout
    new = re.search(r"Submitted job array (\d+)", again.stdout).group(1)
    entries = [e for e in record.read(logs) if e.job_id.startswith(new + "_")]
    assert [(e.job_id, e.previous, e.run_dir) for e in entries] == [
        (f"{new}_{i}", f"{array}_{t}", str(sweep / str(t))) for i, t in enumerate((2, 3))]
    script = (logs / "submitit" / new / f"{new}_submission.sh").read_text()  # one sbatch call, 2 tasks
    assert re.search(r"^#SBATCH --array=0-1%\d+$", script, re.M), script
    ended(logs, tmp_path, [f"{new}_0", f"{new}_1"])
    for i in (0, 1):
        assert "Resuming from" in (logs / f"cnn_{new}_{i}.out").read_text()

    report = run([sweep, "--no-figures"], tmp_path, module="mnist.report")
    assert report.returncode == 0, report.stderr
    rows = {r["run"]: r for r in csv.DictReader(open(sweep / "report.csv"))}
    assert [rows[str(t)]["state"] for t in range(4)] == ["COMPLETED"] * 4
    assert rows["2"]["jobs"] == f"{array}_2 {new}_0" and rows["0"]["jobs"] == f"{array}_0"

    def final(t):
        return [(r["epoch"], r["train_loss"], r["test_loss"], r["accuracy"])
                for r in csv.DictReader(open(sweep / str(t) / "metrics.csv"))]

    assert final(2) == final(3) == final(0) == final(1) and len(final(0)) == 6
    assert "Nothing to rerun" in jobs(["resubmit", sweep], tmp_path, logs).stdout


def test_a_packed_task_cancelled_in_its_first_run_is_rerun_packed_again_and_only_its_runs(slurm_env, data, tmp_path):
    """Four alike runs, two a task (launcher.runs_per_task=2). The second task is cancelled during its first
    run: resubmit packs that run and the one that never started into one task, in their order; the first
    resumes, the second trains from its start, and both end as the uninterrupted runs did."""
    logs, sweep, data = tmp_path / "logs", tmp_path / "sweep", tmp_path / "data"
    write_dataset(data, "MNIST", n_train=2048, n_test=256)  # epochs of ~1 s: time to cancel one mid-run
    result = run(["-m", "launcher=slurm", "trainer.log_interval=4,5,6,7", f"data.root={data}", "model=cnn",
                  "trainer.epochs=3", "trainer.threads=1", "resources.mem=2G", "launcher.runs_per_task=2",
                  f"launcher.log_dir={logs}", f"hydra.sweep.dir={sweep}"], tmp_path)
    array = re.search(r"Submitted job array (\d+)", result.stdout).group(1)
    metrics, deadline = sweep / "2" / "metrics.csv", time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # one epoch of the task's first run
        assert time.time() < deadline, "run 2 never finished an epoch"
        time.sleep(0.2)
    subprocess.run(["scancel", f"{array}_1"], check=True)
    ended(logs, tmp_path, [f"{array}_0", f"{array}_1"])

    again = jobs(["resubmit", sweep], tmp_path, logs)
    assert f"Rerunning 2 of 4 runs in {sweep} (2 left alone: 0 completed; 1 completed)" in again.stdout, again.stdout
    assert "the folders above in their order, 2 a task" in again.stdout
    new = re.search(r"Submitted job (\d+)", again.stdout).group(1)
    entries = [e for e in record.read(logs) if e.job_id == new]  # one task: a plain job
    assert [(e.run_dir, e.pack, e.previous) for e in entries] == [
        (str(sweep / "2"), (0, 2), f"{array}_1"), (str(sweep / "3"), (1, 2), f"{array}_1")]
    ended(logs, tmp_path, [new])
    first, _, second = (logs / f"cnn_{new}.out").read_text().partition(f"Run 2 of 2 in this task: {sweep / '3'}\n")
    assert f"Run 1 of 2 in this task: {sweep / '2'}\n" in first and "Resuming from" in first
    assert "Train Epoch: 1 [0/" in second and "Resuming from" not in second

    def final(t):
        return [(r["epoch"], r["train_loss"], r["test_loss"], r["accuracy"])
                for r in csv.DictReader(open(sweep / str(t) / "metrics.csv"))]

    assert final(2) == final(3) == final(0) == final(1) and len(final(0)) == 3


def test_without_accounting_the_views_still_say_what_happened(slurm_env_no_accounting, data, tmp_path):
    logs = tmp_path / "logs"
    fine = submit(tmp_path, data, tmp_path / "fine", "trainer.epochs=1", "resources.mem=2G")
    killed = submit(tmp_path, data, tmp_path / "killed", "trainer.epochs=1000", "resources.mem=300M")
    listing = ended(logs, tmp_path, [fine, killed])
    shown, attempt = row(listing, fine), usage_of(tmp_path / "fine")[1]
    assert shown["STATE"] == "COMPLETED" and shown["TIME"].endswith("/5:00")
    assert shown["CPU"] == f"{100 * attempt['cpu_s'] / (attempt['wall_s'] * attempt['cpus']):.0f}%"
    assert mib(shown["MEM"].split("/")[0]) == pytest.approx(attempt["peak_rss"], rel=0.1)
    dead = row(listing, killed)
    assert dead["STATE"] == "FAILED" and dead["CAUSE"].startswith("killed for memory: peak ")
    assert "> 300M asked" in dead["CAUSE"]
    details = jobs(["show", killed], tmp_path, logs).stdout
    assert "resources.mem=" in details and f"run folder:  {tmp_path / 'killed'}" in details


def test_the_login_node_commands_import_no_torch(slurm_env, finished):
    job, tmp = finished
    logs = str(tmp / "logs")
    code = ("import sys\nfrom mnist import jobs, report\n"
            f"for args in (['--logs', {logs!r}], ['--logs', {logs!r}, '--watch', '0.2'], ['--logs', {logs!r}, 'show', "
            f"{job!r}], ['--logs', {logs!r}, 'resubmit', {job!r}, 'dry_run=true']):\n"
            "    jobs.main(args)\n"
            f"report.main([{str(tmp / 'run')!r}, '--logs', {logs!r}])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "every job listed has ended" in result.stdout and "Nothing to rerun" in result.stdout
