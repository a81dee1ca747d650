"""Beyond one node, on a real two-node Slurm (cluster/localslurm.py: n1 and n2 sharing this machine, 2 CPUs each,
partitions debug, short, gpu, low and high): data-parallel training across nodes, partitions and their limits."""
import csv
import json
import re
import subprocess
import time

import pytest
from conftest import run
from test_slurm import noise_dataset, submitted_id, wait_for

pytestmark = pytest.mark.slurm


def submit(args, tmp_path, data, env=None):
    sweep = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if "-m" in args else []
    return run([*sweep, "launcher=slurm", f"data.root={data}", f"launcher.log_dir={tmp_path / 'logs'}",
                *(a for a in args if a != "-m")], cwd=tmp_path, env=env)


def free_port():
    """A port free now, for torch's rendezvous: the jobs of every cluster of the suite share this one machine,
    where the port submitit draws from the job id may be taken (a real cluster's nodes are machines of their own)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def metrics_but_timings(run_dir):
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]


def test_two_nodes_train_as_two_ranks_on_one_node_do_bit_for_bit(multinode_env, tmp_path):
    """nodes=2 x 1 task and nodes=1 x 2 tasks: the same world size and sharding, so the same metrics to the last
    digit; one log of rank 0's lines; environment.json names the nodes; `show` gives each node's peak."""
    data = noise_dataset(tmp_path / "data", 1024)
    common = ["model=mlp", "data.batch_size=32", "trainer.epochs=2", "trainer.log_interval=4", "resources.mem=3G"]
    across = submitted_id(submit([*common, "resources.nodes=2", "resources.tasks_per_node=1",
                                  f"hydra.run.dir={tmp_path / 'across'}"], tmp_path, data,
                                 env={"MASTER_PORT": free_port()}))
    within = submitted_id(submit([*common, "resources.nodes=1", "resources.tasks_per_node=2",
                                  f"hydra.run.dir={tmp_path / 'within'}"], tmp_path, data,
                                 env={"MASTER_PORT": free_port()}))
    [script] = (tmp_path / "logs" / "submitit").glob(f"{across}/*_submission.sh")
    assert "--kill-on-bad-exit=1" in script.read_text()  # a rank that fails ends the job, not a 30-minute wait
    assert wait_for(across) == {across: "COMPLETED"} and wait_for(within) == {within: "COMPLETED"}

    assert metrics_but_timings(tmp_path / "across") == metrics_but_timings(tmp_path / "within")
    log = (tmp_path / "logs" / f"mlp_{across}.out").read_text()
    assert "Training on cpu, 1 CPU thread per rank, 2 ranks (gloo)" in log
    assert log.count("Test set: Average loss") == 2 and log.count("Train Epoch: 1 [0/1024 (0%)]") == 1, log
    environment = json.loads((tmp_path / "across" / "environment.json").read_text())
    assert environment["world_size"] == 2 and environment["slurm"]["SLURM_JOB_NODELIST"] == "n[1-2]"
    assert environment["node"] == "n1"  # rank 0's

    shown = run(["--logs", str(tmp_path / "logs"), "show", across], tmp_path, module="mnist.jobs")
    assert shown.returncode == 0, shown.stderr
    peaks = re.search(r"attempt 0: .* on (n\d),(n\d), 2 ranks, .*, peaks (n\d) ([\d.]+M), (n\d) ([\d.]+M);",
                      shown.stdout)
    assert peaks and {peaks.group(1), peaks.group(2)} == {peaks.group(3), peaks.group(5)} == {"n1", "n2"}, shown.stdout
    fullest = re.search(r"memory: +peak ([\d.]+)M of 3.0G asked", shown.stdout)
    nodes = [float(peaks.group(4)[:-1]), float(peaks.group(6)[:-1])]
    # MEM is the fullest node's (its own record's, or Slurm's MaxRSS where that is higher), not the nodes' sum
    assert fullest and max(nodes) <= float(fullest.group(1)) < 0.8 * sum(nodes), shown.stdout


def test_a_two_node_run_stopped_mid_epoch_near_its_limit_resumes_exactly(multinode_env, tmp_path):
    """USR2 as Slurm sends it before a time limit (to every task of the step: both nodes' ranks): the ranks agree on
    the batch to stop after, rank 0 checkpoints, the job is requeued onto the two nodes and ends with the metrics
    of an uninterrupted two-node run."""
    from test_slurm import wait_for_text

    data = noise_dataset(tmp_path / "data", 4096)
    common = ["model=mlp", "data.batch_size=16", "trainer.epochs=4", "trainer.log_interval=1", "resources.mem=1G",
              "resources.nodes=2", "resources.tasks_per_node=1", "launcher.max_requeues=1"]
    straight = submitted_id(submit([*common, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path, data,
                                   env={"MASTER_PORT": free_port()}))
    requeued = submitted_id(submit([*common, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, data,
                                   env={"MASTER_PORT": free_port()}))
    log = tmp_path / "logs" / f"mlp_{requeued}.out"
    wait_for_text(log, "Training on cpu, 1 CPU thread per rank, 2 ranks (gloo)", timeout=300)
    subprocess.run(["scancel", "--signal=USR2", requeued], check=True)
    assert wait_for(requeued, timeout=300) == {requeued: "COMPLETED"}
    assert wait_for(straight, timeout=300) == {straight: "COMPLETED"}
    text = log.read_text()
    stopped = re.search(r"^Stopped in epoch (\d) after batch \d+; checkpoint written$", text, re.M)
    assert stopped and "asking Slurm to requeue" in text and "Resuming from" in text, text
    assert f"at epoch {stopped.group(1)}, batch" in text, text
    assert metrics_but_timings(tmp_path / "run") == metrics_but_timings(tmp_path / "straight")
    assert len(metrics_but_timings(tmp_path / "run")) == 4
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["slurm"]["SLURM_JOB_NODELIST"] == "n[1-2]" and environment["world_size"] == 2


@pytest.mark.parametrize("overrides, expected", [
    (["resources.partition=short", "resources.time=0:10:0", "resources.mem=1G"],
     ["resources.time=0:10:0 is over partition short's MaxTime of 0:02:00", "resources.time=0:02:00",
      "or a partition that takes it: resources.partition=debug"]),
    (["resources.partition=short", "resources.mem=2G"],
     ["resources.mem=2G is over partition short's MaxMemPerNode of 1G", "resources.mem=1G",
      "resources.partition=debug"]),
    (["-m", "trainer.seed=1,2,3", "launcher.runs_per_task=3", "resources.partition=short", "resources.time=0:1:0",
      "resources.mem=1G"],
     ["a task of 3 packed runs (0:03:00) is over partition short's MaxTime of 0:02:00", "launcher.runs_per_task=2"]),
])
def test_a_request_over_a_partitions_limit_is_refused_at_submit_naming_it_and_a_partition_that_takes_it(
        multinode_env, tiny_data, tmp_path, overrides, expected):
    """Slurm would take these and leave them pending for ever (PartitionTimeLimit); a dry run is refused alike."""
    for dry in ("dry_run=false", "dry_run=true"):
        result = submit([*overrides, dry], tmp_path, tiny_data)
        assert result.returncode == 2, result.stderr
        message = result.stderr.strip()
        assert len(message.splitlines()) == 1 and "Traceback" not in message, message
        for phrase in expected:
            assert phrase in message, f"{phrase!r} not in: {message}"
    assert not (tmp_path / "logs" / "jobs.jsonl").exists()  # nothing submitted


def test_a_run_in_the_short_partition_trains_end_to_end(multinode_env, tiny_data, tmp_path):
    job = submitted_id(submit(["resources.partition=short", "resources.time=0:2:0", "resources.mem=1G",
                               "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tiny_data))
    assert wait_for(job) == {job: "COMPLETED"}
    listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs")
    assert re.search(rf"^{job}\s+mlp\s+COMPLETED\s", listing.stdout, re.M), listing.stdout
    assert len(metrics_but_timings(tmp_path / "run")) == 1


def test_a_gpu_run_in_the_gpu_partition_lands_on_its_gpu_node_end_to_end(multinode_env, tiny_data, tmp_path):
    """resources=gpu resources.partition=gpu: the job runs on the node with the (fake) GPU, which Slurm grants it;
    it trains on the CPU here (trainer.device=cpu), as the fake GPU has no CUDA behind it."""
    job = submitted_id(submit(["resources=gpu", "resources.partition=gpu", "resources.mem=1G", "trainer.epochs=1",
                               "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tiny_data))
    assert wait_for(job) == {job: "COMPLETED"}
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["node"] == "n2" and environment["cuda_visible_devices"] == "0", environment
    [script] = (tmp_path / "logs" / "submitit").glob(f"{job}/*_submission.sh")
    assert "#SBATCH --partition=gpu" in script.read_text() and "#SBATCH --gpus-per-node=1" in script.read_text()
    shown = run(["--logs", str(tmp_path / "logs"), "show", job], tmp_path, module="mnist.jobs")
    assert shown.returncode == 0 and re.search(r"attempt 0: .* on n2, ", shown.stdout), shown.stdout


def test_auto_packing_stays_within_the_partitions_max_time_and_counts_its_nodes(multinode_env, tiny_data, tmp_path):
    """20 one-minute runs: the short partition's two nodes hold 4 such tasks at once (5 runs a task would do), but
    a task asks for the sum of its runs' limits and short allows 2 minutes: 2 runs a task."""
    from test_sweeps import past_run

    for number in range(5):
        past_run(tmp_path, number, 400, 60)
    result = submit(["-m", "trainer.epochs=1", "trainer.seed=range(20)", "launcher.runs_per_task=auto",
                     "launcher.array_parallelism=8", "resources.partition=short", "resources.time=0:1:0",
                     "resources.mem=1G", "dry_run=true"], tmp_path, tiny_data)
    assert result.returncode == 0, result.stderr
    assert "launcher.runs_per_task=auto: 2 (a task asks for the sum of its runs' time limits, and 2 of 0:01:00 " \
           "fill partition short's MaxTime of 0:02:00; by the past runs 5 would do)\n" in result.stderr, result.stderr
    assert "#SBATCH --array=0-9%8" in result.stdout and "#SBATCH --time=2\n" in result.stdout, result.stdout


def test_a_tasks_training_step_runs_on_every_cpu_its_task_holds(multinode_env, tiny_data, tmp_path):
    """Since Slurm 22.05 srun no longer takes --cpus-per-task from sbatch; where tasks are pinned (task/affinity,
    as here and at most sites) a step that is not told runs on one CPU of the two its task holds."""
    job = submitted_id(submit(["resources.cpus_per_task=2", "resources.mem=1G", "trainer.epochs=1",
                               f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tiny_data))
    assert wait_for(job) == {job: "COMPLETED"}
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["cpus_available"] == 2 and environment["cpu_threads"] == 2, environment
    [script] = (tmp_path / "logs" / "submitit").glob(f"{job}/*_submission.sh")
    srun = next(line for line in script.read_text().splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=2" in srun, srun  # told, whatever this Slurm's srun would inherit


def wait_until(what, check, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"no {what} after {timeout} s")


def test_a_node_that_dies_mid_job_requeues_it_to_the_other_node_where_it_resumes(multinode_env, multinode_cluster,
                                                                                  tmp_path):
    """The cluster's JobRequeue=0, as at many sites; the launcher's jobs ask for --requeue (as the course scripts
    do), so Slurm requeues a job whose node failed. Killed mid-epoch with its node (its slurmd and processes, as
    if the power went), the run resumes on the other node from its last checkpoint and ends with the metrics of an
    uninterrupted run; the job's CAUSE named the node while it was requeued; no file of the run folder is damaged."""
    data = noise_dataset(tmp_path / "data", 4096)
    common = ["model=mlp", "data.batch_size=16", "trainer.epochs=4", "trainer.log_interval=16", "trainer.threads=1"]
    straight = run([*common, f"data.root={data}", f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    job = submitted_id(submit([*common, "resources.mem=1G", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, data))
    log = tmp_path / "logs" / f"mlp_{job}.out"
    wait_until("epoch 2 in the log", lambda: log.exists() and "Train Epoch: 2 " in log.read_text())
    node = subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True).stdout.strip()
    assert node in ("n1", "n2"), node
    multinode_cluster.kill_node(node)
    try:
        listing = wait_until("the requeue in mnist.jobs", lambda: re.search(
            rf"^{job}\s+mlp\s+(PENDING|RUNNING)\s.*requeued: its node {node} failed", run(
                ["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout, re.M))
        assert listing
        assert wait_for(job, timeout=300) == {job: "COMPLETED"}
    finally:
        multinode_cluster.start_node(node)
    assert metrics_but_timings(tmp_path / "run") == metrics_but_timings(tmp_path / "straight")
    text = log.read_text()
    assert "Resuming from" in text and text.count("Test set: Average loss") >= 4, text
    shown = run(["--logs", str(tmp_path / "logs"), "show", job], tmp_path, module="mnist.jobs").stdout
    other = {"n1": "n2", "n2": "n1"}[node]
    assert f"requeued 1x (last: its node {node} failed)" in shown, shown
    assert re.search(rf"attempt 0: .* on {node}, .*no end written", shown) and \
        re.search(rf"attempt 1: .* on {other}, .*completed", shown), shown
    from mnist import rundir

    assert rundir.complete(tmp_path / "run", rundir.read_config(tmp_path / "run"))  # config, metrics, checkpoint whole


def test_a_controller_restart_mid_sweep_loses_no_job_and_no_record_line(multinode_env, multinode_cluster, tiny_data,
                                                                        tmp_path):
    """While slurmctld is down the array's tasks keep training; `mnist.jobs` says Slurm cannot be reached (exit 0,
    the table of what the record knows); once it is back, every task reads its true state and the record has a
    line for each."""
    result = submit(["-m", "trainer.seed=1,2,3", "trainer.epochs=3", "resources.mem=1G"], tmp_path, tiny_data)
    array = submitted_id(result)
    logs = tmp_path / "logs"
    wait_until("a running task", lambda: "RUNNING" in run(["--logs", str(logs)], tmp_path, module="mnist.jobs").stdout)
    multinode_cluster.stop_controller()
    try:
        down = run(["--logs", str(logs)], tmp_path, module="mnist.jobs")
        assert down.returncode == 0, down.stderr
        assert "Slurm cannot be reached" in down.stdout + down.stderr, down.stdout + down.stderr
        assert all(re.search(rf"^{array}_{task}\s+mlp\s", down.stdout, re.M) for task in range(3)), down.stdout
    finally:
        multinode_cluster.start_controller()
    assert wait_for(array, timeout=300) == {f"{array}_{task}": "COMPLETED" for task in range(3)}

    def all_completed():  # (the controller may show them COMPLETING until their nodes have told it again)
        listing = run(["--logs", str(logs)], tmp_path, module="mnist.jobs").stdout
        return all(re.search(rf"^{array}_{task}\s+mlp\s+COMPLETED\s", listing, re.M) for task in range(3))

    wait_until("every task COMPLETED in mnist.jobs", all_completed)
    assert len((logs / "jobs.jsonl").read_text().splitlines()) == 3
    for task in range(3):
        assert len(metrics_but_timings(tmp_path / "sweep" / str(task))) == 3


def test_a_preempted_job_checkpoints_where_it_was_is_requeued_and_resumes_exactly(multinode_env, multinode_cluster,
                                                                                  tmp_path):
    """A run in the preemptible partition `low` (PreemptMode=REQUEUE, GraceTime=20) is preempted mid-epoch by a
    `high` job that needs every CPU: Slurm's SIGTERM makes it checkpoint where it is; Slurm requeues it; it resumes
    from that batch. Its metrics then equal an uninterrupted run's (here: up to the epoch after the stop). The
    course's script, preempted beside it, does the same: it waits for Slurm's kill rather than end within the
    GraceTime (a job that ends itself then is not requeued)."""
    from conftest import ROOT

    # the high job needs every CPU of both nodes: both must be back in service (an earlier test killed one)
    assert multinode_cluster.wait_idle(timeout=120) == "idle"
    data = noise_dataset(tmp_path / "data", 1024)
    common = ["model=cnn", "data.batch_size=16", "trainer.log_interval=8", "trainer.threads=1"]
    job = submitted_id(submit([*common, "trainer.epochs=1000", "resources.partition=low", "resources.mem=1G",
                               f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, data))
    script = subprocess.run(["sbatch", "--parsable", "-p", "low", "--mem=1G", f"--output={tmp_path}/script_%j.out",
                             f"--error={tmp_path}/script_%j.err", "slurm/cnn.sh", *common, "trainer.epochs=1000",
                             f"data.root={data}", f"hydra.run.dir={tmp_path / 'script_run'}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    script_job = script.stdout.strip()
    logs = {job: tmp_path / "logs" / f"cnn_{job}.out", script_job: tmp_path / f"script_{script_job}.out"}
    for log in logs.values():
        wait_until("epoch 2 in the log", lambda log=log: log.exists() and "Train Epoch: 2 " in log.read_text())
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-N2", "-c2", "--mem=1G", "-o", "/dev/null",
                           "--wrap", "sleep 2"], capture_output=True, text=True)
    assert high.returncode == 0, high.stderr
    for job_id, run_dir in ((job, tmp_path / "run"), (script_job, tmp_path / "script_run")):
        log = logs[job_id]
        # where it resumes: mid-epoch, as a rule; after a whole epoch where the signal came in its last batch or test
        resumed = wait_until("the resume", lambda log=log: re.search(
            r"^Resuming from \S+ (?:at epoch (\d+), batch \d+|after epoch (\d+))$", log.read_text(), re.M))
        mid_epoch, after_epoch = resumed.groups()
        epochs = int(mid_epoch or int(after_epoch) + 1)
        wait_until("the resumed run past the epoch it stopped in", lambda run_dir=run_dir, epochs=epochs:
                   len(metrics_but_timings(run_dir)) >= epochs)
        shown = run(["--logs", str(tmp_path / "logs"), "show", job_id], tmp_path, module="mnist.jobs").stdout
        subprocess.run(["scancel", job_id], check=True)
        text = log.read_text()
        if job_id == job:
            assert "requeued 1x (last: preempted)" in shown, shown
            assert "Checkpointed in" in text, text
        assert not mid_epoch or re.search(rf"^Stopped in epoch {mid_epoch} after batch \d+", text, re.M), text
        straight = run([*common, f"trainer.epochs={epochs}", f"data.root={tmp_path / 'data'}",
                        f"hydra.run.dir={tmp_path / f'straight_{job_id}'}"], cwd=tmp_path)
        assert straight.returncode == 0, straight.stderr
        assert metrics_but_timings(run_dir)[:epochs] == metrics_but_timings(tmp_path / f"straight_{job_id}")
