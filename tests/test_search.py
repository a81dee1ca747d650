"""search=optuna: a -m command line as a search space, trained by workers that never wait for each other; here
(processes) and on a real Slurm (one job array), with pruning, requeues, cancels and resubmits."""
import csv
import json
import re
import subprocess
import time

import pytest
from conftest import run
from test_slurm import noise_dataset, submitted_id, wait_for, wait_for_text

SPACE = ["-m", "search=optuna", "optimizer.lr=tag(log, interval(0.0001, 3))"]
RUN_FILES = {"config.yaml", "metrics.csv", "checkpoint.pt", "usage.json", "train.log", "trial.json"}


def trials(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/trial.json"), key=lambda p: int(p.parent.name))]


def wait_for_tasks(array, tasks):
    """The states of the array's tasks, once sacct lists each (it may first show the array as one line)."""
    for _ in range(60):
        states = wait_for(array, timeout=300)
        if set(states) == {f"{array}_{task}" for task in range(tasks)}:
            return set(states.values())
        time.sleep(2)
    raise AssertionError(f"sacct lists no tasks of {array}: {states}")


def metrics_but_timings(run_dir):
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]


def test_a_seeded_search_here_proposes_the_same_trials_every_time_and_prunes_the_trials_behind(tiny_data, tmp_path):
    """One worker, search.seed=3: the same eight learning rates in the same order on every run. The median pruner
    ends each trial behind the completed trials' median after an epoch (search.prune_after=2: once two have completed):
    PRUNED in the study and its folder."""
    found = []
    for name in ("first", "second"):
        result = run([*SPACE, "search.n_trials=8", "search.seed=3", "trainer.epochs=3", f"data.root={tiny_data}",
                      f"hydra.sweep.dir={tmp_path / name}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        found.append(trials(tmp_path / name))
    first, second = found
    assert [t["params"] for t in first] == [t["params"] for t in second] and len(first) == 8
    assert len({t["params"]["optimizer.lr"] for t in first}) == 8
    pruned = [t for t in first if t["state"] == "PRUNED"]
    assert pruned and all(t["state"] == "COMPLETE" for t in first[:2]), first  # (2 trials before it compares)
    for trial in first:
        folder = tmp_path / "first" / str(trial["number"])
        assert RUN_FILES <= {p.name for p in folder.iterdir()}, folder
        assert len(metrics_but_timings(folder)) == (trial["epochs"] if trial in pruned else 3) == trial["epochs"]
    assert all(t["epochs"] < 3 for t in pruned)
    assert f"Trial {pruned[0]['number']} pruned after epoch {pruned[0]['epochs']}" in result.stdout


@pytest.mark.parametrize("space, phrase", [
    (["optimizer.lr=interval(3, 1)"], "optimizer.lr=interval(3, 1)"),
    (["optimizer.lrr=interval(0.1, 1)"], "optimizer.lrr"),
    (["resources.mem=choice(1G,2G)"], "resources.mem"),
    ([], "search=optuna needs at least one parameter to search"),
    (["optimizer.lr=interval(0.1, 1)", "resources.tasks_per_node=2"], "not data-parallel"),
    (["optimizer.lr=interval(0.1, 1)", "resources=auto"], "resources.mem=auto sizes one run from past runs"),
    (["optimizer.lr=interval(0.1, 1)", "launcher.runs_per_task=4"], "Leave launcher.runs_per_task at 1"),
])
def test_a_bad_space_is_refused_in_one_paragraph_before_anything_is_created(tiny_data, tmp_path, space, phrase):
    result = run(["-m", "search=optuna", *space, f"data.root={tiny_data}", f"hydra.sweep.dir={tmp_path / 'search'}",
                  "launcher=slurm", f"launcher.log_dir={tmp_path / 'logs'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message and phrase in message, message
    assert not (tmp_path / "search").exists() and not (tmp_path / "logs").exists()


def test_a_search_without_m_is_refused(tiny_data, tmp_path):
    result = run(["search=optuna", f"data.root={tiny_data}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2 and "-m" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("models, minutes", [("choice(mlp,cnn)", 15), ("mlp", 5)])
def test_workers_of_a_search_over_models_ask_for_the_longest_time_limit_of_them(tiny_data, tmp_path, models, minutes):
    """conf/resources/cpu.yaml gives the CNN 15 minutes and the MLP 5: a worker may train either."""
    result = run(["-m", "search=optuna", f"model={models}", "optimizer.lr=interval(0.1, 1)", "launcher=slurm",
                  "dry_run=true", f"data.root={tiny_data}", f"hydra.sweep.dir={tmp_path / 'search'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"#SBATCH --time={minutes}\n" in result.stdout, result.stdout


@pytest.mark.slurm
def test_on_slurm_one_array_of_workers_trains_every_trial_once_and_the_same_command_continues_the_study(
        slurm_env, tiny_data, tmp_path):
    """It returns at once with ONE array of search.workers tasks; each worker asks the study for trial after trial;
    every trial gets a folder of its own, none is trained twice. The same command with more trials continues the
    study: it trains only the new ones."""
    command = [*SPACE, "search.workers=2", "trainer.epochs=2", f"data.root={tiny_data}", "launcher=slurm",
               f"hydra.sweep.dir={tmp_path / 'search'}", f"launcher.log_dir={tmp_path / 'logs'}", "resources.mem=1G"]
    result = run([*command, "search.n_trials=5"], cwd=tmp_path)
    array = submitted_id(result)
    assert "(search): 2 workers" in result.stdout, result.stdout
    assert wait_for_tasks(array, 2) == {"COMPLETED"}
    started = re.findall(r"^Trial (\d+)( \(resuming\))?: ", "".join(
        p.read_text() for p in (tmp_path / "logs").glob(f"search_{array}_*.out")), re.M)
    assert sorted(int(n) for n, _ in started) == [0, 1, 2, 3, 4] and not any(r for _, r in started), started
    found = trials(tmp_path / "search")
    assert [t["number"] for t in found] == [0, 1, 2, 3, 4]
    assert {t["worker"] for t in found} <= {f"{array}_0", f"{array}_1"}
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in found)
    for trial in found:
        assert RUN_FILES <= {p.name for p in (tmp_path / "search" / str(trial["number"])).iterdir()}
    listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout
    assert re.search(rf"^{array}_0\s+search\s+COMPLETED\s", listing, re.M), listing
    assert re.search(rf"^search {tmp_path / 'search'}: \d done(, \d pruned)?, 0 running of 5 trials; best accuracy ",
                     listing, re.M), listing

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "search").glob("*/checkpoint.pt")}
    again = submitted_id(run([*command, "search.n_trials=7"], cwd=tmp_path))
    assert wait_for_tasks(again, 2) == {"COMPLETED"}
    assert [t["number"] for t in trials(tmp_path / "search")] == list(range(7))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the first five untouched
    started = re.findall(r"^Trial (\d+)(?: \(resuming\))?: ", "".join(p.read_text() for p in (tmp_path / "logs").glob(
        f"search_{again}_*.out")), re.M)
    assert sorted(started) == ["5", "6"], started


@pytest.mark.slurm
def test_a_worker_stopped_at_its_limit_then_cancelled_leaves_its_trial_to_finish_exactly(slurm_env, tmp_path):
    """Near its time limit (USR2) a worker checkpoints its trial mid-epoch and is requeued: its new attempt finishes
    that trial first. Cancelled in the trial, it leaves the trial resumable: `mnist.jobs resubmit` sends a worker
    that finishes it, then the rest. The trial's metrics equal an uninterrupted run's."""
    data = noise_dataset(tmp_path / "data", 4096)
    common = ["data.batch_size=16", "trainer.log_interval=16", "trainer.epochs=4", "trainer.threads=1",
              f"data.root={data}"]
    array = submitted_id(run([*SPACE, "search.n_trials=2", "search.pruner=none", *common, "launcher=slurm",
                              f"hydra.sweep.dir={tmp_path / 'search'}", f"launcher.log_dir={tmp_path / 'logs'}",
                              "resources.mem=1G", "+resources.extra={hold: true}"], cwd=tmp_path))
    log = tmp_path / "logs" / f"search_{array}.out"
    subprocess.run(["scontrol", "release", array], check=True)
    wait_for_text(log, "Train Epoch: 2 ", timeout=300)
    subprocess.run(["scancel", "--signal=USR2", array], check=True)  # as Slurm does before the time limit
    wait_for_text(log, "Trial 0 (resuming)", timeout=300)  # (with two epochs or more of trial 0 still to train)
    subprocess.run(["scancel", array], check=True)
    assert wait_for(array) == {array: "CANCELLED"}
    assert trials(tmp_path / "search")[0]["state"] == "RUNNING"
    for _ in range(120):  # (squeue shows it COMPLETING until Slurm's kill after its KillWait)
        if not subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(1)

    again = run(["--logs", str(tmp_path / "logs"), "resubmit", str(tmp_path / "search")], tmp_path,
                module="mnist.jobs")
    assert "0 done, 0 running, 1 interrupted of 2 trials" in again.stdout, again.stdout + again.stderr
    job = submitted_id(again)
    subprocess.run(["scontrol", "release", job], check=True)  # (held too: the search's command said so)
    assert wait_for(job) == {job: "COMPLETED"}
    assert [t["state"] for t in trials(tmp_path / "search")] == ["COMPLETE", "COMPLETE"]
    trial_log = (tmp_path / "search" / "0" / "train.log").read_text()
    assert trial_log.count("Resuming from") == 2, trial_log
    assert re.search(r"^Stopped in epoch \d after batch \d+; checkpoint written$", trial_log, re.M), trial_log
    lr = trials(tmp_path / "search")[0]["params"]["optimizer.lr"]
    straight = run([*common, f"optimizer.lr={lr!r}", f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert metrics_but_timings(tmp_path / "search" / "0") == metrics_but_timings(tmp_path / "straight")
    listing = run(["--logs", str(tmp_path / "logs")], tmp_path, module="mnist.jobs").stdout
    assert f"search {tmp_path / 'search'}: 2 done, 0 running of 2 trials" in listing, listing
    shown = run(["--logs", str(tmp_path / "logs"), "show", job], tmp_path, module="mnist.jobs").stdout
    assert f"{array} CANCELLED -> {job} COMPLETED  (of search)" in shown, shown  # this worker's line, no sibling's
    assert "trials:      0 COMPLETE after 4 epochs; 1 COMPLETE after 4 epochs" in shown, shown
    shown = run(["--logs", str(tmp_path / "logs"), "show", array], tmp_path, module="mnist.jobs").stdout
    assert f"trials:      0 COMPLETE after 4 epochs (finished by {job})\n" in shown, shown


def test_a_trial_whose_values_are_refused_fails_alone_and_the_search_goes_on(tiny_data, tmp_path):
    """fp16 needs a GPU: those trials are FAIL, with the reason in their trial.json; the others train."""
    result = run([*SPACE[:2], "trainer.precision=choice(fp32,fp16)", "search.sampler=grid", "search.n_trials=2",
                  "trainer.epochs=1", f"data.root={tiny_data}", f"hydra.sweep.dir={tmp_path / 'search'}"],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = {t["params"]["trainer.precision"]: t for t in trials(tmp_path / "search")}
    assert found["fp32"]["state"] == "COMPLETE" and found["fp16"]["state"] == "FAIL", found
    assert "trainer.precision=fp16" in found["fp16"]["error"], found["fp16"]


@pytest.mark.slurm
def test_a_search_refused_at_submit_leaves_nothing_and_a_warning_between_trials_requeues_its_worker(
        slurm_env, tiny_data, tmp_path):
    """More memory than the node has: refused before the search folder is written, so the fixed command starts
    the search. Its worker, warned of its time limit (USR2) among many short trials, is requeued (at once, or
    before its next trial) and the study ends with every trial trained once."""
    command = [*SPACE, "search.n_trials=12", "search.pruner=none", "trainer.epochs=1", f"data.root={tiny_data}",
               "launcher=slurm", f"hydra.sweep.dir={tmp_path / 'search'}", f"launcher.log_dir={tmp_path / 'logs'}"]
    refused = run([*command, "resources.mem=100G"], cwd=tmp_path)
    assert refused.returncode == 2 and "100G of memory" in refused.stderr, refused.stderr
    assert not (tmp_path / "search").exists()
    job = submitted_id(run([*command, "resources.mem=1G", "+resources.extra={hold: true}"], cwd=tmp_path))
    log = tmp_path / "logs" / f"search_{job}.out"
    subprocess.run(["scontrol", "release", job], check=True)
    wait_for_text(log, "Trial 2 done", timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert wait_for(job, timeout=300) == {job: "COMPLETED"}
    text = log.read_text()
    assert "asking Slurm to requeue" in text, text
    found = trials(tmp_path / "search")
    assert len(found) == 12 and all(t["state"] == "COMPLETE" for t in found), found
    started = re.findall(r"^Trial (\d+): ", text, re.M)
    assert sorted(map(int, started)) == list(range(12)), started  # each begun once (a resumed one says so)
