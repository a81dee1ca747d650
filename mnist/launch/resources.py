"""What a job asks Slurm for: conf/resources/ checked and turned into sbatch options.

Pure functions of the config (unit-tested), plus `ask_cluster`, which asks the cluster itself
(one sinfo call) about its partitions and nodes, and `check_cluster`, which refuses what they cannot
hold before anything is submitted.
"""
import math
import re
import shutil
import sys
from dataclasses import dataclass

from mnist import figures
from mnist.errors import UserError

OPTION_NAME = re.compile(r"[a-z][a-z0-9_-]*")


class ResourceError(UserError):
    pass


def time_seconds(value) -> int:
    """Seconds in a Slurm time limit: minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    seconds = figures.duration_s(value)
    if seconds is None or "." in str(value):
        raise ResourceError(
            f"resources.time={value!r} is not a Slurm time limit. Write minutes (90), H:M:S (0:5:0) "
            f"or D-H:M:S (1-12:00:00), e.g. resources.time=0:15:0."
        )
    if seconds <= 0:
        raise ResourceError(f"resources.time={value!r} is no time at all. Give the job e.g. resources.time=0:15:0.")
    return seconds


def memory(value) -> str:
    """A Slurm memory request as sbatch takes it: a whole number with an optional K/M/G/T."""
    text = str(value).strip()
    match = figures.MEMORY.fullmatch(text)
    if isinstance(value, bool) or not match or not match.group(1).isdigit() or text[-1] in "nNcCpP" \
            or int(match.group(1)) == 0:
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


def sbatch_options(resources) -> dict:
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


def extra_options(resources) -> dict[str, str | bool]:
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


def check_gpus(resources, device) -> None:
    """Each rank trains on a GPU of its own, and trainer.device=cuda needs one: refused here, not on the node."""
    gpus, tasks = resources.gpus_per_node, resources.tasks_per_node
    if device == "cuda" and not gpus:
        raise ResourceError(
            "trainer.device=cuda, but the job asks Slurm for no GPU (resources.gpus_per_node=0), so it would stop on "
            "the node after its wait in the queue. Ask for one with resources=gpu, or train on the CPU with "
            "trainer.device=cpu (or auto, which is the CPU in a job without GPUs)."
        )
    if gpus and gpus != tasks:
        why = ("ranks would share a GPU and NCCL stops with \"Duplicate GPU detected\"" if tasks > gpus
               else f"{gpus - tasks} of the GPUs would sit idle")
        raise ResourceError(
            f"resources.tasks_per_node={tasks} with resources.gpus_per_node={gpus}: each rank trains on a GPU of its "
            f"own, so {why}. Set resources.tasks_per_node={gpus} (one rank per GPU), or "
            f"resources.gpus_per_node={tasks}."
        )


# One sinfo call says everything checked before submitting: partition (default marked *), CPUs, memory (MB),
# generic resources and node count of each group of identical nodes (-e: exact, not "the smallest, +").
SINFO_FIELDS = "%P|%c|%m|%G|%D"


@dataclass
class Nodes:
    """A group of identical nodes of a partition, as sinfo lists them, with the partition's limits (scontrol)."""

    partition: str
    cpus: int
    memory_mb: int
    gpus: int
    count: int
    default: bool = False
    max_time_s: int | None = None  # MaxTime; None: none
    max_mem: int | None = None  # MaxMemPerNode in bytes; None: none


def _number(text):
    return int(re.match(r"\d*", text).group(0) or 0)


def gpu_count(gres) -> int:
    """GPUs in an sinfo GRES field: `gpu:1`, `gpu:a100:4(S:0-1)`, `gpu:a100:2,gpu:v100:2`, `(null)`."""
    items = re.split(r",(?![^(]*\))", gres)
    return sum(_number(item.split("(")[0].split(":")[-1]) for item in items if item.split(":")[0] == "gpu")


def parse_sinfo(rows) -> list[Nodes]:
    return [Nodes(partition.rstrip("*"), _number(cpus), _number(memory), gpu_count(gres), _number(count),
                  partition.endswith("*")) for partition, cpus, memory, gres, count in rows]


def _sinfo(fields):
    from mnist.launch import gateway

    out, problem = gateway.call(["sinfo", "-h", "-e", "-o", fields])
    if problem:
        raise ResourceError(gateway.unreachable(problem, "the request cannot be checked against its nodes"))
    return [line.split("|") for line in out.splitlines() if line.strip()]


def _partition_limits() -> dict[str | None, dict]:
    """{partition name (None: the default): {"time": s, "mem": bytes per node}, None where it has no such limit}
    from one `scontrol show partition -o`; {} where Slurm does not answer."""
    from mnist.launch import gateway

    out, _ = gateway.call(["scontrol", "show", "partition", "-o"])
    limits = {}
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        limit = {"time": figures.duration_s(fields.get("MaxTime", "")),
                 "mem": figures.memory_bytes(fields.get("MaxMemPerNode", ""), "M")}
        limits[fields.get("PartitionName")] = limit
        if fields.get("Default") == "YES":
            limits[None] = limit
    return limits


def ask_cluster(dry_run=False) -> list[Nodes] | None:
    """The cluster's nodes (one sinfo call) with their partitions' limits (one scontrol call). A dry run without
    a reachable Slurm says so and returns None."""
    try:
        if shutil.which("sbatch") is None:
            raise ResourceError(
                "launcher=slurm needs Slurm's `sbatch`, and there is none on PATH here. Run this on the cluster's "
                "login node, train here with launcher=local, or start a one-node Slurm with `make cluster-up` "
                "and `export SLURM_CONF=...` as it prints."
            )
        nodes = parse_sinfo(_sinfo(SINFO_FIELDS))
        limits = _partition_limits()
        for group in nodes:
            group.max_time_s = limits.get(group.partition, {}).get("time")
            group.max_mem = limits.get(group.partition, {}).get("mem")
        return nodes
    except ResourceError as e:
        if not dry_run:
            raise
        last = str(e).strip().splitlines()[-1]
        print(f"(dry run: the request is not checked against a cluster: {last})", file=sys.stderr)
        return None


def limits_by_partition(nodes) -> dict[str | None, dict]:
    """{partition (None: the default): {"time": MaxTime s, "mem": MaxMemPerNode bytes}} of ask_cluster's nodes."""
    limits = {}
    for group in nodes or []:
        limit = {"time": group.max_time_s, "mem": group.max_mem}
        limits[group.partition] = limit
        if group.default:
            limits[None] = limit
    return limits


def check_cluster(resources, nodes) -> None:
    """The partition exists, has GPUs if asked for, and has a node that holds one node's share of the request."""
    partitions = sorted({n.partition for n in nodes})
    partition = resources.partition
    if partition is not None and str(partition) not in partitions:
        raise ResourceError(
            f"resources.partition={partition!r}: this cluster has no such partition. It has: "
            f"{', '.join(partitions)}. Set one of them, or resources.partition=null for the default."
        )
    pool = partition_nodes(resources, nodes)
    where = f"partition {pool[0].partition}" if pool else "this cluster"
    if resources.gpus_per_node and not any(n.gpus for n in pool or nodes):
        raise ResourceError(
            f"resources.gpus_per_node={resources.gpus_per_node}, but {where} has no GPUs (sinfo lists none). "
            f"Use resources=cpu, or pick a GPU partition with resources.partition=..."
        )
    if pool:
        _check_fits(resources, pool[0].partition, pool)
        check_limits(resources, time_seconds(resources.time), nodes)


def check_limits(resources, time_s, nodes, what="", time_fix="") -> None:
    """Refuse a time over the partition's MaxTime or memory over its MaxMemPerNode (Slurm would leave the job
    pending for ever, PartitionTimeLimit), naming the limit and a partition that would take the job.
    `time_s`: what the job asks (a packed task: its runs' sum), `what` and `time_fix`: the words for it and its fix."""
    pool = partition_nodes(resources, nodes)
    partition, limit_s, limit_mem = pool[0].partition, pool[0].max_time_s, pool[0].max_mem
    mem = memory_bytes_of(resources.mem)
    over = []
    if limit_s and time_s > limit_s:
        over.append((f"{what or f'resources.time={resources.time}'} is over partition {partition}'s MaxTime of "
                     f"{figures.limit_text(limit_s)}", time_fix or f"resources.time={figures.limit_text(limit_s)}"))
    if limit_mem and mem > limit_mem:
        over.append((f"resources.mem={resources.mem} is over partition {partition}'s MaxMemPerNode of "
                     f"{figures.memory_text(limit_mem, at_most=True)}",
                     f"resources.mem={figures.memory_text(limit_mem, at_most=True)}"))
    if not over:
        return
    takers = sorted({(not n.default, n.partition) for n in nodes if n.partition != partition and _holds(resources, n)
                     and (not n.max_time_s or time_s <= n.max_time_s) and (not n.max_mem or mem <= n.max_mem)})
    elsewhere = f", or a partition that takes it: resources.partition={takers[0][1]}" if takers else ""
    raise ResourceError(
        f"{' and '.join(why for why, _ in over)}: Slurm would refuse the job or keep it pending for ever. "
        f"Ask for what fits, {' '.join(fix for _, fix in over)}{elsewhere} (`scontrol show partition` lists "
        f"the limits)."
    )


def _shares(resources, nodes) -> int:
    """How many of the request's node shares (its CPUs, memory and GPUs on one node) a node of this group holds."""
    cpus, gpus = resources.cpus_per_task * resources.tasks_per_node, resources.gpus_per_node
    return min(nodes.cpus // cpus, nodes.memory_mb // memory_mb_of(resources.mem), nodes.gpus // gpus if gpus
               else nodes.cpus)


def _holds(resources, nodes) -> bool:
    """Whether a node of this group holds one node's share of the request."""
    return _shares(resources, nodes) >= 1


def partition_nodes(resources, nodes) -> list[Nodes]:
    """The nodes of the partition the request names (the default one for resources.partition=null)."""
    partition = resources.partition
    return [n for n in nodes if (n.default if partition is None else n.partition == str(partition))]


def max_time_s(resources, nodes) -> int | None:
    """The MaxTime of the request's partition in seconds; None where it has none or the cluster is not known."""
    pool = partition_nodes(resources, nodes or [])
    return pool[0].max_time_s if pool else None


def runs_within(per_task, run_limit_s, limit_s) -> int:
    """How many runs a task may pack: `per_task`, or fewer where their summed time limits (a task asks for the
    sum) would pass the partition's MaxTime `limit_s` (None: no limit); at least 1."""
    if limit_s and per_task * run_limit_s > limit_s:
        return max(1, limit_s // run_limit_s)
    return per_task


def jobs_at_once(resources, nodes) -> int:
    """How many jobs of this request the nodes of its partition hold at the same time (each node holding as
    many as its CPUs, memory and GPUs allow; a job of several nodes takes that many); 0 if none fits."""
    return sum(n.count * _shares(resources, n) for n in partition_nodes(resources, nodes)) // resources.nodes


def _check_fits(resources, partition, pool):
    """Refuse what no node of the partition can hold: Slurm would keep it pending for ever (PartitionConfig)."""
    cpus = resources.cpus_per_task * resources.tasks_per_node
    gpus = resources.gpus_per_node
    fits = any(_holds(resources, n) for n in pool)
    nodes = sum(n.count for n in pool)
    if fits and resources.nodes <= nodes:
        return
    most = Nodes(partition, max(n.cpus for n in pool), max(n.memory_mb for n in pool), max(n.gpus for n in pool), nodes)
    raise ResourceError(
        f"No node of partition {partition} can hold this job: it asks for {resources.nodes} node(s) with "
        f"{cpus} CPU(s) (resources.cpus_per_task={resources.cpus_per_task} x resources.tasks_per_node="
        f"{resources.tasks_per_node}), {resources.mem} of memory and {gpus} GPU(s) each, and the partition has "
        f"{nodes} node(s), the largest with {most.cpus} CPUs, {most.memory_mb}M of memory and {most.gpus} GPU(s). "
        f"Slurm would keep it pending for ever (reason PartitionConfig). Ask for what fits, "
        f"e.g. {_fitting(resources, most)}, or another partition (resources.partition=...; "
        f"`sinfo -e -o '%P %D %c %m %G'` lists them)."
    )


def _fitting(resources, most):
    """The overrides that bring the request within the partition's largest node (one rank per GPU kept)."""
    tasks, fixes = resources.tasks_per_node, []
    if resources.nodes > most.count:
        fixes.append(f"resources.nodes={most.count}")
    if resources.gpus_per_node > most.gpus:
        fixes.append(f"resources.gpus_per_node={most.gpus}")
        tasks = max(1, most.gpus) if tasks == resources.gpus_per_node else tasks
    tasks = min(tasks, most.cpus)
    if tasks != resources.tasks_per_node:
        fixes.append(f"resources.tasks_per_node={tasks}")
    if resources.cpus_per_task * tasks > most.cpus:
        fixes.append(f"resources.cpus_per_task={most.cpus // tasks}")
    if memory_mb_of(resources.mem) > most.memory_mb:
        fixes.append(f"resources.mem={most.memory_mb}M")
    return " ".join(fixes)


def memory_bytes_of(value) -> int:
    """A Slurm memory request (checked, as `memory`) in bytes; megabytes, sbatch's unit, when none is given."""
    return figures.memory_bytes(memory(value), "M")


def memory_mb_of(value) -> int:
    """A Slurm memory request in whole megabytes."""
    return math.ceil(memory_bytes_of(value) / 2**20)


# slurmctld checks time limits every 30 s and sends --signal's warning at the first check that
# finds the job within (delay + 30 s) of its end: with a delay of half a 1-minute limit, the
# signal came 0.2 s after the start (before Python could handle it: the job died of USR2).
SLURM_CHECK_S = 30


def signal_delay(wanted_s, limit_s) -> int:
    """The --signal delay: as wanted, but short enough that the signal never comes before about half
    the job's limit has passed (a quarter, for limits under two minutes)."""
    return min(wanted_s, max(limit_s // 2 - SLURM_CHECK_S, limit_s // 4))
