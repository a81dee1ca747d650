"""Sweeps that finish sooner and ask for what they need: a lean job start, packing several runs into one
array task, and requests sized from what past runs used."""
import csv
import dataclasses
import re
import subprocess
import sys
import time

import pytest
import submitit
from conftest import imported_modules, run, write_dataset
from omegaconf import OmegaConf
from test_slurm import submitted_id, wait_for

from mnist import figures, rundir
from mnist.config import compose
from mnist.launch import history, record
from mnist.launch.job import TrainJob

NOT_FOR_TRAINING = {"torchvision", "torch._dynamo", "torch._inductor", "sympy", "PIL", "hydra", "matplotlib"}


def test_a_job_imports_torch_and_nothing_training_does_not_need(tiny_data, tmp_path):
    cfg = compose([f"data.root={tiny_data}", "trainer.epochs=1", "launcher=slurm"])
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit", python=f"{sys.executable} -X importtime")
    job = executor.submit(TrainJob(OmegaConf.to_container(cfg, resolve=True), tmp_path / "run", 0))
    assert [row["epoch"] for row in job.result()] == [1]
    imported = imported_modules(job.stderr())
    assert "torch" in imported and "mnist.train" in imported
    assert sorted(NOT_FOR_TRAINING & imported) == []


def read(path):
    return path.read_text() if path.exists() else ""


def metrics(run_dir):
    return [(r["epoch"], r["train_loss"], r["test_loss"], r["accuracy"])
            for r in csv.DictReader(open(run_dir / "metrics.csv"))]


def sweep(args, tmp_path, data, **kwargs):
    """`python -m mnist.run -m launcher=slurm ...` as a user types it, logs and runs under tmp_path."""
    return run(["-m", "launcher=slurm", f"data.root={data}", f"launcher.log_dir={tmp_path / 'logs'}",
                "resources.mem=2G", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args], cwd=tmp_path, **kwargs)


def test_a_packed_sweep_asks_for_one_task_per_n_runs_with_their_summed_time(tiny_data, tmp_path):
    script = sweep(["trainer.seed=range(5)", "launcher.runs_per_task=2", "dry_run=true"], tmp_path, tiny_data)
    assert script.returncode == 0, script.stderr
    assert "#SBATCH --array=0-2%3" in script.stdout  # 5 runs in 3 tasks
    assert "#SBATCH --time=10" in script.stdout  # two runs of the MLP's 5 minutes


def test_a_single_run_with_runs_per_task_auto_is_one_task(tiny_data, tmp_path):
    """launcher.runs_per_task=auto is for sweeps; a single run (one task, nothing to pack) takes it too."""
    script = run(["launcher=slurm", "launcher.runs_per_task=auto", f"data.root={tiny_data}", "dry_run=true",
                  f"launcher.log_dir={tmp_path / 'logs'}"], cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert "#SBATCH --time=5" in script.stdout and "--array" not in script.stdout


@pytest.mark.parametrize("value", ["0", "two", "1.5"])
def test_a_bad_runs_per_task_names_the_value_and_the_fix(tiny_data, tmp_path, value):
    result = sweep(["trainer.seed=1,2", f"launcher.runs_per_task={value}", "dry_run=true"], tmp_path, tiny_data)
    assert result.returncode == 2 and "launcher.runs_per_task=" in result.stderr, result.stderr
    assert "e.g. launcher.runs_per_task=5" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slurm
def test_packed_runs_keep_their_folders_and_a_requeued_task_skips_the_finished_one(slurm_env, tmp_path):
    """Two identical runs (they differ in log interval only) in one task; the second is preempted mid-way."""
    write_dataset(tmp_path / "data", "MNIST", n_train=4000, n_test=200)
    submitted = sweep(["trainer.log_interval=10,11", "trainer.epochs=20", "launcher.runs_per_task=2",
                       "launcher.max_requeues=2"], tmp_path, tmp_path / "data")
    job_id = submitted_id(submitted)
    log, runs = tmp_path / "logs" / f"mlp_{job_id}.out", [tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"]
    assert f"Submitted job {job_id} (mlp): 2 runs in 1 task, one after another\n" in submitted.stdout
    assert f"run folders: {tmp_path / 'sweep'}/<run>\n  log:         {log}\n" in submitted.stdout
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
        assert [a.end for a in rundir.read_usage(run_dir)][-1] == "completed"
    second = [a for a in rundir.read_usage(runs[1]) if a.task.index == 1]  # its own figures, not the task's
    assert second and all(a.cpu_s <= 1.2 * a.wall_s + 0.5 for a in second)
    listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout
    for run_dir in runs:  # one line a run, with the run's own state
        assert re.search(rf"^{job_id}\s+mlp\s+COMPLETED\s.*Epoch 20: .*{run_dir}$", listing, re.M), listing


def past_run(tmp_path, number, peak_mib, work_s, ended="completed", overrides=()):
    """A run folder and its job record as a finished job leaves them: config.yaml, usage.json, the .err."""
    run_dir, logs = tmp_path / "past" / str(number), tmp_path / "logs"
    run_dir.mkdir(parents=True)
    logs.mkdir(exist_ok=True)
    config = compose(["launcher=slurm", "trainer.epochs=1", *overrides])
    rundir.write_config(run_dir, OmegaConf.to_container(config, resolve=True))
    rundir.record_usage(run_dir, f"{number}#0", 0, rundir.RankUsage("n1", peak_mib * 2**20, wall_s=3 + work_s),
                        job_id=str(number), end=ended, task=rundir.Task(index=0, runs=1, startup_s=3))
    err = logs / f"mlp_{number}.err"
    killed = "slurmstepd: error: StepId=9.0 exceeded memory limit (9 > 1), being killed\n"
    err.write_text(killed if ended is None else "")
    record.append(logs, [record.Entry(str(number), str(run_dir), str(err)[:-3] + "out", str(err), "mlp", "mlp")])


def suggest(tmp_path, *overrides):
    result = run(["--logs", str(tmp_path / "logs"), "suggest", *overrides], tmp_path, module="mnist.jobs")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_array_parallelism_names_the_value_and_the_fix(tiny_data, tmp_path, value):
    for number in range(5):
        past_run(tmp_path, number, 400, 60)  # with a history, runs_per_task=auto reads it first
    for packing in ("launcher.runs_per_task=1", "launcher.runs_per_task=auto"):
        result = sweep(["trainer.epochs=1", "trainer.seed=1,2", f"launcher.array_parallelism={value}", packing,
                        "dry_run=true"], tmp_path, tiny_data)
        assert result.returncode == 2 and f"launcher.array_parallelism={value} must be at least 1" in result.stderr
        assert "e.g. launcher.array_parallelism=8" in result.stderr and "Traceback" not in result.stderr


def test_auto_asks_for_the_largest_peak_and_the_p95_wall_time_with_a_margin(tmp_path):
    for number, (peak, work) in enumerate([(400, 20), (410, 22), (420, 24), (430, 26), (440, 28), (1000, 60)]):
        past_run(tmp_path, number, peak, work)
    past_run(tmp_path, 9, 5000, 500, overrides=["data.batch_size=128"])  # another kind of run: not counted
    shown = suggest(tmp_path, "trainer.epochs=2")  # history of 1-epoch runs: times doubled
    assert "resources.mem=auto: 1280M (the peak of 6 past runs" in shown  # 1000M x 1.2, up to 256M steps
    assert "resources.time=auto: 0:03:00 (p95 of 6 past runs" in shown  # 2 x 60 s x 1.2 + 3 s start-up
    assert "launcher.runs_per_task=auto: 5 (about 10 minutes of work at 120 s a run" in shown
    assert "conf/ asks 3G" in shown and "conf/ asks 0:5:0" in shown

    past_run(tmp_path, 7, 600, 5, ended=None, overrides=["resources.mem=1G"])  # killed for memory with 1G
    assert "resources.mem=auto: 2G (" in suggest(tmp_path, "trainer.epochs=2")  # at least twice what it had

    few = suggest(tmp_path, "data.batch_size=128")
    assert "resources.mem=auto: 3G (conf/'s: only 1 completed past run like this (5 needed)" in few
    assert "launcher.runs_per_task=auto: 1 (fewer than 5" in few


def test_auto_packs_into_no_fewer_tasks_than_the_array_may_run_at_once(tiny_data, tmp_path):
    for number in range(5):
        past_run(tmp_path, number, 400, 60)  # 1-epoch runs of a minute: 10 to a task of 10 minutes

    def packing(*overrides):
        result = sweep(["trainer.epochs=1", "trainer.seed=range(20)", "launcher.runs_per_task=auto", "dry_run=true",
                        *overrides], tmp_path, tiny_data)
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stderr.splitlines() if line.startswith("launcher.runs_per_task=auto"))

    eight = packing("launcher.array_parallelism=8")  # 2 tasks of 10 would leave 6 of the 8 idle
    assert eight.startswith("launcher.runs_per_task=auto: 3 (the 20 runs as 7 tasks, which can all run at once "
                            "(launcher.array_parallelism=8): about 3 minutes of work each"), eight
    assert packing("launcher.array_parallelism=20") == (
        "launcher.runs_per_task=auto: 1 (the 20 runs can all run at once (launcher.array_parallelism=20))")
    assert packing("launcher.array_parallelism=2").startswith(
        "launcher.runs_per_task=auto: 10 (about 10 minutes of work at 60 s a run")
    # no size to fill
    assert "launcher.runs_per_task=auto: 10 (about 10 minutes" in suggest(tmp_path, "trainer.epochs=1")


@pytest.mark.slurm
def test_auto_packs_for_what_the_partitions_nodes_hold_at_once_when_fewer_than_the_array_may_run(
        slurm_env, tiny_data, tmp_path):
    """The session cluster's node has 4 CPUs: 1-CPU tasks run 4 at a time, whatever launcher.array_parallelism=8
    allows, so 20 one-minute runs pack 5 a task (4 tasks, one wave), not 3 (7 tasks, two waves)."""
    for number in range(5):
        past_run(tmp_path, number, 400, 60)
    result = sweep(["trainer.epochs=1", "trainer.seed=range(20)", "launcher.runs_per_task=auto", "dry_run=true",
                    "launcher.array_parallelism=8"], tmp_path, tiny_data)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^launcher.runs_per_task=auto: 5 \(the 20 runs as 4 tasks, which can all run at once "
                     r"\(partition \w+'s nodes hold 4 such tasks at once\)", result.stderr, re.M), result.stderr
    assert "#SBATCH --array=0-3%4" in result.stdout, result.stdout


def test_auto_asks_sacct_only_about_past_runs_that_did_not_record_a_completed_end(tmp_path, monkeypatch):
    for number in range(5):
        past_run(tmp_path, number, 400, 20)
    past_run(tmp_path, 7, 600, 5, ended=None)  # its usage.json has no end: how its job ended is Slurm's to say
    asked = []
    monkeypatch.setattr(record, "accounting", lambda job_ids: asked.append(sorted(job_ids)) or {})
    config = OmegaConf.to_container(compose(["launcher=slurm", "trainer.epochs=1"]), resolve=True)
    pasts = history.history(tmp_path / "logs", config)
    assert asked == [["7"]]
    assert [p.ended for p in pasts] == ["completed"] * 5 + ["memory"]  # (its .err says so)

    (tmp_path / "past" / "7" / "usage.json").unlink()  # now every run it can read completed: no sacct call
    asked.clear()
    assert len(history.history(tmp_path / "logs", config)) == 5 and asked == [[]]


def test_auto_judges_a_resubmitted_run_by_its_latest_job(tmp_path, monkeypatch):
    """Job 30 timed out; its run was resubmitted as 31, which was killed for memory: the run ended for memory."""
    past_run(tmp_path, 30, 600, 5, ended=None)
    err = tmp_path / "logs" / "mlp_30.err"
    err.write_text("slurmstepd: error: *** JOB 30 ON n1 CANCELLED AT 2026-11-30T10:00:00 DUE TO TIME LIMIT ***\n")
    (tmp_path / "logs" / "mlp_31.err").write_text("slurmstepd: error: StepId=31.0 exceeded memory limit (9 > 1), "
                                                  "being killed\n")
    rundir.record_usage(tmp_path / "past" / "30", "31#0", 0, rundir.RankUsage("n1", 700 << 20, wall_s=4.0),
                        job_id="31")  # (it trained until it was killed)
    [first] = record.read(tmp_path / "logs")
    again = dataclasses.replace(first, job_id="31", stderr=str(tmp_path / "logs" / "mlp_31.err"), previous="30")
    record.append(tmp_path / "logs", [again])
    monkeypatch.setattr(record, "accounting", lambda job_ids: {})
    config = OmegaConf.to_container(compose(["launcher=slurm", "trainer.epochs=1"]), resolve=True)
    assert [p.ended for p in history.history(tmp_path / "logs", config)] == ["memory"]


def chosen(output, key):
    """The value auto chose for `key` (resources.mem: megabytes, written 768M or 1G; resources.time: minutes) and
    from how many runs."""
    found = re.search(rf"^{key}=auto: (?:0:)?(\d+)(M|G|:00) \((?:the peak|p95) of (\d+) past runs", output, re.M)
    assert found, output
    return int(found.group(1)) * (1024 if found.group(2) == "G" else 1), int(found.group(3))


@pytest.mark.slurm
def test_after_five_runs_auto_asks_for_what_they_used_and_a_run_killed_for_memory_raises_it(slurm_env, tiny_data,
                                                                                              tmp_path):
    wide = "model.hidden=[16384]"  # an MLP that needs ~0.2G more than the default one
    first = [submitted_id(sweep(["trainer.seed=range(5)", "trainer.epochs=1", "launcher.runs_per_task=5", *model,
                                 f"hydra.sweep.dir={tmp_path / name}"], tmp_path, tiny_data))
             for name, model in (("default", []), ("wide", [wide]))]
    for job in first:
        assert wait_for(job) == {job: "COMPLETED"}

    auto = run(["launcher=slurm", "resources=auto", f"data.root={tiny_data}", "trainer.epochs=1",
                f"launcher.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'auto'}"], cwd=tmp_path)
    (mem, runs), (minutes, _) = chosen(auto.stdout, "resources.mem"), chosen(auto.stdout, "resources.time")
    assert runs == 5 and mem < 3 * 1024 and minutes < 5 and "conf/ asks 3G" in auto.stdout
    job = submitted_id(auto)
    assert wait_for(job) == {job: "COMPLETED"}
    asked = re.search(r"^  mem: (\S+)$", (tmp_path / "auto" / "config.yaml").read_text(), re.M).group(1)
    assert figures.memory_bytes(asked, "M") == mem << 20, asked

    wide_mem, _ = chosen(suggest(tmp_path, wide, "trainer.epochs=1"), "resources.mem")
    peak = max(a.node_peak for d in (tmp_path / "wide").glob("[0-4]") for a in rundir.read_usage(d))
    killed = submitted_id(run(["launcher=slurm", wide, f"data.root={tiny_data}", "trainer.epochs=1000",
                               f"resources.mem={(peak >> 20) - 50}M", f"launcher.log_dir={tmp_path / 'logs'}",
                               f"hydra.run.dir={tmp_path / 'killed'}"], cwd=tmp_path))
    assert wait_for(killed) in ({killed: "FAILED"}, {killed: "OUT_OF_MEMORY"})
    raised, _ = chosen(suggest(tmp_path, wide, "trainer.epochs=1"), "resources.mem")
    assert raised >= 2 * ((peak >> 20) - 50) > wide_mem
