"""The advice `mnist.jobs` and `resubmit` give where features meet: packed runs, resubmissions, moved sweep
folders, kills for memory. Each test builds the record, run folders and Slurm states the code would see, then
reads what a user reads: the CAUSE, the usage line, the script `resubmit --more` would submit."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mnist import figures, rundir
from mnist.config import compose
from mnist.launch import outcome, record, resources, resubmit


def sweep_folder(root, runs, data, *overrides, pack=1, job="40", usage=None):
    """A sweep's run folders and its record, as the launcher leaves them: `runs` runs of `pack` a task."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    entries = []
    for number in range(runs):
        run_dir = root / "sweep" / str(number)
        run_dir.mkdir(parents=True)
        cfg = compose(["launcher=slurm", f"data.root={data}", f"launcher.log_dir={logs}",
                       f"launcher.runs_per_task={pack}", "trainer.epochs=2", *overrides])
        rundir.write_config(run_dir, OmegaConf.to_container(cfg, resolve=True))
        task = f"{job}_{number // pack}"
        if usage:
            rundir.record_usage(run_dir, f"{task}#0", 0, rundir.RankUsage("n1", usage["peak"], wall_s=usage["wall_s"],
                                                                          cpus=1), job_id=task, end=usage.get("end"))
        entries.append(record.Entry(task, str(run_dir), str(logs / f"mlp_{task}.out"), str(logs / f"mlp_{task}.err"),
                                    "mlp", "mlp", "2026-12-01T10:00:00", str(logs / "submitit" / task),
                                    mem=str(cfg.resources.mem), time=str(cfg.resources.time), cpus=1,
                                    pack=(number % pack, pack) if pack > 1 else None))
    record.append(logs, entries)
    return root / "sweep", logs, entries


def ended(state, elapsed_s=None, limit_s=None, mem=None, cpus=1):
    return record.JobState(state, elapsed_s=elapsed_s, limit_s=limit_s, mem=mem, cpus=cpus, nodes=1, source="sacct")


@pytest.fixture
def cluster_states(monkeypatch):
    """Slurm's answers, as given: {job id: JobState}; and no cluster to check a dry run's request against."""
    known = {}
    monkeypatch.setattr(resources, "ask_cluster", lambda dry_run=False: None)
    monkeypatch.setattr(record, "states", lambda entries: record.States(
        {e.job_id: known[e.job_id] for e in entries if e.job_id in known}))
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    return known


def one_partition(monkeypatch, **limits):
    """A cluster of one default partition with these limits (resources.Nodes' fields), and nodes that hold any
    request of these tests. Returns the list of its calls, one per asking."""
    nodes, calls = [resources.Nodes("batch", 64, 256 << 10, 0, 4, default=True, **limits)], []
    monkeypatch.setattr(resources, "ask_cluster", lambda dry_run=False: calls.append(dry_run) or nodes)
    return calls


def test_held_cpu_hours_count_a_packed_tasks_allocation_once(tmp_path, tiny_data, cluster_states):
    """2 tasks x 4 runs, each task held 1 CPU for 20 minutes: 0.667 CPU-hours held, not 2.667; each run's TIME is
    its own 5 minutes, not its task's 20."""
    _, logs, entries = sweep_folder(tmp_path, 8, tiny_data, pack=4, usage={"end": "completed", "peak": 400 << 20,
                                                                          "wall_s": 300.0})
    cluster_states.update({"40_0": ended("COMPLETED", 1200, 7200), "40_1": ended("COMPLETED", 1200, 7200)})
    jobs = outcome.describe(entries, record.States(cluster_states), logs)
    line = outcome.summary(jobs)
    assert "CPU-hours 0.000 used of 0.667 held" in line, line
    assert "TIME 5:00/5:00/5:00" in line, line
    assert {outcome.shown(job)["time"] for job in jobs} == {"5:00/5:00"}  # (the MLP's resources.time, 0:5:0)


def test_a_packed_run_out_of_time_is_told_to_double_its_own_time_not_its_tasks(tmp_path, tiny_data, cluster_states):
    _, logs, entries = sweep_folder(tmp_path, 4, tiny_data, "resources.time=0:30:00", pack=4)
    cluster_states["40_0"] = ended("TIMEOUT", 7200, 7200)
    jobs = outcome.describe(entries, record.States(cluster_states), logs)
    assert jobs[0]["cause"].startswith("its packed task's time limit 2:00:00 reached"), jobs[0]["cause"]
    assert "try resources.time=1:00:00" in jobs[0]["cause"], jobs[0]["cause"]  # it said 4:00:00, twice the task's


def test_more_keeps_a_packed_task_within_its_partitions_time_limit(tmp_path, tiny_data, cluster_states, monkeypatch,
                                                                   capsys):
    """4 runs of 30 minutes packed into one 2-hour task timed out on a partition of 200 minutes: --more doubles each
    run's time (it doubled the task's and the task summed the runs again: --time=960) and packs 3 a task."""
    sweep, logs, _ = sweep_folder(tmp_path, 4, tiny_data, "resources.time=0:30:00", pack=4)
    cluster_states["40_0"] = ended("TIMEOUT", 7200, 7200)
    asked = one_partition(monkeypatch, max_time_s=200 * 60, max_mem=8 << 30)
    resubmit.resubmit(logs, sweep, ["dry_run=true"], more=True)
    assert len(asked) == 1  # one sinfo and one scontrol for --more, the packing and the submission's checks
    script = capsys.readouterr().out
    assert "#SBATCH --time=180\n" in script and "#SBATCH --array=0-1" in script, script
    times = [resources.time_seconds(OmegaConf.create(c).resources.time) for c in _configs(logs, sweep, more=True)]
    assert times == [3600] * 4


def test_more_stops_at_the_partitions_limits_and_says_so(tmp_path, tiny_data, cluster_states, monkeypatch, capsys):
    """A 2-hour run that timed out on a partition of 3 hours: --more asks 3 hours, not 4, and says it stopped short."""
    sweep, logs, _ = sweep_folder(tmp_path, 1, tiny_data, "resources.time=2:00:00", pack=1)
    cluster_states["40_0"] = ended("TIMEOUT", 7200, 7200)
    one_partition(monkeypatch, max_time_s=180 * 60, max_mem=None)
    resubmit.resubmit(logs, sweep, ["dry_run=true"], more=True)
    out, err = capsys.readouterr()
    assert "#SBATCH --time=180\n" in out, out
    assert f"--more for {sweep / '0'}: resources.time=3:00:00, partition (the default)'s MaxTime, not the 4:00:00 " \
           f"it would ask" in err, err


def _configs(logs, sweep, more):
    entries = record.read(logs)
    folders = resubmit._run_folders(entries, sweep, logs)
    submissions = resubmit._submissions(entries, folders)
    jobs = resubmit._jobs(submissions, logs)
    todo = [(f, jobs[id(submissions[f][-1])], "") for f in folders]
    return resubmit._configs(todo, ["dry_run=true"], more, logs, {})


@pytest.mark.parametrize("peak, asked, suggested", [
    (1 << 30, 4 << 30, "8G"),  # a peak sampled before the kill is a lower bound: it said 2G, less than it had
    (None, 8 << 30, "16G"),  # no peak recorded: twice what it asked (it said 4G, even for resources=gpu's 8G)
    (698 << 20, 400 << 20, "1G"),  # a peak well over: the peak and a quarter, 873M
])
def test_after_a_kill_for_memory_the_suggestion_is_never_below_what_the_job_asked(tmp_path, tiny_data, cluster_states,
                                                                                  peak, asked, suggested):
    _, logs, entries = sweep_folder(tmp_path, 1, tiny_data, usage={"end": None, "peak": peak or 0, "wall_s": 3.0})
    cluster_states["40_0"] = ended("OUT_OF_MEMORY", 3, 300, mem=asked)
    [job] = outcome.describe(entries, record.States(cluster_states), logs)
    assert job["cause"].endswith(f"asked; try resources.mem={suggested}"), job["cause"]
    assert figures.memory_bytes(suggested) >= asked


def test_a_moved_sweep_folder_is_resubmitted_as_the_same_runs_with_more_and_its_record_here(tmp_path, tiny_data,
                                                                                            cluster_states, capsys):
    """The sweep folder was renamed after its jobs ran: resubmit finds its runs' jobs by their own usage.json, so
    --more still doubles what ran out and the new jobs link to the old; the new record goes to the logs read."""
    sweep, logs, _ = sweep_folder(tmp_path / "old", 2, tiny_data, usage={"end": None, "peak": 300 << 20, "wall_s": 3.0})
    for task in ("40_0", "40_1"):
        cluster_states[task] = ended("OUT_OF_MEMORY", 3, 300, mem=3 << 30)
    moved = tmp_path / "moved"
    sweep.rename(moved)
    here = tmp_path / "here"
    (tmp_path / "old" / "logs").rename(here)
    resubmit.resubmit(here, moved, ["dry_run=true"], more=True)
    out = capsys.readouterr()
    assert "#SBATCH --mem=6G" in out.out, out.out
    assert "(was 40_0, OUT_OF_MEMORY; asks 6G" in out.err and "never submitted from here" not in out.err, out.err
    assert f"--output={here}/" in out.out and str(tmp_path / "old" / "logs") not in out.out
    assert all(Path(c["launcher"]["log_dir"]) == here for c in _configs(here, moved, more=True))


def test_a_packed_resubmission_with_longer_runs_packs_fewer_within_maxtime(tmp_path, tiny_data, cluster_states,
                                                                           monkeypatch, capsys):
    """Following the TIMEOUT hint (resources.time=, no --more) must not leave a task over the partition's limit."""
    sweep, logs, _ = sweep_folder(tmp_path, 4, tiny_data, "resources.time=0:45:00", pack=4)
    cluster_states["40_0"] = ended("TIMEOUT", 10800, 10800)
    one_partition(monkeypatch, max_time_s=240 * 60, max_mem=None)
    resubmit.resubmit(logs, sweep, ["resources.time=1:30:00", "dry_run=true"])
    script = capsys.readouterr().out
    assert "#SBATCH --time=180\n" in script and "#SBATCH --array=0-1" in script, script  # 2 a task, not 4 (6 h)


def test_more_reads_the_job_that_trained_a_run_not_a_later_one_cancelled_before_it_started(tmp_path, tiny_data,
                                                                                         cluster_states, capsys):
    sweep, logs, [entry] = sweep_folder(tmp_path, 1, tiny_data, usage={"end": None, "peak": 300 << 20, "wall_s": 3.0})
    record.append(logs, [record.Entry("41", entry.run_dir, str(logs / "mlp_41.out"), previous=entry.job_id)])
    cluster_states.update({"40_0": ended("OUT_OF_MEMORY", 3, 300, mem=3 << 30), "41": ended("CANCELLED")})
    resubmit.resubmit(logs, sweep, ["dry_run=true"], more=True)
    out = capsys.readouterr()
    assert "#SBATCH --mem=6G" in out.out and "(was 40_0, OUT_OF_MEMORY" in out.err, out.err


def test_show_gives_each_run_of_a_packed_task_its_own_details(tmp_path, tiny_data, cluster_states, capsys):
    from mnist import jobs

    sweep, logs, _ = sweep_folder(tmp_path, 2, tiny_data, pack=2, usage={"end": "completed", "peak": 300 << 20,
                                                                         "wall_s": 3.0})
    cluster_states["40_0"] = ended("COMPLETED", 10, 600)
    jobs.show(logs, "40_0")
    shown = capsys.readouterr().out
    assert shown.count("run folder:") == 2 and f"{sweep / '0'}\n" in shown and f"{sweep / '1'}\n" in shown, shown
