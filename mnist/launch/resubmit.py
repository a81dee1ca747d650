"""`python -m mnist.jobs resubmit TARGET [overrides] [--more]`: rerun only what did not finish.

TARGET is a job id (123 or 123_4), an array id (all its tasks) or a folder holding run folders (a
sweep's `multirun/<date>/<time>`, or one run folder). Every run there that did not complete (failed,
timed out, out of memory, cancelled, node failure, preempted, or never started) goes into ONE new
job array, through the same launcher as a submission (mnist.launch.slurm), each run back into its
own run folder, where it resumes from its checkpoint with its own config (mnist.rundir.resume_config):
overrides may change where and how it runs (resources.*, launcher.*, trainer.epochs, ...), not what
it trains. `--more` asks for more of what ran out, per run: for one killed for memory what its cause
says (mnist.launch.outcome.memory_after_kill), for one that timed out twice its own time limit, within
the partition's limits (`scontrol show partition`); the array asks for the largest of its runs'
requests, and a packed array packs fewer runs a task where their summed time would be over the
partition's MaxTime. Runs still queued, running or waiting in a running packed task (any of their
jobs), or completed, are left alone. A folder moved since its jobs ran is found by the jobs its runs'
own records name. The new jobs are recorded where the old ones were read (--logs), and the record
links each to the one it reruns (`previous`), so `show` and the report follow a run.
"""
import copy
import dataclasses
import sys
from pathlib import Path

from mnist import figures, rundir
from mnist.errors import UserError
from mnist.launch import gateway, outcome, record, resources


def resubmit(log_dir, target, overrides, more=False) -> str | None:
    """Submit the unfinished runs of TARGET as one job array; returns its id, or None (nothing to rerun, dry run)."""
    entries = record.read(log_dir)
    from mnist.search import study

    folders = [target] if study.is_search(target) else _run_folders(entries, target, log_dir)
    if study.is_search(folders[0]):  # a search folder, or a job id of one of its workers
        from mnist.search.sweep import resubmit_search

        return resubmit_search(folders[0], log_dir, overrides, more)
    submissions = _submissions(entries, folders)
    jobs = _jobs(submissions, log_dir)
    todo, left = [], []
    for folder in folders:
        mine = [jobs[id(e)] for e in submissions.get(folder, [])]
        why = _why_not(folder, mine)
        (left if why else todo).append((folder, outcome.trained_by(mine) if mine else None, why))
    if not todo:
        print(f"Nothing to rerun in {target}: " + "; ".join(f"{f} {why}" for f, _, why in left) + ".")
        return None
    asked = {}  # what the cluster says, asked once for --more, the packing and the submission's checks
    configs = _configs(todo, overrides, more, log_dir, asked)
    dry = bool(configs[0].get("dry_run"))
    say = (lambda text: print(text, file=sys.stderr)) if dry else print
    say(f"{'Would rerun' if dry else 'Rerunning'} {len(todo)} of {len(folders)} runs in {target}"
        + (f" ({len(left)} left alone: " + "; ".join(f"{Path(f).name} {why}" for f, _, why in left) + ")"
           if left else ""))
    return _submit(todo, configs, say, asked)


def _run_folders(entries, target, log_dir):
    """The run folders TARGET names, as resolved paths."""
    target = str(target)
    if record.JOB_ID.fullmatch(target):
        found = [e.run_dir for e in entries if target in (e.job_id, e.job_id.split("_")[0])]
        if not found:
            recent = ", ".join(e.job_id for e in entries[-10:]) or "none"
            raise UserError(f"Job {target} was not submitted from here ({record.path(log_dir)}; recent jobs: "
                            f"{recent}). Give a job id, an array id, or a sweep folder (multirun/<date>/<time>).")
        return list(dict.fromkeys(str(Path(f).resolve()) for f in found))
    path = Path(target)
    if not path.is_dir():
        raise UserError(f"{target} is neither a job id (like 123456 or 123456_3) nor a folder. Give a job id, an array "
                        f"id, or a sweep folder: python -m mnist.jobs resubmit multirun/<date>/<time>")
    from mnist.search import study

    if study.is_search(path.resolve().parent):
        raise UserError(f"{target} is a trial of the search {path.resolve().parent}: resubmit the search, whose "
                        f"workers finish its interrupted trials: python -m mnist.jobs resubmit {path.resolve().parent}")
    # a search's trials are the search's to rerun (a pruned one is ended, not unfinished)
    folders = [str(f.resolve()) for f in rundir.find_runs(path) if not study.is_search(f.resolve().parent)]
    if not folders:
        raise UserError(f"{target} holds no run folders (a folder with config.yaml). Give a sweep folder "
                        f"(multirun/<date>/<time>), a run folder, or a job id.")
    return folders


def _submissions(entries, folders):
    """{folder: its record entries, oldest first}. A folder moved since (a sweep folder renamed or copied) is found
    by the jobs that trained in it, as its own usage.json and environment.json name them."""
    runs = record.by_run(entries)
    found = {}
    for folder in folders:
        if folder in runs:
            found[folder] = runs[folder]
            continue
        ids = rundir.job_ids(folder)
        theirs = [e for e in entries if e.job_id in ids]
        same_name = [e for e in theirs if Path(e.run_dir).name == Path(folder).name]  # (a packed task's other runs)
        moved = [dataclasses.replace(e, run_dir=folder) for e in same_name or theirs]
        if moved:
            found[folder] = moved
    return found


def _jobs(submissions, log_dir):
    """{id(entry): its job, described} for every submission of the folders: one squeue and one sacct call."""
    entries = [e for folder_entries in submissions.values() for e in folder_entries]
    known = record.states(entries)
    if known.unreachable:
        raise UserError(gateway.unreachable(known.unreachable, "which runs are still going cannot be told"))
    return {id(e): job for e, job in zip(entries, outcome.describe(entries, known, log_dir))}


def _why_not(folder, jobs):
    """Why this run is not rerun ("completed", "still RUNNING as 123_4", ...), or "" to rerun it. `jobs`: every
    job that was submitted for it; one still queued, waiting its turn in a packed task or running leaves it alone."""
    try:
        config = rundir.read_config(folder)
        done = len(rundir.read_metrics(folder))
    except rundir.RunFolderError as e:
        return f"is damaged ({e.damaged})"
    if config is None:
        return "has no config.yaml"
    if rundir.all_done(done, config["trainer"]["epochs"]):
        return "completed"
    going = [job for job in jobs if job["state"] in outcome.GOING]
    if going:
        return f"is still {going[-1]['state']} as {going[-1]['job_id']}"
    holder = rundir.holder(folder)
    if holder:
        return f"is in use (process {holder.get('pid')} on {holder.get('host')})"
    return ""


# ---------------------------------------------------------------- configs

def _configs(todo, overrides, more, log_dir, asked):
    """Each run's config: its own, with the command's where-and-how (and --more) applied, as resume_config rules.
    The new jobs are recorded where the old ones were read (log_dir), wherever the runs' configs say."""
    from mnist.config import compose

    composed = _plain(compose(["launcher=slurm", *overrides]))
    given = rundir.given_keys(overrides)
    asked["cluster"] = resources.ask_cluster(composed["dry_run"])
    limits = resources.limits_by_partition(asked["cluster"])  # (a packed task must fit, whatever --more asks)
    configs = []
    for folder, job, _ in todo:
        saved = rundir.read_config(folder)
        merged = copy.deepcopy(saved)
        for key in given:
            rundir.put(merged, key, rundir.select(composed, key))
        if (saved.get("launcher") or {}).get("name") != "slurm":
            merged["launcher"] = composed["launcher"]
        merged["dry_run"] = composed["dry_run"]
        if "launcher.log_dir" not in given:
            merged["launcher"]["log_dir"] = str(log_dir)
        if more and job:
            for short in more_for(merged, job, given, limits_of(limits, merged)):
                print(f"--more for {folder}: {short}", file=sys.stderr)
        configs.append(rundir.resume_config(folder, merged, overrides))
    _one_request(configs)
    _fit_packing(configs, limits_of(limits, configs[0]).get("time"))
    return configs


def limits_of(limits, config) -> dict:
    return limits.get(config["resources"].get("partition"), limits.get(None, {}))


def _fit_packing(configs, max_time_s):
    """A packed task asks for the sum of its runs' times: pack fewer runs a task where that sum would be over the
    partition's MaxTime (--more may have doubled them)."""
    per_task = configs[0]["launcher"].get("runs_per_task", 1)
    packing = min(per_task, len(configs)) if isinstance(per_task, int) else 1
    longest = max(resources.time_seconds(c["resources"]["time"]) for c in configs)
    fitting = resources.runs_within(packing, longest, max_time_s)
    if fitting < packing:
        for c in configs:
            c["launcher"]["runs_per_task"] = fitting


def _plain(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def more_for(config, job, given, limits) -> list[str]:
    """--more: for a run killed for memory, what its cause says to ask (twice its memory, or more for a larger
    peak); for one that timed out, twice its own time limit (not its packed task's). Within the partition's limits;
    returns what had to stop short of what it wanted, in words."""
    res, short = config["resources"], []
    partition = res.get("partition") or "(the default)"
    if (job["memory_kill"] or job["state"] == "OUT_OF_MEMORY") and "resources.mem" not in given:
        asked = job["mem_asked"] or figures.memory_bytes(res["mem"], "M")
        wanted = outcome.memory_after_kill(job["mem_peak"], asked)
        cap = limits.get("mem")
        res["mem"] = figures.memory_text(cap, at_most=True) if cap and wanted > cap else figures.memory_text(wanted)
        if cap and wanted > cap:
            short.append(f"resources.mem={res['mem']}, partition {partition}'s MaxMemPerNode, not the "
                         f"{figures.memory_text(wanted)} it would ask")
    if job["state"] == "TIMEOUT" and "resources.time" not in given:
        own = resources.time_seconds(res["time"])  # the run's own limit (a packed task's is the sum of its runs')
        cap = limits.get("time")
        res["time"] = figures.limit_text(min(2 * own, cap) if cap else 2 * own)
        if cap and 2 * own > cap:
            short.append(f"resources.time={res['time']}, partition {partition}'s MaxTime, not the "
                         f"{figures.limit_text(2 * own)} it would ask")
    return short


def _one_request(configs):
    """A job array asks once for all its tasks: the largest memory of its runs (the longest time is the
    launcher's rule)."""
    largest = max((c["resources"]["mem"] for c in configs), key=lambda m: figures.memory_bytes(m, "M") or 0)
    for c in configs:
        c["resources"]["mem"] = largest


# ---------------------------------------------------------------- submitting

def _submit(todo, configs, say, asked):
    from omegaconf import OmegaConf

    from mnist.launch import slurm

    for (folder, job, _), config in zip(todo, configs):
        was = f"was {job['job_id']}, {job['state']}" if job else "never submitted from here"
        res = config["resources"]
        say(f"  {folder}  ({was}; asks {res['mem']}, {res['time']})")
    runs = [(OmegaConf.create(c), folder) for (folder, _, _), c in zip(todo, configs)]
    # submitit submits a batch of one as a plain job: one run is one job (%x_%j logs), more are one array
    previous = [job["job_id"] if job else "" for _, job, _ in todo]
    array = slurm.submit_array(runs, single=len(runs) == 1, previous=previous, asked=asked)
    if array:
        per_task = configs[0]["launcher"].get("runs_per_task", 1)
        if len(runs) == 1:
            what = f"job {array}"
        elif isinstance(per_task, int) and per_task > 1:  # packed again, as the runs were (launcher.runs_per_task)
            what = f"job {array}: the folders above in their order, {per_task} a task"
        else:
            what = f"job array {array}: task i reruns the i-th folder above"
        print(f"Submitted {what}, each resuming from its checkpoint.\n  watch with:  python -m mnist.jobs --watch")
    return array
