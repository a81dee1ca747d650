"""Requests sized from what past runs used: resources.mem=auto and resources.time=auto (resources=auto for
both), launcher.runs_per_task=auto, and `python -m mnist.jobs suggest [overrides...]`.

The history is the runs in the launcher's record (<launcher.log_dir>/jobs.jsonl) that match this one
(MATCH: same model, data, batch size, CPUs, GPUs, nodes, tasks and device), read from each run's
config.yaml and usage.json (written by the run itself: mnist.usage; a packed run's attempts carry
`task` = {index, runs, startup_s}), and how its job ended: "completed" where its usage.json says so, else
one `sacct` call about such runs where accounting exists, else slurmstepd's last words in the job's .err
(mnist.launch.outcome.killed_for).

    mem  = max(p95 of the peaks, the largest peak) x 1.2, rounded up to 256M
    time = p95 of the runs' own wall times x 1.2 + the start-up, rounded up to a minute, at least 2
           (each wall time scaled by trainer.epochs / the epochs that run trained)
    Runs killed for memory or time are lower bounds: at least twice what they had.
    With fewer than MIN_RUNS completed runs: conf/'s request (resources.asked), and it says so.

Standard library and PyYAML only: the login node's submit path, which never imports torch.
"""
import math
from dataclasses import dataclass

from mnist import figures, rundir
from mnist.launch import outcome, record
from mnist.launch.resources import memory, memory_bytes_of, time_seconds

MATCH = ("model", "data.name", "data.batch_size", "resources.cpus_per_task", "resources.gpus_per_node",
         "resources.nodes", "resources.tasks_per_node", "trainer.device")
MIN_RUNS = 5
MARGIN = 1.2
MIN_TIME_S = 120


@dataclass
class Past:
    """One past run like this one: its peak memory (bytes, per node), its own wall seconds (all attempts,
    start-up aside) and epochs, the start-ups its attempts measured, how it ended, and what it asked."""
    peak: int
    work_s: float
    epochs: int
    startups: list
    ended: str  # completed | memory | time | other
    asked_mem: int
    asked_time_s: int


def match_key(config) -> list:
    return [rundir.select(config, key) for key in MATCH]


def history(log_dir, config) -> list[Past]:
    """The past runs of the record in log_dir that match `config` (a plain dict), oldest first."""
    matching = []
    for submissions in record.by_run(record.read(log_dir)).values():
        run_config = rundir.config_if_readable(submissions[-1].run_dir)
        if not run_config or match_key(run_config) != match_key(config):
            continue
        attempts = rundir.read_usage(submissions[-1].run_dir)
        trained = {a.job_id for a in attempts}
        # a resubmitted run is one run, and how it ended is the latest job's that trained it
        entry = next((e for e in reversed(submissions) if e.job_id in trained), None)
        if entry:
            matching.append((entry, run_config, attempts))
    # a run whose usage.json says it completed needs no sacct: only the others are asked about, if any
    states = record.accounting([e.job_id for e, _, attempts in matching if not _completed(attempts)])
    return [_past(e, attempts, c, states[e.job_id].state if e.job_id in states else "")
            for e, c, attempts in matching]


def _completed(attempts):
    return attempts[-1].end == "completed"


def _past(entry, attempts, config, slurm_state):
    peaks, work, startups = [], 0.0, []
    for attempt in attempts:
        peaks.append(attempt.node_peak)
        startups += [attempt.startup_s] if attempt.startup_s else []
        work += attempt.work_s
    ended = "completed" if _completed(attempts) else _killed(entry, slurm_state)
    resources = config.get("resources", {})
    try:
        asked_mem, asked_time = memory_bytes_of(resources.get("mem")), time_seconds(resources.get("time"))
    except Exception:  # an "auto" that never resolved, or an older config: not what it had
        asked_mem, asked_time = 0, 0
    return Past(max(peaks), work, int(config["trainer"].get("epochs") or 1), startups, ended, asked_mem, asked_time)


def _killed(entry, slurm_state):
    """memory, time or other: how an unfinished run's job ended (Slurm's state, else its .err)."""
    if slurm_state.startswith("OUT_OF_ME"):
        return "memory"
    if slurm_state.startswith("TIMEOUT"):
        return "time"
    return outcome.killed_for(outcome.tail(entry.stderr) if entry.stderr else "") or "other"


def p95(values) -> float:
    """The 95th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


@dataclass
class Choice:
    """What auto chose for one request: the value (sbatch's form), from how many runs, and why."""
    value: object
    runs: int
    why: str


def _too_few(done):
    return f"conf/'s: only {len(done)} completed past run{'' if len(done) == 1 else 's'} like this ({MIN_RUNS} needed)"


def choose_mem(pasts, asked) -> Choice:
    """resources.mem for a run like these past ones; `asked` is conf/'s (resources.asked.mem)."""
    done = [p for p in pasts if p.ended == "completed"]
    floor = max([2 * p.asked_mem for p in pasts if p.ended == "memory"], default=0)
    if len(done) >= MIN_RUNS:
        peaks = [p.peak for p in done]
        wanted = max(p95(peaks), max(peaks)) * MARGIN
        why = f"the peak of {len(done)} past runs like this, {figures.human_bytes(max(peaks))} at most, x{MARGIN}"
    else:
        wanted = memory_bytes_of(asked)
        why = _too_few(done)
    if floor > wanted:
        killed_with = figures.human_bytes(floor // 2)
        wanted, why = floor, f"{why}; raised: a run like this was killed for memory with {killed_with}"
    elif len(done) < MIN_RUNS:
        return Choice(memory(asked), len(done), why)
    return Choice(figures.memory_text(wanted), len(done), why)


def choose_time(pasts, asked, epochs) -> Choice:
    """resources.time (minutes) for a run of `epochs` epochs like these past ones; `asked` is conf/'s."""
    done = [p for p in pasts if p.ended == "completed"]
    floor = max([2 * p.asked_time_s for p in pasts if p.ended == "time"], default=0)
    if len(done) >= MIN_RUNS:
        work = estimated_work_s(pasts, epochs)
        startup = max((s for p in done for s in p.startups), default=0.0)
        wanted = max(work * MARGIN + startup, MIN_TIME_S)
        why = (f"p95 of {len(done)} past runs like this, {work:.1f} s for {epochs} epoch{'' if epochs == 1 else 's'}, "
               f"x{MARGIN} + {startup:.0f} s start-up")
    else:
        wanted = time_seconds(asked)
        why = _too_few(done)
    if floor > wanted:
        wanted, why = floor, f"{why}; raised: a run like this ran out of its {floor // 120} minutes"
    return Choice(math.ceil(wanted / 60), len(done), why)


def estimated_work_s(pasts, epochs) -> float | None:
    """A run's own seconds (p95, start-up aside) by the history; None with too little of it."""
    done = [p for p in pasts if p.ended == "completed"]
    return p95([p.work_s * epochs / p.epochs for p in done]) if len(done) >= MIN_RUNS else None


