"""Integration tests against a real one-node Slurm (cluster/localslurm.py, started by the fixtures):
submit as a user does, wait, then read what the user reads."""
import csv
import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run

pytestmark = pytest.mark.slurm
FINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}


def submitted_id(result):
    assert result.returncode == 0, result.stderr
    return re.search(r"Submitted job (?:array )?(\d+)", result.stdout).group(1)


def wait_for(job_id, timeout=180):
    """Poll sacct (one call every 2 s) until every task of the job has ended; returns their states."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"],
                             capture_output=True, text=True).stdout
        states = dict(line.split("|") for line in out.splitlines() if line.strip())
        if states and not any("[" in job for job in states) and all(s.split()[0] in FINAL for s in states.values()):
            return {job: state.split()[0] for job, state in states.items()}
        time.sleep(2)
    raise AssertionError(f"job {job_id} still not done after {timeout} s: {states}")


def submit(args, tmp_path, data):
    return run(["launcher=slurm", f"data.root={data}", f"launcher.log_dir={tmp_path / 'logs'}",
                "resources.mem=2G", *args], cwd=tmp_path)


@pytest.fixture(scope="module")
def timeout_job(slurm_cluster, tmp_path_factory):
    """A job with more work than its 1-minute limit, submitted first so it runs beside the others."""
    from conftest import write_dataset

    tmp = tmp_path_factory.mktemp("timeout")
    write_dataset(tmp / "data", "MNIST", n_train=2000, n_test=100)  # whole epochs, so checkpoints, fit
    result = run(["launcher=slurm", f"data.root={tmp / 'data'}", f"launcher.log_dir={tmp / 'logs'}",
                  "resources.time=1", "launcher.max_requeues=0", "trainer.epochs=1000", "model=cnn",
                  f"hydra.run.dir={tmp / 'run'}"], cwd=tmp, env=slurm_cluster.env)
    return submitted_id(result), tmp


@pytest.fixture(scope="module")
def requeue_job(slurm_cluster, tmp_path_factory):
    """The same CNN run three ways: submitted through the launcher, submitted with the course's script, and
    uninterrupted, here, for comparison. The two jobs are stopped as Slurm stops a job near its time limit (USR2),
    by the tests, once a first epoch is done: a verdict that no machine is too fast or too slow for. (Each job
    waits, held, for its test: it would otherwise be done before its test could stop it.)"""
    from conftest import write_dataset

    tmp = tmp_path_factory.mktemp("requeue")
    write_dataset(tmp / "data", "MNIST", n_train=1536, n_test=256)
    common = [f"data.root={tmp / 'data'}", "model=cnn", "trainer.epochs=6", "trainer.threads=1"]
    straight = subprocess.Popen([sys.executable, "-m", "mnist.run", *common, f"hydra.run.dir={tmp / 'straight'}"],
                                cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    result = run(["launcher=slurm", *common, f"launcher.log_dir={tmp / 'logs'}", "resources.time=10",
                  "resources.mem=2G", "+resources.extra={hold: true}", f"hydra.run.dir={tmp / 'run'}"], cwd=tmp,
                 env=slurm_cluster.env)
    script = subprocess.run(
        ["sbatch", "--hold", f"--output={tmp}/script_%j.out", f"--error={tmp}/script_%j.err", "slurm/cnn.sh", *common,
         f"hydra.run.dir={tmp / 'script_run'}"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **slurm_cluster.env})
    assert script.returncode == 0, script.stderr
    return submitted_id(result), tmp, straight, re.search(r"\d+", script.stdout).group(0)


def test_a_submitted_run_trains_on_the_cluster_and_logs_the_course_lines(slurm_env, timeout_job, requeue_job,
                                                                         tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submitted_id(submit(["trainer.epochs=2", f"hydra.run.dir={run_dir}"], tmp_path, tiny_data))
    assert (run_dir / "config.yaml").exists()  # saved on the login node, before the job runs
    assert wait_for(job_id) == {job_id: "COMPLETED"}

    log = (tmp_path / "logs" / f"mlp_{job_id}.out").read_text()
    assert "Train Epoch: 1 [0/512 (0%)]\tLoss: " in log and "Train Epoch: 2 [" in log
    assert len(re.findall(r"^Test set: Average loss: \d\.\d{4}, Accuracy: \d+/256 \(\d+%\)$", log, re.M)) == 2
    assert (tmp_path / "logs" / f"mlp_{job_id}.err").exists()
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["slurm"]["SLURM_JOB_ID"] == job_id and environment["cpu_threads"] == 1

    listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs")
    line = [text for text in listing.stdout.splitlines() if text.startswith(job_id)][0]
    assert "COMPLETED" in line and "mlp" in line and str(run_dir) in line
    tail = run(["--logs", str(tmp_path / "logs"), "tail", job_id, "-n", "50"], tmp_path, module="mnist.jobs")
    assert "Test set: Average loss" in tail.stdout


def test_dry_run_prints_the_exact_script_submitit_submits(slurm_env, tiny_data, tmp_path):
    args = ["model=cnn", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]
    dry = submit([*args, "dry_run=true"], tmp_path, tiny_data)
    assert dry.returncode == 0 and dry.stdout.startswith("#!/bin/bash")
    job_id = submitted_id(submit(args, tmp_path, tiny_data))
    written = (tmp_path / "logs" / "submitit" / job_id / f"{job_id}_submission.sh").read_text()
    assert dry.stdout == written
    wait_for(job_id)


def test_a_sweep_is_one_job_array_with_a_folder_and_log_per_task(slurm_env, tiny_data, tmp_path):
    result = run(["-m", "launcher=slurm", "optimizer=adadelta,sgd", f"data.root={tiny_data}", "trainer.epochs=1",
                  f"launcher.log_dir={tmp_path / 'logs'}", "resources.mem=2G", "launcher.array_parallelism=1",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    job_id = submitted_id(result)
    assert wait_for(job_id) == {f"{job_id}_0": "COMPLETED", f"{job_id}_1": "COMPLETED"}
    for task, optimizer in ((0, "adadelta"), (1, "sgd")):
        assert "Test set: Average loss" in (tmp_path / "logs" / f"mlp_{job_id}_{task}.out").read_text()
        config = (tmp_path / "sweep" / str(task) / "config.yaml").read_text()
        assert f"name: {optimizer}" in config
        assert (tmp_path / "sweep" / str(task) / "metrics.csv").exists()
    script = tmp_path / "logs" / "submitit" / job_id / f"{job_id}_submission.sh"  # one sbatch script
    assert "#SBATCH --array=0-1%1" in script.read_text()


def test_a_sweep_waiting_its_turn_shows_pending_tasks_and_cancel_says_one_never_started(slurm_env, tiny_data,
                                                                                         tmp_path):
    result = run(["-m", "launcher=slurm", "trainer.seed=1,2,3", f"data.root={tiny_data}", "trainer.epochs=1000",
                  f"launcher.log_dir={tmp_path / 'logs'}", "resources.mem=2G", "launcher.array_parallelism=1",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    job_id = submitted_id(result)
    try:
        listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs")
        assert listing.returncode == 0 and listing.stderr == "", listing.stderr
        assert re.search(rf"^{job_id}_0\s+mlp\s+(PENDING|RUNNING)\s", listing.stdout, re.M), listing.stdout
        for task in (1, 2):
            assert re.search(rf"^{job_id}_{task}\s+mlp\s+PENDING\s", listing.stdout, re.M), listing.stdout
        deadline = time.time() + 30  # with Slurm's reason, once its scheduler has looked at them (every 2 s here)
        while True:
            waiting = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout
            reasons = [re.search(rf"^{job_id}_{task}\s+mlp\s+PENDING\s.*\spending: (\w+) \(", waiting, re.M)
                       for task in (1, 2)]
            if all(reasons) or time.time() > deadline:
                break
            time.sleep(1)
        assert all(r and r.group(1) in ("JobArrayTaskLimit", "Resources") for r in reasons), waiting

        cancelled = run(["--logs", str(tmp_path / "logs"), "cancel", f"{job_id}_2"], tmp_path, module="mnist.jobs")
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout == (f"Cancelled {job_id}_2 while it was pending: it never started, so it has no log. "
                                    f"Its run folder ({tmp_path / 'sweep' / '2'}) holds only its config.\n")
        listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout
        assert re.search(rf"^{job_id}_1\s+mlp\s+PENDING\s", listing, re.M), listing
        assert not re.search(rf"^{job_id}_2\s+mlp\s+PENDING\s", listing, re.M), listing
        # gone from squeue -r and from sacct (which lists only tasks that started): cancelled, never UNKNOWN
        assert re.search(rf"^{job_id}_2\s+mlp\s+CANCELLED\s.*cancelled before it started", listing, re.M), listing
    finally:
        whole = run(["--logs", str(tmp_path / "logs"), "cancel", job_id], tmp_path, module="mnist.jobs")
    assert whole.returncode == 0 and f"Cancelled job array {job_id}" in whole.stdout, whole.stderr
    deadline = time.time() + 60  # sacct keeps never-started tasks folded (N_[1%1]): watch as the user does
    while time.time() < deadline:
        listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout
        if all(re.search(rf"^{job_id}_{task}\s+mlp\s+CANCELLED\s", listing, re.M) for task in (0, 1)):
            break
        time.sleep(2)
    for task in (0, 1):
        assert re.search(rf"^{job_id}_{task}\s+mlp\s+CANCELLED\s", listing, re.M), listing
    assert "None assigned" not in listing


def test_a_gpu_request_is_granted(slurm_env, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submitted_id(submit(["resources=gpu", "resources.cpus_per_task=1", "resources.mem=2G",
                                  "trainer.epochs=1", "trainer.device=cpu", f"hydra.run.dir={run_dir}"],
                                 tmp_path, tiny_data))
    assert wait_for(job_id) == {job_id: "COMPLETED"}
    assert json.loads((run_dir / "environment.json").read_text())["cuda_visible_devices"] == "0"


def test_the_course_script_trains_the_mlp(slurm_env, tiny_data, tmp_path):
    out = subprocess.run(["sbatch", "slurm/mlp.sh", f"data.root={tiny_data}", "trainer.epochs=1",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"\d+", out.stdout).group(0)
    logs = [ROOT / f"mlp_{job_id}.out", ROOT / f"mlp_{job_id}.err"]
    try:
        assert wait_for(job_id) == {job_id: "COMPLETED"}
        log = logs[0].read_text()
        assert "Train Epoch: 1 [640/512" not in log and "Train Epoch: 1 [0/512 (0%)]" in log
        assert "Test set: Average loss" in log
        assert (tmp_path / "run" / "metrics.csv").exists()
    finally:
        for path in logs:
            path.unlink(missing_ok=True)


@pytest.mark.parametrize("overrides, message", [
    (["resources.partition=nosuch"], "has no such partition. It has: debug"),
    (["resources.time='5 minutes'"], "resources.time='5 minutes' is not a Slurm time limit"),
    (["resources.mem=3X"], "resources.mem='3X'"),
    (["resources.cpus_per_task=3", "resources.tasks_per_node=2"], "the largest with 4 CPUs"),  # pends for ever
    (["resources=gpu", "resources.tasks_per_node=2", "resources.gpus_per_node=2"], "the largest with 4 CPUs"),
    (["resources=gpu", "resources.tasks_per_node=2"], "Set resources.tasks_per_node=1 (one rank per GPU)"),
    (["+resources.extra={gres: 'gpu:2'}"], "sbatch refused the job"),  # what only sbatch knows
])
def test_bad_requests_stop_before_anything_is_submitted(slurm_env, tiny_data, tmp_path, overrides, message):
    result = submit([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tiny_data)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "logs" / "jobs.jsonl").exists()


def test_a_dry_run_refuses_what_no_node_can_hold_as_a_submission_does(slurm_env, tiny_data, tmp_path):
    result = submit(["dry_run=true", "resources.mem=1000G"], tmp_path, tiny_data)
    assert result.returncode == 2 and "#!/bin/bash" not in result.stdout, result.stdout
    assert "No node of partition debug can hold this job" in result.stderr and "resources.mem=" in result.stderr


def test_without_accounting_submitting_and_watching_still_work(slurm_env_no_accounting, tiny_data, tmp_path):
    job_id = submitted_id(submit(["trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tiny_data))
    assert subprocess.run(["sacct", "-j", job_id], capture_output=True).returncode != 0
    deadline = time.time() + 120
    while time.time() < deadline:
        listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout
        if "COMPLETED" in listing or "FAILED" in listing:
            break
        time.sleep(2)
    assert re.search(rf"^{job_id}\s+mlp\s+COMPLETED", listing, re.M), listing
    assert "Test set: Average loss" in (tmp_path / "logs" / f"mlp_{job_id}.out").read_text()


def test_gpus_on_a_cluster_without_any_are_refused(slurm_env_no_accounting, tiny_data, tmp_path):
    result = submit(["resources=gpu", "resources.mem=2G"], tmp_path, tiny_data)
    assert result.returncode == 2 and "has no GPUs" in result.stderr and "resources=cpu" in result.stderr


def test_cancel_keeps_the_log(slurm_env, tiny_data, tmp_path):
    job_id = submitted_id(submit(["trainer.epochs=1000", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tiny_data))
    log = tmp_path / "logs" / f"mlp_{job_id}.out"
    deadline = time.time() + 60
    while time.time() < deadline and "Epoch 1:" not in (log.read_text() if log.exists() else ""):
        time.sleep(1)
    result = run(["--logs", str(tmp_path / "logs"), "cancel", job_id], tmp_path, module="mnist.jobs")
    assert result.returncode == 0 and "Cancelled" in result.stdout
    assert wait_for(job_id) == {job_id: "CANCELLED"}
    assert "Epoch 1:" in log.read_text() and (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_job_over_its_time_limit_ends_timeout_and_keeps_its_log(slurm_env, timeout_job):
    job_id, folder = timeout_job
    assert wait_for(job_id, timeout=400) == {job_id: "TIMEOUT"}
    log = (folder / "logs" / f"cnn_{job_id}.out").read_text()
    assert "Train Epoch: 1 [" in log and (folder / "run" / "checkpoint.pt").exists()


def stop_as_at_the_time_limit(job_id, log, batch_shell=False):
    """USR2 as Slurm sends it before a job's time limit (--signal=USR2: to the job's steps; the course script's
    B:USR2: to its batch shell), once the log shows epoch 2 started: the run's handler is set, a checkpoint due."""
    wait_for_text(log, "Train Epoch: 2 ", timeout=300)
    subprocess.run(["scancel", "--signal=USR2", *(["--batch"] if batch_shell else []), job_id], check=True)


def test_a_run_stopped_near_its_limit_is_requeued_and_completes_like_an_uninterrupted_one(slurm_env, requeue_job):
    job_id, folder, straight, _ = requeue_job
    log = folder / "logs" / f"cnn_{job_id}.out"  # one log for every attempt
    subprocess.run(["scontrol", "release", job_id], check=True)
    stop_as_at_the_time_limit(job_id, log)
    assert wait_for(job_id, timeout=400) == {job_id: "COMPLETED"}
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    text = log.read_text()
    assert "Stopped in epoch" in text and "asking Slurm to requeue" in text and "Resuming from" in text, text
    assert text.count("Test set: Average loss") == 6

    def metrics(run_dir):
        return [(r["epoch"], r["train_loss"], r["test_loss"], r["accuracy"])
                for r in csv.DictReader(open(run_dir / "metrics.csv"))]

    assert metrics(folder / "run") == metrics(folder / "straight")
    assert len(metrics(folder / "run")) == 6


def test_the_course_script_requeues_itself_when_stopped_near_its_limit(slurm_env, requeue_job):
    _, folder, straight, script_job = requeue_job
    log = folder / f"script_{script_job}.out"
    subprocess.run(["scontrol", "release", script_job], check=True)
    stop_as_at_the_time_limit(script_job, log, batch_shell=True)
    assert wait_for(script_job, timeout=400) == {script_job: "COMPLETED"}
    assert straight.wait(timeout=300) == 0
    text = log.read_text()
    assert "Stopped in epoch" in text and "Resuming from" in text, text
    assert (folder / "script_run" / "metrics.csv").read_text().count("\n") == 7
    rows = lambda run_dir: [r[:4] for r in csv.reader(open(run_dir / "metrics.csv"))]  # noqa: E731
    assert rows(folder / "script_run") == rows(folder / "straight")


def test_two_tasks_train_data_parallel_and_log_once(slurm_env, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submitted_id(submit(["resources.tasks_per_node=2", "resources.mem=3G", "trainer.epochs=2",
                                  "trainer.log_interval=2", f"hydra.run.dir={run_dir}"], tmp_path, tiny_data))
    assert wait_for(job_id) == {job_id: "COMPLETED"}
    log = (tmp_path / "logs" / f"mlp_{job_id}.out").read_text()
    assert "global_rank=1(2)" in log  # submitit started two tasks...
    assert log.count("Test set: Average loss") == 2 and log.count("Train Epoch: 1 [0/512 (0%)]") == 1  # ...one spoke
    assert "Train Epoch: 1 [256/512 (50%)]" in log  # 4 steps of 64 per rank: 256 of 512 samples after step 2
    assert json.loads((run_dir / "environment.json").read_text())["world_size"] == 2
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 2 and float(rows[-1]["accuracy"]) > 0.5  # the band a single task reaches here


def noise_dataset(root, n_train, n_test=128):
    """An MNIST-format dataset of random images and labels (quick to write at any size)."""
    import random

    from mnist.idx import write_idx

    raw, rng = root / "MNIST" / "raw", random.Random(0)
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.randbytes(n * 784), (n, 28, 28))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", bytes(rng.randrange(10) for _ in range(n)), (n,))
    return root


def wait_for_text(path, text, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {path} after {timeout} s")


def metrics_but_timings(run_dir):
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.mark.parametrize("model, n_train, batch_size", [("mlp", 4096, 16), ("cnn", 1024, 64)])  # the CNN: dropout
def test_a_data_parallel_run_requeued_mid_epoch_ends_as_an_uninterrupted_one(slurm_env, tmp_path, model, n_train,
                                                                             batch_size):
    data = noise_dataset(tmp_path / "data", n_train)
    common = [f"model={model}", f"data.batch_size={batch_size}", "resources.tasks_per_node=2", "resources.mem=3G",
              "trainer.epochs=4", "trainer.log_interval=1", "launcher.max_requeues=1"]
    straight = submitted_id(submit([*common, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path, data))
    # RANK and WORLD_SIZE left in the submitting shell reach the job (sbatch passes the environment on)
    requeued = submitted_id(run(["launcher=slurm", f"data.root={data}", f"launcher.log_dir={tmp_path / 'logs'}",
                                 *common, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                                env={"RANK": "0", "WORLD_SIZE": "1"}))
    log = tmp_path / "logs" / f"{model}_{requeued}.out"
    wait_for_text(log, "Training on cpu, 1 CPU thread per rank, 2 ranks (gloo)")  # epoch 1 is about to start
    subprocess.run(["scancel", "--signal=USR2", requeued], check=True)  # as Slurm does before a time limit
    wait_for_text(log, "checkpoint written")
    interrupted = tmp_path / "interrupted"  # the mid-epoch checkpoint, to resume with another number of ranks
    interrupted.mkdir()
    for name in ("config.yaml", "checkpoint.pt", "metrics.csv"):
        (interrupted / name).write_bytes((tmp_path / "run" / name).read_bytes())

    assert wait_for(requeued) == {requeued: "COMPLETED"} and wait_for(straight) == {straight: "COMPLETED"}
    text = log.read_text()
    # (the epoch it stops in is the machine's speed's to decide: an epoch of these is about half a second)
    stopped = re.search(r"^Stopped in epoch (\d) after batch \d+; checkpoint written$", text, re.M)
    assert stopped, text
    epoch = int(stopped.group(1))
    assert "asking Slurm to requeue" in text and f"at epoch {epoch}, batch" in text
    assert metrics_but_timings(tmp_path / "run") == metrics_but_timings(tmp_path / "straight")
    if model == "mlp":
        resumed = run([f"hydra.run.dir={interrupted}", "trainer.threads=1"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert f"Epoch {epoch} was interrupted in a run of 2 ranks and this one has 1: epoch {epoch} restarts from " \
               f"its first batch" in resumed.stdout
        assert f"Train Epoch: {epoch} [0/{n_train} (0%)]" in resumed.stdout
        assert len(metrics_but_timings(interrupted)) == 4
