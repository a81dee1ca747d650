"""The launcher's record of the jobs it submitted (`<launcher.log_dir>/jobs.jsonl`) and their states.

One JSON object a line, one line a job (each task of an array is one; each run of a packed task is one,
with its place in the task): an `Entry`, whose fields say what each key holds. Older records lack the
last few. Every reader (mnist.jobs, mnist.report, resubmit, history) reads it only through this module,
as Entries.

Submissions append under an exclusive lock, each in one write, so submissions made at the same
time never interleave; readers take a shared lock, so they never see half a submission.

States: one `squeue -r` call (the live state, each pending array task listed on its own, with its
reason, requeues, time limit and allocation) and one `sacct` call (jobs squeue has forgotten, with
their exit code, CPU time and the steps' MaxRSS) for all jobs, whatever their number; squeue wins.
Without accounting (sacct fails) a finished job's outcome is read from the result file
submitit left. When Slurm cannot be reached at all, no state is guessed: `States.unreachable`
says why. Slurm's commands are called through mnist.launch.gateway. Standard library only (submitit's file
names, for a job read from its result, through mnist.private_apis): no torch through here.
"""
import fcntl
import json
import math
import os
import pickletools
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

from mnist import figures
from mnist.errors import UserError
from mnist.launch import gateway

FILE_NAME = "jobs.jsonl"


@dataclass(frozen=True)
class Entry:
    """One job (or array task) the launcher submitted, as its line in jobs.jsonl has it."""
    job_id: str  # 123, or 120_3 for a task of an array
    run_dir: str  # the run folder it trains in
    stdout: str  # its log (%x_%j.out), and errors (%x_%j.err)
    stderr: str = ""
    name: str = ""  # the job's name: the models it trains
    model: str = ""
    submitted: str = ""  # ISO time
    submitit_folder: str = ""  # where submitit keeps its files (the result, for a job accounting has forgotten)
    previous: str = ""  # for a resubmission: the job id it reruns
    mem: str = ""  # what it asks for: resources.mem and resources.time as they say it, CPUs in all
    time: str = ""
    cpus: int | None = None
    pack: tuple | None = None  # one of a packed task's runs: (its place, the task's runs)

    def line(self) -> str:
        """Its line in jobs.jsonl: the fields it has."""
        return json.dumps({k: v for k, v in asdict(self).items() if v not in ("", None)})


FIELDS = tuple(f.name for f in fields(Entry))
REQUIRED = ("job_id", "run_dir", "stdout")
JOB_ID = re.compile(r"\d+(_\d+)?")
LIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
        "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}
_warned = set()


def path(log_dir) -> Path:
    return Path(log_dir) / FILE_NAME


# ---------------------------------------------------------------- writing and reading

def append(log_dir, entries) -> None:
    """Add one submission's Entries as lines, all in one locked write."""
    file = path(log_dir)
    data = "".join(entry.line() + "\n" for entry in entries).encode()
    try:
        fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _ends_mid_line(fd):  # a line cut short by a crash: ours start on a line of their own
                data = b"\n" + data
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)  # releases the lock
    except OSError as e:
        ids = ", ".join(entry.job_id for entry in entries)
        raise UserError(f"Job {ids} was submitted, but {file} could not be written ({e.strerror or e}), so "
                        f"python -m mnist.jobs will not list it. Make {file.parent} writable, or set "
                        f"launcher.log_dir to a writable folder for the next submission.") from None


def _ends_mid_line(fd):
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read(log_dir) -> list[Entry]:
    """The recorded Entries, oldest first. A damaged line is skipped with one warning naming it."""
    file = path(log_dir)
    try:
        with open(file, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"{file} could not be read ({e.strerror or e}). Point --logs at the launcher's log "
                        f"folder (launcher.log_dir, default logs).") from None
    entries, damaged = [], []
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            entry = _parse(line)
            if entry is None:
                damaged.append(number)
            else:
                entries.append(entry)
    if damaged:
        _warn_damaged(file, damaged)
    return entries


def _parse(line):
    try:
        entry = json.loads(line.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) and entry[key] for key in REQUIRED):
        return None
    if not JOB_ID.fullmatch(entry["job_id"]):
        return None
    known = {key: entry[key] for key in FIELDS if key in entry}
    pack = known.get("pack")
    valid = isinstance(pack, list) and len(pack) == 2 and all(isinstance(n, int) for n in pack)
    known["pack"] = tuple(pack) if valid else None
    if not isinstance(known.get("cpus"), int):
        known["cpus"] = None
    return Entry(**{key: value if key in ("pack", "cpus") else str(value) for key, value in known.items()})


def _warn_damaged(file, numbers):
    key = (str(file), tuple(numbers))
    if key in _warned:  # a command may read the record twice; it warns once
        return
    _warned.add(key)
    which = f"line {numbers[0]}" if len(numbers) == 1 else "lines " + ", ".join(map(str, numbers))
    print(f"warning: {file}, {which}: not a whole job record (damaged or half-written), skipped.",
          file=sys.stderr)


def by_run(entries) -> dict[str, list[Entry]]:
    """{run folder (resolved, as text): its entries, oldest first}: a resubmitted run has several, and its latest
    submission is its last."""
    runs, resolved = {}, {}
    for entry in entries:
        folder = entry.run_dir
        if folder not in resolved:
            resolved[folder] = str(Path(folder).resolve())
        runs.setdefault(resolved[folder], []).append(entry)
    return runs


def find(log_dir, job_id=None) -> Entry:
    """The entry of a job or array task; an array's id gives its latest task; None: the latest job."""
    entries = read(log_dir)
    if not entries:
        raise UserError(f"No jobs recorded in {path(log_dir)}. Submit one with launcher=slurm first.")
    if job_id is None:
        return entries[-1]
    for entry in reversed(entries):
        if job_id in (entry.job_id, entry.job_id.split("_")[0]):
            return entry
    known = ", ".join(entry.job_id for entry in entries[-10:])
    raise UserError(f"Job {job_id} was not submitted from here ({path(log_dir)}). Recent jobs: {known}.")


# ---------------------------------------------------------------- states

class JobState(NamedTuple):
    """What Slurm (or, without accounting, submitit's result) says of one job or array task.
    Figures Slurm does not give are None (times in seconds, memory in bytes)."""
    state: str  # Slurm's (PENDING, RUNNING, CANCELLED, ...), or COMPLETED/FAILED from submitit's result
    elapsed: str = ""  # as Slurm writes it (squeue's TimeUsed)
    node: str = ""
    reason: str = ""  # why a job waits (Resources, Priority, JobArrayTaskLimit, ...) or why it ended
    restarts: int = None  # requeues so far (squeue; accounting does not keep it)
    elapsed_s: int = None
    limit_s: int = None
    submit: str = ""  # ISO times
    start: str = ""
    end: str = ""
    exit_code: str = ""  # "0:0", "9:0": status:signal
    cpus: int = None  # allocated (AllocTRES cpu=), or asked while pending
    mem: int = None  # allocated memory (AllocTRES mem=), the whole job's
    nodes: int = None
    cpu_s: float = None  # accounting's TotalCPU (finished steps only)
    max_rss: int = None  # accounting's MaxRSS, the largest step's, times its tasks on one node (a node's peak)
    source: str = ""  # squeue, sacct or result
    earlier: tuple = ()  # accounting's (state, node) of each attempt before a requeue, oldest first


class States(NamedTuple):
    by_job: dict  # {job id: JobState}; a job nothing knows about is left out
    unreachable: str = ""  # why Slurm could not be asked; "" when it answered


SQUEUE_FIELDS = ("JobArrayID", "State", "TimeUsed", "NodeList", "Reason", "RestartCnt", "TimeLimit", "SubmitTime",
                 "StartTime", "tres-alloc")
SACCT_FIELDS = ("JobID", "State", "ExitCode", "ElapsedRaw", "TotalCPU", "MaxRSS", "NTasks", "TimelimitRaw", "Submit",
                "Start", "End", "AllocTRES", "NodeList", "Reason", "NNodes")


def states(entries) -> States:
    """The JobState of each Entry (its job_id, and its submitit_folder for the result file)."""
    entries = [entry for entry in entries if JOB_ID.fullmatch(str(entry.job_id))]
    if not entries:
        return States({})
    arrays = sorted({entry.job_id.split("_")[0] for entry in entries}, key=int)
    queued, problem = _squeue(",".join(arrays))
    if problem:
        return States({}, problem)
    # squeue -r lists every pending job and task. sacct's PENDING for one it does not list is out of
    # date: a task cancelled before it started stays in sacct's folded "N_[1-3%1] PENDING" for a while.
    listed = accounting(arrays)
    accounted = {job: state for job, state in listed.items() if state.state != "PENDING"}
    known_arrays = {job.split("_")[0] for job in (*queued, *listed)}
    found = {}
    for entry in entries:
        job_id = entry.job_id
        live, past = _lookup(job_id, queued), _lookup(job_id, accounted)
        state = _merged(live, past) or _submitit_outcome(entry) or _cancelled_pending(entry, known_arrays)
        if state:
            found[job_id] = state
    return States(found)


def _cancelled_pending(entry, known_arrays):
    """CANCELLED for an array task Slurm no longer lists while it lists its array: one cancelled while it
    was pending leaves squeue and, until sacct folds it into a line such as "N_[1%1] CANCELLED", sacct too.
    A task that started has a log; a pending one is in `squeue -r`."""
    array, _, task = entry.job_id.partition("_")
    if task and array in known_arrays and not Path(entry.stdout).exists():
        return JobState("CANCELLED", reason="never started", source="inferred")
    return None


def _merged(live, past):
    """squeue's state wins; accounting adds what squeue lacks (CPU time, MaxRSS, exit code)."""
    if live is None or past is None:
        return live or past
    return live._replace(cpu_s=past.cpu_s, max_rss=past.max_rss, exit_code=past.exit_code, earlier=past.earlier,
                         elapsed_s=live.elapsed_s if live.elapsed_s is not None else past.elapsed_s)


def _squeue(job_list):
    """The jobs the controller knows, and "" or why it could not be asked."""
    out, error = gateway.call(["squeue", "-r", "-h", "-j", job_list, "-O", ",".join(f + ":|" for f in SQUEUE_FIELDS)])
    # One id squeue has forgotten (or never knew) fails with "Invalid job id specified"; several such
    # ids list nothing. Either way Slurm answered.
    if error and "Invalid job id" not in error:
        return {}, error
    return parse_squeue(out), ""


def accounting(job_ids) -> dict[str, JobState]:
    """{job id: JobState} of these jobs (ids of jobs, arrays or tasks) as accounting knows them, in one sacct call
    (-D: a requeued job's earlier attempts too); {} where accounting is off (sacct fails) or there is no Slurm."""
    if not job_ids:
        return {}
    out, _ = gateway.call(["sacct", "-n", "-P", "-D", "-j", ",".join(sorted(set(job_ids))), "-o",
                           ",".join(SACCT_FIELDS)])
    return parse_sacct(out)


def parse_squeue(text) -> dict[str, JobState]:
    """{job id: JobState} from `squeue -r -O` lines (SQUEUE_FIELDS, each ended by |)."""
    found = {}
    for line in text.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) < len(SQUEUE_FIELDS) or not fields[1]:
            continue
        job_id, state, used, node, reason, restarts, limit, submit, start, tres = fields[:len(SQUEUE_FIELDS)]
        allocated = _tres(tres)
        found[job_id] = JobState(
            figures.state(state), used, node, "" if reason == "None" else reason, _int(restarts),
            figures.duration_s(used), figures.duration_s(limit), _time(submit),
            _time(start) if state != "PENDING" else "", "", "", allocated.get("cpu"), allocated.get("mem"),
            allocated.get("node"), source="squeue")
    return found


def parse_sacct(text) -> dict[str, JobState]:
    """{job id: JobState} from `sacct -n -P` lines (SACCT_FIELDS): a job's line, then its steps' (N.batch,
    N.0), whose MaxRSS (one task's, times the step's tasks per node) gives the job's peak per node. Pending
    array tasks may be folded (N_[1-3%1]). With -D a requeued job has a line per attempt, oldest first: the last
    is the job's, the others its `earlier` (NODE_FAIL on n1, PREEMPTED, REQUEUED, ...)."""
    found, steps = {}, {}
    for line in text.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) < len(SACCT_FIELDS) - 1 or not fields[1]:  # (NNodes, the last, is new: older lines lack it)
            continue
        fields += [""] * (len(SACCT_FIELDS) - len(fields))
        job_id, state, exit_code, elapsed, total_cpu, max_rss, tasks, limit, submit, start, end, tres, node, reason, \
            nodes = fields[:len(SACCT_FIELDS)]
        if "." in job_id:
            rss = figures.memory_bytes(max_rss)
            if rss is not None:  # MaxRSS is one task's: a node holds its share of the step's tasks
                job = job_id.split(".")[0]
                per_node = math.ceil((_int(tasks) or 1) / (_int(nodes) or 1))
                steps[job] = max(steps.get(job, 0), rss * per_node)
            continue
        allocated = _tres(tres)
        seconds = _int(elapsed)
        before = found.get(job_id)
        earlier = (*before.earlier, (before.state, before.node)) if before else ()
        found[job_id] = JobState(
            figures.state(state), figures.clock(seconds) if seconds is not None else "",
            "" if node == "None assigned" else node,
            "" if reason == "None" else reason, None, seconds, 60 * _int(limit) if _int(limit) is not None else None,
            _time(submit), _time(start) if node != "None assigned" else "", _time(end), exit_code, allocated.get("cpu"),
            allocated.get("mem"),
            allocated.get("node"), figures.duration_s(total_cpu), source="sacct", earlier=earlier)
    return {job: state._replace(max_rss=steps.get(job)) for job, state in found.items()}


def _int(text):
    return int(text) if str(text).isdigit() else None


def _time(text):
    return "" if text in ("", "N/A", "Unknown", "None") else text


def _tres(text):
    """{cpu: 4, mem: bytes, node: 1, gpu: 1} from a TRES list (cpu=4,mem=16G,node=1,gres/gpu=1)."""
    found = {}
    for item in str(text).split(","):
        key, _, value = item.partition("=")
        key = "gpu" if key == "gres/gpu" else key
        if key == "mem":
            found[key] = figures.memory_bytes(value, "M")
        elif key in ("cpu", "node", "gpu") and value.isdigit():
            found[key] = int(value)
    return found


def _lookup(job_id, listing):
    if job_id in listing:
        return listing[job_id]
    array, _, task = job_id.partition("_")
    if task:
        for listed, state in listing.items():
            listed_array, _, tasks = listed.partition("_")
            if listed_array == array and _in_folded(task, tasks):
                return state
    return None


def _in_folded(task, tasks):
    """Whether task "7" is in a folded listing's "[2-5,7%8]"."""
    match = re.fullmatch(r"\[([\d,\-]+)(?:%\d+)?\]", tasks)
    if not match:
        return False
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and int(low) <= int(task) <= int(high or low):
            return True
    return False


def _submitit_outcome(entry):
    """A finished job's outcome, COMPLETED or FAILED, from the result file submitit left."""
    if not entry.submitit_folder:
        return None
    from mnist import private_apis  # (submitit's names, imported only for a job no Slurm command knows)

    outcome = _first_string(private_apis.result_pickle(entry.submitit_folder, entry.job_id))
    if outcome is None:
        return None
    return JobState("COMPLETED" if outcome == "success" else "FAILED", source="result")


def _first_string(pickle_file):
    """submitit's result is ("success" or "error", ...): its first string, read without unpickling
    (which would import whatever the result holds, torch included)."""
    try:
        with open(pickle_file, "rb") as f:
            for _, argument, _ in pickletools.genops(f):
                if isinstance(argument, str):
                    return argument
    except (OSError, ValueError, EOFError):
        pass
    return None
