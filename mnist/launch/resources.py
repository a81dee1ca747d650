"""What a job asks Slurm for: conf/resources/ checked and turned into sbatch options.

Pure functions of the config (unit-tested), plus `check_cluster`, which asks the cluster
itself (sinfo) about partitions and GPUs before anything is submitted.
"""
import math
import re
import shutil
import subprocess

from mnist.errors import UserError

MEMORY = re.compile(r"(\d+)([KMGT]?)", re.IGNORECASE)
TIME = re.compile(r"(?:(\d+)-)?(\d+(?::\d+){0,2})")
OPTION_NAME = re.compile(r"[a-z][a-z0-9_-]*")


class ResourceError(UserError):
    pass


def time_seconds(value):
    """Seconds in a Slurm time limit: minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    text = str(value).strip()
    match = TIME.fullmatch(text)
    if isinstance(value, bool) or not match:
        raise ResourceError(
            f"resources.time={value!r} is not a Slurm time limit. Write minutes (90), H:M:S (0:5:0) "
            f"or D-H:M:S (1-12:00:00), e.g. resources.time=0:15:0."
        )
    days, parts = match.group(1), [int(p) for p in match.group(2).split(":")]
    if days is None:
        units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
        seconds = sum(p * u for p, u in zip(parts, units))
    else:
        seconds = int(days) * 86400 + sum(p * u for p, u in zip(parts, (3600, 60, 1)))
    if seconds <= 0:
        raise ResourceError(f"resources.time={value!r} is no time at all. Give the job e.g. resources.time=0:15:0.")
    return seconds


def memory(value):
    """A Slurm memory request as sbatch takes it: a whole number with an optional K/M/G/T."""
    text = str(value).strip()
    match = MEMORY.fullmatch(text)
    if isinstance(value, bool) or not match or int(match.group(1)) == 0:
        raise ResourceError(
            f"resources.mem={value!r} is not a memory size Slurm understands. Write a whole number "
            f"with K, M, G or T (megabytes without one), e.g. resources.mem=3G."
        )
    return match.group(1) + match.group(2).upper()


def _count(resources, key, minimum):
    value = resources[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " (0 for none)" if minimum == 0 else ""
        raise ResourceError(
            f"resources.{key}={value!r} is not a whole number >= {minimum}. "
            f"Set e.g. resources.{key}={max(minimum, 1)}{none}."
        )
    return value


def _name(resources, key):
    value = resources[key]
    if value is None:
        return None
    if not re.fullmatch(r"[\w.,:&|()!*-]+", str(value)):
        raise ResourceError(
            f"resources.{key}={value!r} has characters no Slurm {key} name has (spaces, quotes, ...). "
            f"Write the name as Slurm lists it ({_LISTED_BY[key]}), e.g. resources.{key}={_EXAMPLE[key]}, "
            f"or resources.{key}=null to leave it to the cluster."
        )
    return str(value)


_LISTED_BY = {"partition": "`sinfo -s`", "account": "`sacctmgr show assoc user=$USER`",
              "qos": "`sacctmgr show qos`", "constraint": "node features in `sinfo -o %f`"}
_EXAMPLE = {"partition": "long", "account": "proj1", "qos": "normal", "constraint": "v100"}


def sbatch_options(resources):
    """The sbatch options (submitit's parameter names) a resources config asks for."""
    options = {
        "time": math.ceil(time_seconds(resources.time) / 60),
        "cpus_per_task": _count(resources, "cpus_per_task", 1),
        "mem": memory(resources.mem),
        "nodes": _count(resources, "nodes", 1),
        "ntasks_per_node": _count(resources, "tasks_per_node", 1),
    }
    gpus = _count(resources, "gpus_per_node", 0)
    if gpus:
        options["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        if _name(resources, key) is not None:
            options[key] = _name(resources, key)
    return options


def extra_options(resources):
    """resources.extra: any other sbatch option, {name: value}; true means a bare flag."""
    extra = {}
    for key, value in (resources.extra or {}).items():
        if not OPTION_NAME.fullmatch(str(key)):
            raise ResourceError(
                f"resources.extra has the option name {key!r}, which is no sbatch option name: those are "
                f"lower case, without the leading --, like mail-type. Write e.g. "
                f"'+resources.extra={{mail-type: END}}' (see `man sbatch`)."
            )
        if value is None or value is False:
            continue
        extra[str(key).replace("_", "-")] = value if value is True else str(value)
    return extra


def _sinfo(fields):
    try:
        out = subprocess.run(["sinfo", "-h", "-o", fields], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        raise ResourceError("Slurm does not answer (sinfo timed out after 20 s). Is slurmctld up? Try `sinfo`.") from None
    if out.returncode != 0:
        raise ResourceError(f"sinfo failed: {out.stderr.strip() or out.stdout.strip()}. Check that Slurm is up with `sinfo`.")
    return [line.split("|") for line in out.stdout.splitlines() if line.strip()]


def check_cluster(resources):
    """Before submitting: sbatch exists, the partition exists, GPUs exist if asked for."""
    if shutil.which("sbatch") is None:
        raise ResourceError(
            "launcher=slurm needs Slurm's `sbatch`, and there is none on PATH here. Run this on the cluster's "
            "login node, train here with launcher=local, or start a one-node Slurm with `make cluster-up` "
            "and `export SLURM_CONF=...` as it prints."
        )
    rows = _sinfo("%R|%G")
    partitions = sorted({name for name, _ in rows})
    partition = resources.partition
    if partition is not None and str(partition) not in partitions:
        raise ResourceError(
            f"resources.partition={partition!r}: this cluster has no such partition. It has: "
            f"{', '.join(partitions)}. Set one of them, or resources.partition=null for the default."
        )
    gpus = resources.gpus_per_node
    if gpus:
        pool = [gres for name, gres in rows if partition is None or name == str(partition)]
        if not any("gpu" in gres for gres in pool):
            where = f"partition {partition}" if partition is not None else "this cluster"
            raise ResourceError(
                f"resources.gpus_per_node={gpus}, but {where} has no GPUs (sinfo lists none). "
                f"Use resources=cpu, or pick a GPU partition with resources.partition=..."
            )


# slurmctld checks time limits every 30 s and sends --signal's warning at the first check that
# finds the job within (delay + 30 s) of its end: with a delay of half a 1-minute limit, the
# signal came 0.2 s after the start (before Python could handle it: the job died of USR2).
SLURM_CHECK_S = 30


def signal_delay(wanted_s, limit_s):
    """The --signal delay: as wanted, but short enough that the signal never comes before about half
    the job's limit has passed (a quarter, for limits under two minutes)."""
    return min(wanted_s, max(limit_s // 2 - SLURM_CHECK_S, limit_s // 4))
