"""The run folder: the one module that knows what a run leaves behind and how to read it.

    config.yaml       the resolved config the run trains on (written at submit, or when training starts)
    run.json          when the run first started, and the overrides of that first command
    train.log         every line the run printed
    metrics.csv       one row per finished epoch
    checkpoint.pt     where training is (written and read by mnist.checkpoint)
    environment.json  versions, host, device, Slurm ids
    usage.json        what each attempt used (peak memory, CPU and wall seconds, GPU memory), per rank,
                      written by the run itself while it runs (mnist.usage); usage.rank<N>.json: rank N's
    tensorboard/      TensorBoard's event files, with logger=tensorboard (written by mnist.board)
    .lock             held by the one process that trains into the folder (host, pid, job id)

A folder holding a checkpoint and a config holds a run to resume; it resumes with its own
config (`resume_config`). No torch and no Hydra here (PyYAML, which OmegaConf brings, and the
standard library): the login node's launcher, `mnist.jobs` and `mnist.report` read it too.
"""
import contextlib
import csv
import datetime
import errno
import fcntl
import json
import os
import re
import socket
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mnist import atomic
from mnist.errors import UserError

CONFIG = "config.yaml"
START = "run.json"
LOG = "train.log"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
ENVIRONMENT = "environment.json"
USAGE = "usage.json"
RANK_USAGE = "usage.rank{}.json"  # ranks but the first write their own
TENSORBOARD = "tensorboard"  # a folder
LOCK = ".lock"
MAX_ATTEMPTS = 100  # usage.json keeps the latest attempts

# The course's line every log_interval batches (train.py writes it): epoch, samples seen, the split's size, loss
TRAIN_LINE = re.compile(r"^Train Epoch: (\d+) \[(\d+)/(\d+) \(\d+%\)\]\s+Loss: ([-\d.eE+naif]+)$", re.M)
METRIC_COLUMNS = ("epoch", "train_loss", "test_loss", "accuracy", "seconds", "samples_per_s")

# Where and how a run trains may change when it resumes; what it trains may not.
TAKEN_FROM_COMMAND = ("launcher", "resources", "dry_run", "logger", "trainer.device", "trainer.threads",
                      "trainer.log_interval", "trainer.progress", "trainer.precision", "trainer.channels_last",
                      "trainer.compile")


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it: ~10x faster


class RunFolderError(UserError):
    """A run folder that cannot be used as it is; `damaged` names the damaged file, if that is why."""

    damaged = None


def _damaged(path, problem, fix):
    error = RunFolderError(f"{path} is damaged ({problem}). {fix}")
    error.damaged = Path(path).name
    return error


# ---------------------------------------------------------------- config

def write_config(run_dir, config) -> None:
    """Save the resolved config (a plain dict) the run trains on."""
    def write(tmp):
        Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))

    atomic.write_whole(Path(run_dir) / CONFIG, write)


def read_config(run_dir) -> dict | None:
    """The run's saved config as a plain dict; None if there is none yet."""
    path = Path(run_dir) / CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(path, getattr(e, "strerror", None) or type(e).__name__, _CONFIG_FIX) from None
    try:
        config = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise _damaged(path, f"{where}{getattr(e, 'problem', None) or 'not YAML'}", _CONFIG_FIX) from None
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("model", "trainer", "data")):
        raise _damaged(path, "not a run's config: no model, trainer and data sections", _CONFIG_FIX)
    return config


def config_if_readable(run_dir) -> dict | None:
    """The saved config, or None if there is none or it is damaged: for views that show what they can of a run."""
    try:
        return read_config(run_dir)
    except RunFolderError:
        return None


_CONFIG_FIX = ("It is the config the run resumes with: put it back as it was (Hydra's record of the first "
               "start is .hydra/config.yaml beside it), or move the folder away and start the run afresh.")


# ---------------------------------------------------------------- metrics

def write_metrics(run_dir, rows) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic.write_whole(Path(run_dir) / METRICS, write)


def read_metrics(run_dir) -> list[dict[str, float]]:
    """metrics.csv's rows, numbers parsed ([] when there is none yet); RunFolderError if damaged."""
    path = Path(run_dir) / METRICS
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return []
            if tuple(reader.fieldnames) != METRIC_COLUMNS:
                raise _damaged(path, f"its header is {','.join(reader.fieldnames)}", _METRICS_FIX)
            lines = list(reader)
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _damaged(path, getattr(e, "strerror", None) or str(e), _METRICS_FIX) from None
    rows = []
    for number, line in enumerate(lines, start=2):
        try:
            rows.append({key: int(line[key]) if key == "epoch" else float(line[key]) for key in METRIC_COLUMNS})
        except (TypeError, ValueError):
            raise _damaged(path, f"line {number} is not a row of numbers", _METRICS_FIX) from None
    return rows


_METRICS_FIX = ("A run rewrites it from its checkpoint when it resumes: resume it with "
                "`python -m mnist.run hydra.run.dir=<this folder>`, or put the file back as it was.")


# ---------------------------------------------------------------- the run, its start and its resume

def checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT


def holds_run(run_dir) -> bool:
    """Whether the folder holds a run to resume: a checkpoint and the config it was made with."""
    return checkpoint_path(run_dir).is_file() and (Path(run_dir) / CONFIG).is_file()


def checkpoint_whole(run_dir) -> bool:
    """Whether checkpoint.pt is at least a whole file (torch saves a zip archive); torch itself reads it."""
    return zipfile.is_zipfile(checkpoint_path(run_dir))


def record_start(run_dir, overrides) -> None:
    """Remember when the run first started and that command's overrides; a resume keeps them."""
    path = Path(run_dir) / START
    if path.exists():
        return
    record = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "overrides": list(overrides)}
    with contextlib.suppress(FileExistsError):  # two starts at once: the first one's record stays
        with open(path, "x") as f:
            f.write(json.dumps(record) + "\n")


def read_start(run_dir) -> dict | None:
    """{started, overrides} of the run's first start, or None (not started, or from an older version)."""
    try:
        record = json.loads((Path(run_dir) / START).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("overrides"), list):
        return None
    return record


def leaves(node, prefix="") -> dict[str, Any]:
    """A nested dict as {dotted key: value} of its leaves (a list is one leaf)."""
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in leaves(child, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _under(key, prefixes):
    """Whether `key` is one of the dotted `prefixes` or inside one of them."""
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def select(config, dotted, default=None) -> Any:
    """config's value at a dotted key (`trainer.epochs`), or `default`; config is a plain dict."""
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return default
        config = config[part]
    return config


def put(config, dotted, value) -> None:
    """Set config's value at a dotted key, making the sections on the way."""
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def given_keys(overrides) -> set[str]:
    """The keys a command's overrides set: `+a.b=1` and `~a` give a.b and a."""
    return {override.lstrip("+~").split("=", 1)[0] for override in overrides}


def resume_config(run_dir, config, overrides) -> dict:
    """The config a run resumes with: its saved one, with this command's where-and-how applied.

    Where and how it runs (TAKEN_FROM_COMMAND) always comes from this command, and
    trainer.epochs when it is given (to train on). Any other given override that differs from
    the saved config is refused, naming the keys. A section conf/ has gained since the run was
    saved (`loss`, `logger`) comes from this command: its defaults are what the run trained with.
    Both configs are plain dicts.
    """
    saved = read_config(run_dir)
    given = given_keys(overrides)
    now, before = leaves(config), leaves(saved)
    conflicts = sorted(
        key for key in set(now) | set(before)
        if now.get(key) != before.get(key) and key != "trainer.epochs"
        and _under(key, given) and not _under(key, TAKEN_FROM_COMMAND)
    )
    if conflicts:
        shown = ", ".join(f"{k} ({now.get(k)!r}, but the run has {before.get(k)!r})" for k in conflicts)
        raise RunFolderError(
            f"{run_dir} holds a run to resume, and it resumes with its own config ({Path(run_dir) / CONFIG}). These "
            f"overrides differ from it: {shown}. Leave them out to resume, or start a new run in another folder."
        )
    for key in TAKEN_FROM_COMMAND + (("trainer.epochs",) if "trainer.epochs" in given else ()):
        put(saved, key, select(config, key))
    for section in config.keys() - saved.keys():
        saved[section] = config[section]
    return saved


def all_done(epochs_done, epochs) -> bool:
    """The one rule of a finished run: a row in metrics.csv for every epoch of trainer.epochs."""
    return isinstance(epochs, int) and epochs_done >= epochs


def finished(run_dir, config) -> bool:
    """Whether the folder holds a run with all of config's trainer.epochs done (not if its metrics are damaged:
    resuming rewrites them from the checkpoint)."""
    try:
        return all_done(len(read_metrics(run_dir)), config["trainer"]["epochs"])
    except RunFolderError:
        return False


def complete(run_dir, config) -> bool:
    """Whether a submission would leave the run nothing to do: every epoch done, and a whole checkpoint of it."""
    return finished(run_dir, config) and holds_run(run_dir) and checkpoint_whole(run_dir)


def nothing_left(run_dir, epochs_done, epochs) -> str:
    return (f"Nothing left to do: {run_dir} has all {epochs_done} epochs of trainer.epochs={epochs} done. To "
            f"train on, raise it, e.g. `python -m mnist.run hydra.run.dir={run_dir} trainer.epochs={epochs_done + 3}`.")


# ---------------------------------------------------------------- finding run folders

MAX_DEPTH = 4  # multirun/<date>/<time>/<n> is three levels below multirun/


def is_run_folder(path) -> bool:
    """A folder holding config.yaml, metrics.csv or Hydra's .hydra/."""
    path = Path(path)
    return (path / CONFIG).is_file() or (path / METRICS).is_file() or (path / ".hydra").is_dir()


def _natural(path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(path) -> list[Path]:
    """The run folders at or below `path` (not inside another run folder, up to MAX_DEPTH levels down), in
    natural order."""
    path = Path(path)
    if is_run_folder(path):
        return [path]
    found = []

    def walk(folder, depth):
        try:
            children = sorted((c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_natural)
        except OSError:
            return
        for child in children:
            if is_run_folder(child):
                found.append(child)
            elif depth < MAX_DEPTH:
                walk(child, depth + 1)

    walk(path, 1)
    return sorted(found, key=lambda p: _natural(p.relative_to(path)))


def environment_job_id(run_dir) -> str | None:
    """The Slurm job (`123`, or `120_3` for an array task) environment.json says last started the run, or None."""
    try:
        slurm = json.loads((Path(run_dir) / ENVIRONMENT).read_text()).get("slurm") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if slurm.get("SLURM_ARRAY_JOB_ID") and slurm.get("SLURM_ARRAY_TASK_ID"):
        return f"{slurm['SLURM_ARRAY_JOB_ID']}_{slurm['SLURM_ARRAY_TASK_ID']}"
    return slurm.get("SLURM_JOB_ID")


def job_ids(run_dir) -> set[str]:
    """Every Slurm job that trained in the folder, as its own usage.json and environment.json name them."""
    ids = {a.job_id for a in read_usage(run_dir) if a.job_id}
    return ids | ({environment_job_id(run_dir)} - {None})


# ---------------------------------------------------------------- usage

@dataclass(frozen=True)
class RankUsage:
    """One rank's figures in one attempt, as mnist.usage measures them (bytes, seconds)."""
    host: str | None = None
    peak_rss: int = 0  # peak resident memory (a packed task's later runs: their own)
    cpu_s: float = 0.0  # user + system
    wall_s: float = 0.0  # since the process (a packed task's later runs: the run) started
    cpus: int | None = None  # the CPUs it was given
    gpu_peak: int | None = None  # torch's peak allocated on its GPU
    gpu_total: int | None = None
    updated: str | None = None


@dataclass(frozen=True)
class Task:
    """A run's place in a packed array task (mnist.launch.job): the task's start-up is paid by its first run."""
    index: int = 0
    runs: int = 1
    startup_s: float = 0.0


@dataclass(frozen=True)
class Attempt:
    """One attempt of a run (a job's start, each requeue, a resubmission or a local start) as usage.json has it."""
    id: str
    job_id: str | None = None
    restart: int = 0  # Slurm's requeues before it
    started: str | None = None  # ISO time
    end: str | None = None  # completed, stopped, interrupted, error, terminated; None: still going, or killed
    error: str | None = None  # a UserError's paragraph, or the exception's last line
    user_error: bool = False
    task: Task | None = None
    ranks: dict = field(default_factory=dict)  # {rank (text): RankUsage}

    @property
    def node_peaks(self) -> dict[str, int]:
        """{node: its peak memory}: the ranks on a node add up."""
        per_host = {}
        for rank in self.ranks.values():
            per_host[rank.host] = per_host.get(rank.host, 0) + rank.peak_rss
        return per_host

    @property
    def node_peak(self) -> int:
        """The peak memory of its fullest node (what resources.mem, a node's, must hold)."""
        return max(self.node_peaks.values(), default=0)

    @property
    def wall_s(self) -> float:
        return max((rank.wall_s for rank in self.ranks.values()), default=0.0)

    @property
    def cpu_s(self) -> float:
        return sum(rank.cpu_s for rank in self.ranks.values())

    @property
    def cpus(self) -> int | None:
        return sum(rank.cpus or 0 for rank in self.ranks.values()) or None

    @property
    def hosts(self) -> list:
        return sorted({rank.host for rank in self.ranks.values()} - {None})

    @property
    def gpu_peak(self) -> int | None:
        return max((rank.gpu_peak for rank in self.ranks.values() if rank.gpu_peak), default=None)

    @property
    def gpu_total(self) -> int | None:
        return max((rank.gpu_total for rank in self.ranks.values() if rank.gpu_peak and rank.gpu_total), default=None)

    @property
    def startup_s(self) -> float:
        """Its task's start-up (imports, the data read), 0 where not recorded."""
        return self.task.startup_s if self.task else 0.0

    @property
    def work_s(self) -> float:
        """Its own wall seconds: a task's first run has the task's start-up in its wall time, the others not."""
        first = self.task is None or self.task.index == 0
        return max(self.wall_s - (self.startup_s if first else 0.0), 0.0)


def _known(kind, data):
    """The fields of dataclass `kind` that `data` (a dict from JSON) has."""
    return {f.name: data[f.name] for f in fields(kind) if f.name in data}


def _number(value, kind, default):
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _rank_usage(data):
    known = _known(RankUsage, data)
    for name, kind, default in (("peak_rss", int, 0), ("cpu_s", float, 0.0), ("wall_s", float, 0.0)):
        known[name] = _number(known.get(name), kind, default)
    for name in ("cpus", "gpu_peak", "gpu_total"):
        known[name] = _number(known.get(name), int, None)
    return RankUsage(**known)


def _attempt(data):
    """An Attempt from usage.json's dict; None for what is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("ranks"), dict):
        return None
    known = _known(Attempt, data)
    known["id"] = str(known.get("id") or "")
    known["restart"] = _number(known.get("restart"), int, 0)
    task = known.get("task")
    known["task"] = Task(**{k: _number(v, type(getattr(Task, k)), getattr(Task, k))
                            for k, v in _known(Task, task).items()}) if isinstance(task, dict) else None
    known["ranks"] = {str(rank): _rank_usage(figures) for rank, figures in data["ranks"].items()
                      if isinstance(figures, dict)}
    return Attempt(**known)


def read_usage(run_dir) -> list:
    """The Attempts of usage.json and its ranks' files, oldest first; [] when there is none or it cannot be read
    (the figures are then Slurm's, or unknown)."""
    attempts = _read_attempts(Path(run_dir) / USAGE)
    by_id = {a["id"]: a for a in attempts}
    ranks = [a for file in sorted(Path(run_dir).glob(RANK_USAGE.format("*"))) for a in _read_attempts(file)]
    for attempt in ranks:
        if attempt["id"] in by_id:
            by_id[attempt["id"]]["ranks"].update(attempt["ranks"])
        else:
            attempts.append(by_id.setdefault(attempt["id"], attempt))
    if ranks:  # (in the order they started; one with no start known last)
        attempts.sort(key=lambda a: (not a.get("started"), str(a.get("started") or "")))
    return [attempt for attempt in map(_attempt, attempts) if attempt is not None]


def _read_attempts(path):
    """usage.json's attempts as the dicts it holds."""
    try:
        attempts = json.loads(path.read_text()).get("attempts")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(attempts, list):
        return []
    return [a for a in attempts
            if isinstance(a, dict) and isinstance(a.get("ranks"), dict) and isinstance(a.get("id"), str)]


def record_usage(run_dir, attempt_id, rank, figures, **attempt) -> None:
    """Put one rank's figures (RankUsage) into the attempt `attempt_id`, with the attempt's own fields (Attempt's:
    job_id, restart, started, end, error, user_error, task). Rank 0 writes usage.json, each other rank a file of
    its own (RANK_USAGE): ranks on several nodes never write one file, so no file system's locks are needed
    (NFS mounted nolock, Lustre's localflock). One process's writes must not overlap (mnist.usage's are in turn)."""
    unknown = set(attempt) - {f.name for f in fields(Attempt)}
    if unknown:
        raise TypeError(f"not fields of an attempt: {', '.join(sorted(unknown))}")
    if isinstance(attempt.get("task"), Task):
        attempt["task"] = asdict(attempt["task"])
    path = _usage_file(run_dir, rank)
    attempts = _read_attempts(path)
    mine = next((a for a in attempts if a.get("id") == attempt_id), None)
    if mine is None:
        mine = {"ranks": {}}
        attempts.append(mine)
    mine.update(attempt, id=attempt_id)
    mine["ranks"][str(rank)] = asdict(figures)
    _write_attempts(path, attempts[-MAX_ATTEMPTS:])


def forget_attempt(run_dir, attempt_id, rank) -> None:
    """Take back what one rank wrote of an attempt (one that found nothing to do); the attempt goes with its last
    rank."""
    path = _usage_file(run_dir, rank)
    attempts = _read_attempts(path)
    mine = [a for a in attempts if a["id"] == attempt_id]
    for attempt in mine:
        attempt["ranks"].pop(str(rank), None)
    if mine:
        _write_attempts(path, [a for a in attempts if a["id"] != attempt_id or a["ranks"]])


def _usage_file(run_dir, rank):
    """The file a rank writes its figures into: usage.json for rank 0, its own for the others."""
    return Path(run_dir) / (USAGE if str(rank) == "0" else RANK_USAGE.format(rank))


def _write_attempts(path, attempts):
    text = json.dumps({"attempts": attempts}, indent=1) + "\n"
    atomic.write_whole(path, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------- the lock

PREVIOUS_ATTEMPT_WAIT_S = 120  # a requeued job's new attempt waits this long for its old one to let go


def _describe(holder):
    job = f"Slurm job {holder['job_id']}, " if holder.get("job_id") else ""
    return f"{job}process {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"


def _read_holder(lock_file):
    lock_file.seek(0)
    try:
        holder = json.loads(lock_file.read() or "{}")
    except ValueError:
        holder = {}
    return holder if isinstance(holder, dict) else {}


def _try_lock(lock_file):
    """True if taken (or the file system has no locks); False if another process holds it."""
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # NFS mounted nolock, Lustre's localflock
            return True
        raise
    return True


def _in_use(run_dir, holder):
    return RunFolderError(
        f"{run_dir} is in use: {_describe(holder)}, is training into it. Two runs in one folder would mix "
        f"their logs, metrics and checkpoints, so this one stops here. Wait for that run to end, or stop it "
        f"({'scancel ' + str(holder['job_id']) if holder.get('job_id') else 'kill ' + str(holder.get('pid', 'PID'))}"
        f"), then run this again to resume; or start a new run in another folder."
    )


@contextlib.contextmanager
def lock(run_dir, job_id=None) -> Iterator[None]:
    """Hold the run folder for the process training into it, or raise RunFolderError naming the holder.

    The lock is an flock on `.lock`: it dies with its process, so a killed run's folder is free
    at once. A requeued job's new attempt (the same job id) waits for its old attempt to exit.
    """
    path = Path(run_dir) / LOCK
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as lock_file:
        deadline = time.monotonic() + PREVIOUS_ATTEMPT_WAIT_S
        while not _try_lock(lock_file):
            holder = _read_holder(lock_file)
            if job_id is None or str(holder.get("job_id")) != str(job_id) or time.monotonic() > deadline:
                raise _in_use(run_dir, holder)
            time.sleep(1)
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id,
                                    "since": datetime.datetime.now().isoformat(timespec="seconds")}))
        lock_file.flush()
        yield


def _held_by(run_dir):
    """{host, pid, job_id, since} of the process that holds the folder's lock now, or None (it takes the lock
    and lets go)."""
    if not (Path(run_dir) / LOCK).exists():
        return None
    with open(Path(run_dir) / LOCK, "r+") as lock_file:
        return None if _try_lock(lock_file) else _read_holder(lock_file)  # closing the file lets go


def check_free(run_dir, job_id=None) -> None:
    """Raise RunFolderError if another process trains into the folder now."""
    held = _held_by(run_dir)
    if held is not None and (job_id is None or str(held.get("job_id")) != str(job_id)):
        raise _in_use(run_dir, held)


def holder(run_dir) -> dict | None:
    """Who trains into the folder now ({host, pid, job_id, since}), or None."""
    try:
        return _held_by(run_dir)
    except OSError:
        return None


def unused(run_dir) -> bool:
    """Whether the folder holds nothing a run trained or saved (the records of its start, Hydra's .hydra/ and an
    empty log aside)."""
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return False
    bookkeeping = (".hydra", LOCK, START, USAGE)
    return all(e.name in bookkeeping or e.match(RANK_USAGE.format("*")) or (e.name == LOG and e.stat().st_size == 0)
               for e in entries)
