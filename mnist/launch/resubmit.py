"""`python -m mnist.jobs resubmit TARGET [overrides] [--more]`: rerun only what did not finish.

TARGET is a job id (123 or 123_4), an array id (all its tasks) or a folder holding run folders (a
sweep's `multirun/<date>/<time>`, or one run folder). Every run there that did not complete (failed,
timed out, out of memory, cancelled, node failure, preempted, or never started) goes into ONE new
job array, through the same launcher as a submission (mnist.launch.slurm), each run back into its
own run folder, where it resumes from its checkpoint with its own config (mnist.rundir.resume_config):
overrides may change where and how it runs (resources.*, launcher.*, trainer.epochs, ...), not what
it trains. `--more` doubles what ran out, per run: the memory of one killed for memory, the time of
one that timed out, within the partition's limits (`scontrol show partition`); the array asks for the
largest of its runs' requests. Runs still pending or running, or completed, are left alone. The record
links each new job to the one it reruns (`previous`), so `show` and the report follow a run.
"""
import copy
import math
import subprocess
import sys
from pathlib import Path

from mnist import rundir
from mnist.errors import UserError
from mnist.launch import outcome, record, resources

RERUN = "did not complete"


def resubmit(log_dir, target, overrides, more=False):
    """Submit the unfinished runs of TARGET as one job array; returns its id, or None (nothing to rerun, dry run)."""
    entries = record.read(log_dir)
    folders = _run_folders(entries, target, log_dir)
    latest = _latest_entries(entries)
    jobs = _jobs([latest[f] for f in folders if f in latest], log_dir)
    todo, left = [], []
    for folder in folders:
        job = jobs.get(folder)
        why = _why_not(folder, job)
        (left if why else todo).append((folder, job, why))
    if not todo:
        print(f"Nothing to rerun in {target}: " + "; ".join(f"{f} {why}" for f, _, why in left) + ".")
        return None
    configs = _configs(todo, overrides, more)
    dry = bool(configs[0].get("dry_run"))
    say = (lambda text: print(text, file=sys.stderr)) if dry else print
    say(f"{'Would rerun' if dry else 'Rerunning'} {len(todo)} of {len(folders)} runs in {target}"
        + (f" ({len(left)} left alone: " + "; ".join(f"{Path(f).name} {why}" for f, _, why in left) + ")" if left else ""))
    return _submit(todo, configs, say, dry)


def _run_folders(entries, target, log_dir):
    """The run folders TARGET names, as resolved paths."""
    target = str(target)
    if record.JOB_ID.fullmatch(target):
        found = [e["run_dir"] for e in entries if target in (e["job_id"], e["job_id"].split("_")[0])]
        if not found:
            recent = ", ".join(e["job_id"] for e in entries[-10:]) or "none"
            raise UserError(f"Job {target} was not submitted from here ({record.path(log_dir)}; recent jobs: "
                            f"{recent}). Give a job id, an array id, or a sweep folder (multirun/<date>/<time>).")
        return list(dict.fromkeys(str(Path(f).resolve()) for f in found))
    from mnist.report import find_runs

    path = Path(target)
    if not path.is_dir():
        raise UserError(f"{target} is neither a job id (like 123456 or 123456_3) nor a folder. Give a job id, an array "
                        f"id, or a sweep folder: python -m mnist.jobs resubmit multirun/<date>/<time>")
    folders = [str(f.resolve()) for f in find_runs(path)]
    if not folders:
        raise UserError(f"{target} holds no run folders (a folder with config.yaml). Give a sweep folder "
                        f"(multirun/<date>/<time>), a run folder, or a job id.")
    return folders


def _latest_entries(entries):
    latest = {}
    for entry in entries:
        latest[str(Path(entry["run_dir"]).resolve())] = entry
    return latest


def _jobs(entries, log_dir):
    known = record.states(entries)
    if known.unreachable:
        raise UserError(f"Cannot tell which runs are still going: Slurm cannot be reached ({known.unreachable}). "
                        f"Check that `squeue` answers (SLURM_CONF, the controller), then resubmit again.")
    return {str(Path(job["run_dir"]).resolve()): job for job in outcome.describe(entries, known, log_dir)}


def _why_not(folder, job):
    """Why this run is not rerun ("completed", "still RUNNING as 123_4", ...), or "" to rerun it."""
    try:
        config = rundir.read_config(folder)
        done = len(rundir.read_metrics(folder))
    except rundir.RunFolderError as e:
        return f"is damaged ({e.damaged})"
    if config is None:
        return "has no config.yaml"
    if done >= config["trainer"]["epochs"]:
        return "completed"
    if job and job["state"] in record.LIVE:
        return f"is still {job['state']} as {job['job_id']}"
    holder = rundir.holder(folder)
    if holder:
        return f"is in use (process {holder.get('pid')} on {holder.get('host')})"
    return ""


# ---------------------------------------------------------------- configs

def _configs(todo, overrides, more):
    """Each run's config: its own, with the command's where-and-how (and --more) applied, as resume_config rules."""
    from mnist.config import compose

    composed = _plain(compose(["launcher=slurm", *overrides]))
    given = rundir.given_keys(overrides)
    limits = _partition_limits() if more else {}
    configs = []
    for folder, job, _ in todo:
        saved = rundir.read_config(folder)
        merged = copy.deepcopy(saved)
        for key in given:
            rundir.put(merged, key, rundir.select(composed, key))
        if (saved.get("launcher") or {}).get("name") != "slurm":
            merged["launcher"] = composed["launcher"]
        merged["dry_run"] = composed["dry_run"]
        if more and job:
            _more(merged, job, given, limits.get(merged["resources"].get("partition"), limits.get(None, {})))
        configs.append(rundir.resume_config(folder, merged, overrides))
    _one_request(configs)
    return configs


def _plain(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _more(config, job, given, limits):
    """--more: twice the memory of a run killed for memory, twice the time of one that timed out."""
    res = config["resources"]
    if (job["memory_kill"] or job["state"] == "OUT_OF_MEMORY") and "resources.mem" not in given:
        asked = job["mem_asked"] or resources.memory_bytes(res["mem"], "M")
        wanted = min(2 * asked, limits.get("mem") or 2 * asked)
        res["mem"] = _mem_text(wanted)
    if job["state"] == "TIMEOUT" and "resources.time" not in given:
        limit = job["time_limit_s"] or resources.time_seconds(res["time"])
        res["time"] = resources.time_text(min(2 * limit, limits.get("time") or 2 * limit))


def _mem_text(n):
    mib = math.ceil(n / 2**20)
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def _one_request(configs):
    """A job array asks once for all its tasks: the largest memory of its runs (the longest time is the launcher's rule)."""
    largest = max((c["resources"]["mem"] for c in configs), key=lambda m: resources.memory_bytes(m, "M") or 0)
    for c in configs:
        c["resources"]["mem"] = largest


def _partition_limits():
    """{partition name (None: the default): {"time": s, "mem": bytes per node}} from `scontrol show partition -o`."""
    try:
        out = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    limits = {}
    for line in out.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        limit = {"time": record.duration_s(fields.get("MaxTime", "")),
                 "mem": resources.memory_bytes(fields.get("MaxMemPerNode", ""), "M")}
        limits[fields.get("PartitionName")] = limit
        if fields.get("Default") == "YES":
            limits[None] = limit
    return limits


# ---------------------------------------------------------------- submitting

def _submit(todo, configs, say, dry):
    from omegaconf import OmegaConf

    from mnist.launch import slurm

    for (folder, job, _), config in zip(todo, configs):
        was = f"was {job['job_id']}, {job['state']}" if job else "never submitted from here"
        res = config["resources"]
        say(f"  {folder}  ({was}; asks {res['mem']}, {res['time']})")
    runs = [(OmegaConf.create(c), folder) for (folder, _, _), c in zip(todo, configs)]
    # submitit submits a batch of one as a plain job: one run is one job (%x_%j logs), more are one array
    array = slurm.submit_array(runs, single=len(runs) == 1, previous=[job["job_id"] if job else "" for _, job, _ in todo])
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
