"""Why each submitted job ended as it did, and what it used: the job record's Entry, Slurm's state
(mnist.launch.record), the run's own Attempts (mnist.rundir.read_usage) and the job's logs, put together.

`describe(entries, known)` gives one dict per entry with:

- state, reason (why it waits), requeues, node, exit code. A packed run has its own state (WAITING until
  its running task reaches it); without accounting, the state is read from the .err's last attempt;
- the figures, like seff's: time used and limit, queue wait, CPUs, CPU seconds and CPU efficiency
  (CPU seconds / (elapsed x CPUs)), peak memory (per node) and memory asked, GPU peak and total.
  The run's usage.json comes first (Slurm samples memory every 30 s by default, and a short job has
  no MaxRSS); accounting fills in what the run could not write; the largest peak seen wins. A packed
  run's time and limit are its own; the CPU time held is the allocation's, counted once (summary);
- cause: one line saying why an unsuccessful job ended, and fix: the command that fixes it.

`trained_by` picks, of a run folder's jobs, the one to show for it; GOING are the states not yet ended.

Reads only small files (JSON, the ends of the logs); imports no torch.
"""
import datetime
import functools
import math
import re
import statistics
from dataclasses import asdict
from pathlib import Path

from mnist import figures, rundir
from mnist.launch import record, resources

TAIL_BYTES = 16384  # of an .err: a traceback's end
OUT_TAIL_BYTES = 4096  # of a log: its last lines
MEMORY_KILL = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)")
OOM_EVENT = re.compile(r"oom[-_ ]kill", re.IGNORECASE)
STEPD_END = re.compile(
    r"\*\*\* (?:JOB|STEP) \S+ (?:ON \S+ )?CANCELLED AT \S+"
    r"(?: DUE TO (TIME LIMIT|PREEMPTION|NODE FAILURE|JOB REQUEUE))?")
ENDED_BY = {None: "CANCELLED", "TIME LIMIT": "TIMEOUT", "PREEMPTION": "PREEMPTED", "NODE FAILURE": "NODE_FAIL",
            "JOB REQUEUE": "REQUEUED"}
EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure)|[A-Za-z_][\w.]*\.\w+): .*")
STOPPED_LINE = re.compile(r"Stopped in epoch (\d+) after batch (\d+)")
# not ended: a job Slurm has not ended, or a packed run its running task has not reached yet
GOING = record.LIVE | {"WAITING"}
WAITING = {  # squeue's reasons, in a user's words
    "Resources": "waiting for free CPUs, memory or GPUs",
    "Priority": "other jobs go first",
    "JobArrayTaskLimit": "the array runs only launcher.array_parallelism tasks at once",
    "Dependency": "waiting for another job",
    "BeginTime": "held until its start time",
    "JobHeldUser": "held (scontrol release JOB)",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "the nodes it needs are not available",
    "PartitionTimeLimit": "its time limit is over the partition's: it will never start",
    "QOSMaxJobsPerUserLimit": "you have as many jobs running as your QOS allows",
    "AssocMaxJobsLimit": "your account has as many jobs running as it may",
}


def describe(entries, known, log_dir="logs") -> list[dict]:
    """One dict per entry (see the module's doc), in the entries' order."""
    usage = {}
    jobs = []
    for entry in entries:
        if entry.run_dir not in usage:
            usage[entry.run_dir] = rundir.read_usage(entry.run_dir)
        attempts = [a for a in usage[entry.run_dir] if a.job_id == entry.job_id]
        jobs.append(_job(entry, known, attempts, log_dir))
    return jobs


def _job(entry, known, attempts, log_dir):
    slurm = known.by_job.get(entry.job_id)
    out_tail = tail(entry.stdout, OUT_TAIL_BYTES)
    job = {**asdict(entry), "slurm": slurm, "attempts": attempts, "out_tail": out_tail,
           "last_line": _last_line(out_tail),
           "node": (slurm.node if slurm else "") or _hosts(attempts), "exit_code": slurm.exit_code if slurm else "",
           "reason": slurm.reason if slurm else "", "log_dir": str(log_dir)}
    state = slurm.state if slurm else ""
    ended = known.unreachable or state not in record.LIVE | {"COMPLETED"}
    err_tail = tail(entry.stderr) if ended and entry.stderr else ""
    job["memory_kill"] = _memory_kill(err_tail)
    job["state"] = "?" if known.unreachable else (
        state if slurm and slurm.source != "result" else _state_from_run(entry, state, attempts, err_tail))
    if entry.pack:  # one of a packed task's runs: its own state and last line, not the task's
        job["state"] = packed_run_state(entry.run_dir, job["state"], attempts)
        job["last_line"] = _last_line(tail(str(Path(entry.run_dir) / rundir.LOG), OUT_TAIL_BYTES))
    job["requeues"] = (slurm.restarts if slurm and slurm.restarts is not None
                       else max((a.restart for a in attempts), default=0))
    job["requeued_because"] = requeued_because(slurm)
    job.update(measured(slurm, attempts, job["memory_kill"], job))
    job["cause"], job["fix"] = cause(job, err_tail)
    return job


def trained_by(jobs) -> dict:
    """Of the jobs submitted for one run folder (described, oldest first), the one to show for it: the latest
    that is still going or that trained in it (its usage.json has its attempts), else the latest. A later job
    that ended without training there (it found nothing left to do, or was cancelled before it started) does
    not hide the one that trained it."""
    return next((job for job in reversed(jobs) if job["state"] in GOING or job["attempts"]), jobs[-1])


def packed_run_state(run_dir, task_state, attempts) -> str:
    """One of a packed task's runs, by its own record of this task's attempts: COMPLETED once its epochs are done;
    while the task runs, WAITING until the task starts it, FAILED if it failed (the task goes on with the next)."""
    config = rundir.config_if_readable(run_dir)
    if config and rundir.finished(run_dir, config):
        return "COMPLETED"
    if task_state in GOING and task_state != "PENDING":
        if not attempts:
            return "WAITING"
        if attempts[-1].end == "error":
            return "FAILED"
    return task_state


# ---------------------------------------------------------------- states without Slurm

def _state_from_run(entry, result_state, attempts, err_tail):
    """Where Slurm no longer knows a job (no accounting): its end as submitit's result (only a last attempt that
    returned or raised writes one), slurmstepd's last words in the .err (its last attempt's) or the run's
    usage.json say it; ENDED (a log) or UNKNOWN (none) otherwise."""
    if result_state:
        return result_state
    said = last_end(err_tail)
    if said and said != "REQUEUED":
        return said
    end = attempts[-1].end if attempts else None
    if end in ("completed", "error"):
        return {"completed": "COMPLETED", "error": "FAILED"}[end]
    return "ENDED" if Path(entry.stdout).exists() else "UNKNOWN"


def last_end(err_tail) -> str | None:
    """How slurmstepd's words in a job's .err say its LAST attempt ended, as Slurm would name it: FAILED (killed
    for memory by OverMemoryKill, whose CANCELLED line follows), OUT_OF_MEMORY (the cgroup's OOM killer), TIMEOUT,
    CANCELLED, PREEMPTED, NODE_FAIL; REQUEUED where its last words are a requeue's; None where it says nothing.
    A requeued job's attempts append to one .err: each requeue ends an attempt."""
    last = last_attempt(err_tail)
    if MEMORY_KILL.search(last):
        return "FAILED"  # as Slurm says it with OverMemoryKill (its .err also says the step was CANCELLED)
    if OOM_EVENT.search(last):
        return "OUT_OF_MEMORY"
    ends = list(STEPD_END.finditer(last))
    if ends:
        return ENDED_BY[ends[-1].group(1)]
    return "REQUEUED" if last != err_tail else None


def last_attempt(err_tail) -> str:
    """The part of a job's .err its last attempt wrote: what follows its last requeue's line."""
    requeues = [m.end() for m in STEPD_END.finditer(err_tail) if m.group(1) == "JOB REQUEUE"]
    return err_tail[requeues[-1]:] if requeues else err_tail


def killed_for(err_tail) -> str | None:
    """"memory" or "time" where slurmstepd's words in a job's .err say its last attempt was killed for one;
    else None."""
    return {"FAILED": "memory", "OUT_OF_MEMORY": "memory", "TIMEOUT": "time"}.get(last_end(err_tail))


def _memory_kill(err_tail):
    """(bytes used, bytes allowed) from slurmstepd's "exceeded memory limit (A > B)" of the last attempt, else None."""
    kills = MEMORY_KILL.findall(last_attempt(err_tail))
    return (int(kills[-1][0]), int(kills[-1][1])) if kills else None


# ---------------------------------------------------------------- figures

def measured(slurm, attempts, memory_kill, job) -> dict:
    """time_used_s, time_limit_s, task_limit_s (a packed run's task's), held_cpu_s and held_by_task (CPU seconds
    the allocation held, and whether that is a packed task's, shared by its runs), wait_s, cpus, cpu_s, cpu_pct,
    mem_peak, mem_asked, gpu_peak, gpu_total (None where unknown): the run's usage.json first, Slurm's accounting
    for what it lacks. A packed run's time is its own."""
    own = _own_figures(attempts)
    slurm = slurm or record.JobState("")
    cpus = slurm.cpus or own["cpus"] or job.get("cpus") or None
    packed = bool(job.get("pack"))
    # CPU time held: the allocation's (counted once however many packed runs it trained: held_by_task), else what
    # the run's own time held
    held_s = slurm.elapsed_s or own["wall_s"]
    held = {"held_cpu_s": held_s * cpus if held_s and cpus else None, "held_by_task": packed and bool(slurm.elapsed_s)}
    elapsed = own["wall_s"] if packed else held_s  # a packed run's time is its own, not its task's
    if own["cpu_s"] is not None and own["reserved_s"]:
        cpu_s, pct = own["cpu_s"], 100 * own["cpu_s"] / own["reserved_s"]
    else:
        cpu_s = slurm.cpu_s if slurm.cpu_s else None
        pct = 100 * cpu_s / (elapsed * cpus) if cpu_s is not None and elapsed and cpus else None
    peaks = [p for p in (own["peak"], slurm.max_rss, memory_kill and memory_kill[0]) if p]
    asked = slurm.mem // (slurm.nodes or 1) if slurm.mem else (memory_kill and memory_kill[1]) or _asked_mem(job)
    limit = (_asked_time(job) or (slurm.limit_s and slurm.limit_s // job["pack"][1])) if packed else (
        slurm.limit_s or _asked_time(job))
    return {"time_used_s": elapsed, "time_limit_s": limit, "task_limit_s": slurm.limit_s if packed else None,
            **held, "wait_s": _wait(slurm, attempts, job),
            "cpus": cpus, "cpu_s": cpu_s, "cpu_pct": pct, "mem_peak": max(peaks) if peaks else None,
            "mem_peak_own": own["peak"], "mem_asked": asked, "gpu_peak": own["gpu_peak"], "gpu_total": own["gpu_total"]}


def _own_figures(attempts):
    """The run's own figures over its attempts: peak per node (ranks on one host add up), CPU seconds,
    the CPU seconds it held (wall x CPUs), the last attempt's wall time, GPU peak."""
    found = {"peak": None, "cpu_s": None, "reserved_s": 0.0, "wall_s": None, "cpus": None, "gpu_peak": None,
             "gpu_total": None}
    for attempt in attempts:
        found["peak"] = max(found["peak"] or 0, attempt.node_peak) or None
        found["cpu_s"] = (found["cpu_s"] or 0) + attempt.cpu_s
        found["cpus"] = attempt.cpus
        found["reserved_s"] += attempt.wall_s * (attempt.cpus or 0)
        found["wall_s"] = attempt.wall_s
        if attempt.gpu_peak:
            found["gpu_peak"] = max(found["gpu_peak"] or 0, attempt.gpu_peak)
            found["gpu_total"] = attempt.gpu_total
    return found


def _wait(slurm, attempts, job):
    """Queue wait: start - submit (Slurm's), or still waiting: now - submit; else from the run's own start."""
    submit = _parse(slurm.submit) or _parse(job.get("submitted"))
    start = _parse(slurm.start) if slurm.node or slurm.state != "CANCELLED" else None
    if start is None and attempts:
        start = _parse(attempts[0].started)
    if slurm.state == "PENDING" and submit:
        start = datetime.datetime.now()
    if submit is None or start is None:
        return None
    return max(0.0, (start - submit).total_seconds())


def _parse(text):
    try:
        return datetime.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _config(job):
    if "_config" not in job:
        job["_config"] = rundir.config_if_readable(job["run_dir"]) or {}
    return job["_config"]


def _asked(job, key):
    """What the job asked for: from the record (the launcher writes it), else the run's config (slower: YAML)."""
    return job.get(key) or (_config(job).get("resources") or {}).get(key)


def _asked_mem(job):
    return figures.memory_bytes(_asked(job, "mem") or "", "M")


def _asked_time(job):
    try:
        return resources.time_seconds(_asked(job, "time"))
    except resources.ResourceError:
        return None


def _hosts(attempts):
    return ",".join(attempts[-1].hosts) if attempts else ""


# ---------------------------------------------------------------- causes

def requeued_because(slurm) -> str:
    """Why Slurm requeued the job last, by accounting's record of its earlier attempt: "its node n1 failed",
    "preempted"; "" where it was not requeued for a fault (or accounting does not say)."""
    if not slurm or not slurm.earlier:
        return ""
    state, node = slurm.earlier[-1]
    return {"NODE_FAIL": f"its node {node} failed", "PREEMPTED": "preempted"}.get(state, "")


def cause(job, err_tail) -> tuple[str, str]:
    """(one line saying why the job ended unsuccessfully, the command that fixes it); ("", "") otherwise. A job
    Slurm requeued after a fault and that has not ended says so."""
    state = job["state"]
    resubmit = resubmit_command(job)
    requeued = f"requeued: {job['requeued_because']}; " if job.get("requeued_because") else ""
    if state == "PENDING":
        reason = job["reason"]
        if not reason:
            return f"{requeued}pending (not yet looked at by Slurm's scheduler)", ""
        return f"{requeued}pending: {reason}" + (f" ({WAITING[reason]})" if reason in WAITING else ""), ""
    if state in GOING and requeued:
        return f"{requeued}resuming from its checkpoint", ""
    if state in GOING or state in ("COMPLETED", "?", ""):
        return "", ""
    if job["memory_kill"] or state == "OUT_OF_MEMORY":
        fit = figures.memory_text(memory_after_kill(job["mem_peak"], job["mem_asked"]))
        if fit is None:
            return "killed for memory; ask for more", f"{resubmit} --more"
        peak, asked = figures.human_bytes(job["mem_peak"]), figures.human_bytes(job["mem_asked"])
        return (f"killed for memory: peak {peak} > {asked} asked; "
                f"try resources.mem={fit}", f"{resubmit} resources.mem={fit}   (or: {resubmit} --more)")
    where = progress(job)
    if state == "TIMEOUT":
        limit = job["time_limit_s"]  # a packed run's own: what resources.time sets, each run of a task adding its own
        longer = figures.limit_text(2 * limit) if limit else "2:00:00"
        after = f" after {job['requeues']} requeue{'s' if job['requeues'] != 1 else ''}" if job["requeues"] else ""
        reached = (f"its packed task's time limit {figures.clock(job['task_limit_s'])}" if job["task_limit_s"]
                   else f"time limit {figures.clock(limit) if limit else '?'}")
        return (f"{reached} reached{after}{where}; resume, or try resources.time={longer}",
                f"{resubmit}   (or: {resubmit} resources.time={longer}, or --more)")
    if state == "CANCELLED":
        if not job["attempts"] and not Path(job["stdout"]).exists():
            return "cancelled before it started", resubmit
        return f"cancelled{where}; resume it", resubmit
    if state in ("NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
        what = {"NODE_FAIL": f"its node {job['node'] or ''} failed".replace("  ", " "), "PREEMPTED": "preempted",
                "BOOT_FAIL": "its node failed to boot", "DEADLINE": "its deadline passed"}[state]
        return f"{what}{where}; resume it", resubmit
    return _error(job, err_tail, resubmit)


def _error(job, err_tail, resubmit):
    """A failed run: its own record of the error (a UserError's paragraph, or the exception's last line),
    else the .err's last exception line, else the exit code."""
    last = job["attempts"][-1] if job["attempts"] else None
    if last and last.end == "error" and last.error:
        if last.user_error:
            return f"stopped: {last.error}", f"fix what it names, then: {resubmit}"
        return f"Python error: {last.error}", f"see {job['stderr']}; once fixed: {resubmit}"
    lines = [line.strip() for line in err_tail.splitlines() if EXCEPTION.match(line.strip())]
    if lines:
        return f"Python error: {lines[-1]}", f"see {job['stderr']}; once fixed: {resubmit}"
    code = job["exit_code"]
    if code and code != "0:0":
        return f"exit code {code}", f"see {job['stderr']}"
    return ("ended without a result (no accounting here to say why)" if job["state"] == "ENDED" else ""), ""


@functools.cache
def _default_logs(log_dir):
    return log_dir in ("logs", str(Path("logs").resolve()))


def resubmit_command(job) -> str:
    logs = "" if _default_logs(job["log_dir"]) else f" --logs {job['log_dir']}"
    return f"python -m mnist.jobs{logs} resubmit {job['job_id']}"


def progress(job) -> str:
    """ " at epoch 3, batch 120/938 (checkpoint: epoch 2)": how far the log says it got."""
    stopped = STOPPED_LINE.findall(job["out_tail"])
    lines = rundir.TRAIN_LINE.findall(job["out_tail"])
    folder = _training_in(job)
    done = len(_metrics(folder))
    saved = f" (checkpoint: epoch {done})" if done else " (no checkpoint yet)"
    if not lines:
        return saved if job["attempts"] else ""
    epoch, seen, total = (int(x) for x in lines[-1][:3])
    if done > epoch:  # a later submission of the run folder has trained on since
        saved = ""
    config = _config(job) if folder == job["run_dir"] else rundir.config_if_readable(folder) or {}
    batch_size = (config.get("data") or {}).get("batch_size") or 64
    resources = config.get("resources") or {}
    world = (resources.get("nodes") or 1) * (resources.get("tasks_per_node") or 1)
    batches = math.ceil(total / (batch_size * world))
    batch = seen // (batch_size * world) + 1
    if stopped and int(stopped[-1][0]) == epoch:
        batch = int(stopped[-1][1])
    return f" at epoch {epoch}, batch {batch}/{batches}{saved}"


def _training_in(job):
    """The folder the job trains in: its run folder, or for a search's worker the trial it is (or was) on."""
    from mnist.search import study

    if study.is_search(job["run_dir"]):
        trial = study.current_trial(job["run_dir"], job["job_id"])
        if trial is not None:
            return str(Path(job["run_dir"]) / str(trial))
    return job["run_dir"]


def _metrics(run_dir):
    try:
        return rundir.read_metrics(run_dir)
    except rundir.RunFolderError:
        return []


def memory_after_kill(peak, asked) -> float | None:
    """The memory (bytes) to ask for after a kill for memory: twice what the job asked, or its peak and a quarter
    if more. Never less than it asked: a peak sampled before a kill is only a lower bound (the allocation that
    crossed the limit is never seen). None where neither is known."""
    wanted = max(2 * (asked or 0), 1.25 * (peak or 0))
    return wanted or None


# ---------------------------------------------------------------- as shown

def cut(text, width) -> str:
    """A table cell of at most `width` characters ("-" for none), cut with "..."."""
    text = text or "-"
    return text if len(text) <= width else text[:width - 3] + "..."


def shown(job) -> dict[str, str]:
    """The table's cells for the figures: TIME used/limit, CPU %, MEM peak/asked, WAIT."""
    used, limit = job["time_used_s"], job["time_limit_s"]
    time_cell = f"{figures.clock(round(used)) if used is not None else '-'}/{figures.clock(limit) if limit else '-'}"
    cpu = f"{job['cpu_pct']:.0f}%" if job["cpu_pct"] is not None else "-"
    peak, asked = job["mem_peak"], job["mem_asked"]
    mem = f"{figures.human_bytes(peak) if peak else '-'}/{figures.human_bytes(asked) if asked else '-'}"
    return {"time": time_cell if used is not None or limit else "-", "cpu": cpu, "mem": mem if peak or asked else "-",
            "wait": figures.clock(round(job["wait_s"])) if job["wait_s"] is not None else "-"}


def summary(jobs) -> str:
    """One line for the jobs of a sweep: min/median/max of CPU %, peak memory, time used; CPU-hours used
    against those held (elapsed x CPUs)."""
    def spread(values, show):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return "/".join(show(v) for v in (min(values), statistics.median(values), max(values)))

    used = sum(j["cpu_s"] or 0 for j in jobs) / 3600
    tasks = {j["job_id"]: j["held_cpu_s"] or 0 for j in jobs if j["held_by_task"]}  # each allocation once
    held = (sum(tasks.values()) + sum(j["held_cpu_s"] or 0 for j in jobs if not j["held_by_task"])) / 3600
    return (f"{len(jobs)} runs, min/median/max: CPU {spread([j['cpu_pct'] for j in jobs], lambda v: f'{v:.0f}%')}, "
            f"MEM {spread([j['mem_peak'] for j in jobs], figures.human_bytes)}, "
            f"TIME {spread([j['time_used_s'] for j in jobs], lambda v: figures.clock(round(v)))}; "
            f"CPU-hours {used:.3f} used of {held:.3f} held (elapsed x CPUs)")


def tail(path, size=TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line for line in lines if not line.startswith("submitit ")]  # the run's lines, not submitit's
    return (ours or lines or [""])[-1].replace("\t", " ")
