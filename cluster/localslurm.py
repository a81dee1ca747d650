#!/usr/bin/env python3
"""Start and stop a real Slurm cluster on this machine: one node, or several (``nodes=N``).

Everything lives under one folder: the generated ``slurm.conf`` (plus ``gres.conf`` and
``slurmdbd.conf``), the controller state, the slurmd spool, the logs, the pid files and,
with accounting, a private MariaDB (data directory and socket).  Nothing is written under
``/etc/slurm``: pointing ``SLURM_CONF`` at the generated ``slurm.conf`` is enough for
``sbatch``/``squeue``/``sacct``/``scontrol``/``scancel`` and for submitit.

Library use::

    from localslurm import start
    cluster = start("/tmp/slurm", accounting=True, gpus=1)
    subprocess.run(["sbatch", "--wrap", "hostname"], env=os.environ | cluster.env)
    cluster.stop()

Command line::

    python cluster/localslurm.py up [--dir DIR] [--no-accounting] [--gpus N] [--nodes N]
    python cluster/localslurm.py status [--dir DIR]
    python cluster/localslurm.py down [--dir DIR]
    python cluster/localslurm.py kill-node NAME [--dir DIR]       as if its power went: its slurmd and its jobs
    python cluster/localslurm.py start-node NAME [--dir DIR]
    python cluster/localslurm.py restart-controller [--dir DIR] [--down S]

Several nodes (Debian's slurmd runs several on one host: each NodeName its own Port=, %n in the
slurmd's spool, pid and log files, ``slurmd -N n1``) share this machine's CPUs and memory. Their names
n1..nN are added to /etc/hosts (127.0.0.1) so that jobs resolve them, as on a real cluster. Partitions:
``debug`` (all nodes, the default), ``short`` (tight limits: SHORT_MAX_TIME minutes, SHORT_MAX_MEM_MB per
node), ``gpu`` (the node with the fake GPUs), ``low`` (preemptible: its jobs are requeued) and ``high``
(preempts ``low``). TaskPlugin=task/affinity pins each task to its CPUs, as most sites do.

Needs (Debian): ``slurmctld slurmd slurm-client munge`` and, for accounting,
``slurmdbd mariadb-server``; must run as root (SlurmUser=root, munged as munge).
Pure standard library, Python 3.9+.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["Cluster", "start", "load", "SlurmStartError", "missing_requirements"]

DEFAULT_DIR = ".cluster"
STATE_FILE = "cluster.json"
PARTITION = "debug"
# The machine's own name, as on a real cluster: jobs can resolve it (torch.distributed's MASTER_ADDR).
NODE_NAME = socket.gethostname().split(".")[0] or "node1"
# Ports are taken from this range (below Linux' ephemeral range 32768-60999), 4 per cluster.
PORT_RANGE = (20000, 32000)
MAX_NODES = 8
N_PORTS = 3 + MAX_NODES  # slurmctld, slurmd (the first node), slurmdbd, mariadb, then the other nodes' slurmd
SHORT_MAX_TIME = 2  # minutes: the short partition's MaxTime
SHORT_MAX_MEM_MB = 1024  # the short partition's MaxMemPerNode
HOSTS = Path("/etc/hosts")
START_TIMEOUT = 60.0
# Subdirectories and files of the folder that belong to a cluster; wiped on each start.
_OWNED = ("state", "spool", "log", "run", "mariadb", "slurm.conf", "gres.conf",
          "slurmdbd.conf", STATE_FILE)
# Stop order: compute daemon first (while its controller is alive), database last.
_STOP_ORDER = ("slurmd", "slurmctld", "slurmdbd", "mariadbd")  # (slurmd-n1, ... stop with slurmd)

SLURM_BINARIES = ("slurmctld", "slurmd", "sinfo", "squeue", "scontrol", "sbatch",
                  "scancel", "munged", "munge")
ACCOUNTING_BINARIES = ("slurmdbd", "sacct", "sacctmgr", "mariadbd", "mariadb-install-db")
APT_HINT = ("apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
            " slurmdbd mariadb-server")


class SlurmStartError(RuntimeError):
    """The cluster could not be started (the message carries the daemons' log tails)."""


# --------------------------------------------------------------------------- helpers

def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def missing_requirements(accounting: bool = True) -> list[str]:
    """What stops a cluster from starting here: missing binaries, not root, ... ([] if none)."""
    problems = []
    names = SLURM_BINARIES + (ACCOUNTING_BINARIES if accounting else ())
    missing = [n for n in names if _which(n) is None]
    if missing:
        problems.append(f"missing programs: {' '.join(missing)} (install: {APT_HINT})")
    if os.geteuid() != 0:
        problems.append("must run as root (SlurmUser=root, munged started as the munge user)")
    if not os.path.exists("/etc/munge/munge.key"):
        problems.append("no /etc/munge/munge.key (install the munge package)")
    return problems


def _proc_start_time(pid: int) -> str | None:
    """Start time of a live (non-zombie) process, None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of stat: starttime


def _alive(pid: int, start_time: str | None = None) -> bool:
    st = _proc_start_time(pid)
    return st is not None and (start_time is None or st == start_time)


def _port_free(port: int) -> bool:
    for addr in ("127.0.0.1", ""):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


def _choose_port_base() -> int:
    rng = random.Random()
    lo, hi = PORT_RANGE
    for _ in range(200):
        base = rng.randrange(lo, hi - N_PORTS, N_PORTS)
        if all(_port_free(base + i) for i in range(N_PORTS)):
            return base
    raise SlurmStartError("found no free ports for the cluster")


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _mem_total_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


# Harmless lines in every start's logs (left out of the tails in error messages).
_LOG_NOISE = ("pmix", "MPI: Cannot create context", "state file", "Trying backup state",
              "fed_mgr state", "Job accounting information gathered, but not stored",
              "you have asked for it not to be stored")


def _tail(path: Path, n: int = 25, skip: Sequence[str] = ()) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if not any(s in ln for s in skip)]
    return "\n".join(lines[-n:])


def _daemon_env(conf_path: Path, node: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf_path)
    if node:  # inherited by the node's slurmstepd processes: kill_node finds its jobs by it
        env["LOCALSLURM_NODE"] = node
    return env


def _ensure_resolvable(names: Sequence[str]) -> None:
    """Node names that do not resolve get a line `127.0.0.1 n1 n2 ...  # localslurm` in /etc/hosts."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        with open(HOSTS, "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # localslurm: the nodes of a local multi-node cluster\n")


def _munge_ok() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        out = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5)
        return out.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_munge(timeout: float = 10.0) -> None:
    """Start munged (as the munge user) unless a working one is already running.

    One munged serves every cluster on the machine; it is left running afterwards.
    """
    if _munge_ok():
        return
    import grp
    import pwd
    try:
        uid = pwd.getpwnam("munge").pw_uid
        gid = grp.getgrnam("munge").gr_gid
    except KeyError as exc:
        raise SlurmStartError("no 'munge' user: install the munge package") from exc
    for d, mode in (("/run/munge", 0o755), ("/var/lib/munge", 0o711), ("/var/log/munge", 0o700)):
        os.makedirs(d, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, mode)
    munged = _which("munged") or "munged"
    errors = []
    import tempfile
    for args in ([munged], [munged, "--force"]):
        # munged daemonizes itself; its stderr goes to a file, not a pipe the daemon could
        # keep open.
        with tempfile.TemporaryFile() as err:
            try:
                res = subprocess.run(args, user=uid, group=gid, extra_groups=[], cwd="/",
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, timeout=timeout)
                rc = res.returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                rc = repr(exc)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if _munge_ok():
                    return
                time.sleep(0.1)
            err.seek(0)
            errors.append(f"{' '.join(args)}: rc={rc} "
                          f"{err.read().decode(errors='replace').strip()}")
    raise SlurmStartError("could not start munged: " + "; ".join(errors))


# --------------------------------------------------------------------------- cluster

class Cluster:
    """A running (or stopped) local Slurm cluster rooted at ``folder``."""

    def __init__(self, folder, *, name: str, port_base: int, first_job_id: int,
                 accounting: bool, gpus: int, cpus: int, real_memory: int, nodes: int = 1,
                 pids: dict[str, dict[str, object]] | None = None):
        self.folder = Path(folder).resolve()
        self.name = name
        self.port_base = port_base
        self.first_job_id = first_job_id
        self.accounting = accounting
        self.gpus = gpus
        self.cpus = cpus
        self.real_memory = real_memory
        self.nodes = nodes
        self.partition = PARTITION
        # one node: the machine's own name; several: n1..nN (NodeHostname this machine, resolved by /etc/hosts)
        self.node_names = [NODE_NAME] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.node = self.node_names[0]
        self.pids: dict[str, dict[str, object]] = dict(pids or {})
        self._procs: dict[str, subprocess.Popen] = {}
        self.start_seconds: float | None = None  # how long start() took
        self.timings: dict[str, float] = {}  # start phases: seconds since start
        self._t0 = time.monotonic()

    # ---- paths and environment
    @property
    def conf_path(self) -> Path:
        return self.folder / "slurm.conf"

    @property
    def dbd_conf_path(self) -> Path:
        return self.folder / "slurmdbd.conf"

    @property
    def log_dir(self) -> Path:
        return self.folder / "log"

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def mariadb_socket(self) -> Path:
        return self.run_dir / "mariadb.sock"

    @property
    def ports(self) -> dict[str, int]:
        b = self.port_base
        return {"slurmctld": b, "slurmd": b + 1, "slurmdbd": b + 2, "mariadb": b + 3}

    def slurmd_port(self, index: int) -> int:
        """The port of the index-th node's slurmd (the first one's is ports["slurmd"])."""
        return self.ports["slurmd"] if index == 0 else self.port_base + 3 + index

    def slurmd_name(self, node: str) -> str:
        """The name its slurmd has in ``pids``: slurmd for a one-node cluster, slurmd-<node> otherwise."""
        return "slurmd" if self.nodes == 1 else f"slurmd-{node}"

    @property
    def env(self) -> dict[str, str]:
        """Variables to merge into os.environ for Slurm commands and submitit."""
        return {"SLURM_CONF": str(self.conf_path)}

    def run(self, args: Sequence[str], timeout: float = 15, check: bool = False,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster (text output captured)."""
        env = dict(os.environ)
        env.update(kwargs.pop("env", {}) or {})
        env.update(self.env)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(list(args), env=env, timeout=timeout, check=check, **kwargs)

    def sinfo(self, timeout: float = 5) -> str:
        res = self.run(["sinfo"], timeout=timeout)
        return res.stdout + res.stderr

    def node_state(self, timeout: float = 3) -> str | None:
        """The nodes' state as sinfo reports it ('idle', 'mixed', ...; several nodes: 'idle' when all are,
        else the first other one's); None if unreachable."""
        try:
            res = self.run(["sinfo", "-h", "-N", "-n", ",".join(self.node_names), "-o", "%N %T"], timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if res.returncode != 0:
            return None
        states = dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)
        if set(states) != set(self.node_names):
            return None
        others = [state for state in states.values() if state != "idle"]
        return others[0] if others else "idle"

    def wait_idle(self, timeout: float = 60) -> str | None:
        """Wait until the node is idle: earlier jobs ended and Slurm done cleaning up after them
        (a job's node reads 'mixed' or 'completing' for a while after sacct says it ended).
        Returns the last state seen, 'idle' unless the timeout came first."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.node_state()
            if state == "idle" or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    # ---- state on disk
    def _to_json(self) -> dict:
        return {"name": self.name, "port_base": self.port_base,
                "first_job_id": self.first_job_id, "accounting": self.accounting,
                "gpus": self.gpus, "cpus": self.cpus, "real_memory": self.real_memory,
                "nodes": self.nodes, "pids": self.pids}

    def _save(self) -> None:
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self._to_json(), indent=1) + "\n")
        os.replace(tmp, self.folder / STATE_FILE)

    def running_daemons(self) -> list[str]:
        """Names of this cluster's daemons that are still alive."""
        return [n for n, rec in self.pids.items()
                if _alive(int(rec["pid"]), rec.get("start_time"))]  # type: ignore[arg-type]

    def is_up(self) -> bool:
        wanted = {"slurmctld", *map(self.slurmd_name, self.node_names)} | (
            {"slurmdbd", "mariadbd"} if self.accounting else set())
        return bool(self.pids) and wanted <= set(self.running_daemons())

    # ---- starting daemons
    def _spawn(self, name: str, args: list[str], node: str | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.out", "ab")
        try:
            proc = subprocess.Popen(args, env=_daemon_env(self.conf_path, node), cwd=str(self.folder),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        finally:
            out.close()
        self._procs[name] = proc
        start_time = None
        for _ in range(50):
            start_time = _proc_start_time(proc.pid)
            if start_time is not None or proc.poll() is not None:
                break
            time.sleep(0.01)
        self.pids[name] = {"pid": proc.pid, "start_time": start_time, "cmd": args}
        (self.run_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
        self._save()
        return proc

    def _check_running(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise SlurmStartError(f"{name} exited with code {proc.returncode}")

    def _mark(self, phase: str) -> None:
        """Record when a start phase ended (seconds since start) in self.timings."""
        self.timings[phase] = round(time.monotonic() - self._t0, 3)

    def _wait_for(self, what: str, predicate, deadline: float, daemons: Iterable[str]) -> None:
        while True:
            for d in daemons:
                self._check_running(d)
            if predicate():
                self._mark(what)
                return
            if time.monotonic() > deadline:
                raise SlurmStartError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        """True when the slurmctld answering on our port is the one using our folder."""
        try:
            res = self.run(["scontrol", "show", "config"], timeout=5)
        except subprocess.TimeoutExpired:
            return False
        for line in res.stdout.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "StateSaveLocation":
                if value.strip() != str(self.folder / "state"):
                    raise SlurmStartError(f"another slurmctld answers on port "
                                          f"{self.ports['slurmctld']}: {line.strip()}")
                return True
        return False

    def log_tails(self, n: int = 25) -> str:
        """The last ``n`` meaningful lines of each daemon log (known noise left out)."""
        parts = []
        for p in sorted(self.log_dir.glob("*")) if self.log_dir.is_dir() else []:
            if p.suffix == ".out" and p.with_suffix(".log").is_file() \
                    and p.with_suffix(".log").stat().st_size > 0:
                continue  # the daemon's stdout repeats its log file
            if p.name == "mariadb-install.out" and (self.log_dir / "mariadb.log").is_file():
                continue  # the install worked: its chatter is no help
            tail = _tail(p, n, skip=_LOG_NOISE)
            if tail.strip():
                parts.append(f"--- {p} (last lines)\n{tail}")
        return "\n".join(parts)

    # ---- stopping
    def _kill_job_processes(self, node: str | None = None) -> None:
        """Kill slurmstepd processes of this cluster left behind (and their descendants); only those of
        `node` if given."""
        marker = (f"LOCALSLURM_NODE={node}" if node else f"SLURM_CONF={self.conf_path}").encode()
        children: dict[int, list[int]] = {}
        stepds = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                comm = stat[stat.find("(") + 1:stat.rfind(")")]
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(pid)
            if comm == "slurmstepd":
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        if marker in f.read().split(b"\0"):
                            stepds.append(pid)
                except OSError:
                    pass
        victims: list[int] = []
        todo = list(stepds)
        while todo:
            pid = todo.pop()
            if pid in victims or pid == os.getpid():
                continue
            victims.append(pid)
            todo.extend(children.get(pid, []))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _cancel_jobs(self, timeout: float = 8.0) -> None:
        if "slurmctld" not in self.running_daemons():
            return
        try:
            res = self.run(["squeue", "-h", "-o", "%i"], timeout=3)
            jobs = res.stdout.split() if res.returncode == 0 else []
            if not jobs:
                return
            self.run(["scancel", *jobs], timeout=3)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                res = self.run(["squeue", "-h", "-o", "%i"], timeout=3)
                if res.returncode != 0 or not res.stdout.strip():
                    return
                time.sleep(0.3)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def _known_node(self, node: str) -> None:
        if node not in self.node_names:
            raise SlurmStartError(f"no node {node!r} in this cluster (it has {', '.join(self.node_names)})")

    def kill_node(self, node: str) -> None:
        """As if the node's power went: its slurmd and every process of its jobs are killed (SIGKILL), with no
        word to the controller, which marks the node DOWN once it misses its pings (SlurmdTimeout)."""
        self._known_node(node)
        name = self.slurmd_name(node)
        if name in self.running_daemons():
            self._signal(name, signal.SIGKILL)
            self._wait_gone(name, 5.0)
        self._kill_job_processes(node)

    def start_node(self, node: str) -> None:
        """Start a killed node's slurmd again; it rejoins once the controller hears from it."""
        self._known_node(node)
        self._spawn(self.slurmd_name(node), [_which("slurmd") or "slurmd", "-D", "-N", node], node=node)

    def stop_controller(self) -> None:
        """Stop slurmctld (SIGTERM: it saves its state). Jobs keep running on the nodes meanwhile."""
        self._signal("slurmctld", signal.SIGTERM)
        if not self._wait_gone("slurmctld", 10.0):
            self._signal("slurmctld", signal.SIGKILL)
            self._wait_gone("slurmctld", 5.0)

    def start_controller(self, timeout: float = 30) -> None:
        """Start slurmctld again on its saved state; returns once it answers."""
        self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-i"])
        self._wait_for("slurmctld to answer again", self._answers, time.monotonic() + timeout, ["slurmctld"])

    def restart_controller(self, down_s: float = 0, timeout: float = 30) -> None:
        """stop_controller, `down_s` seconds down, start_controller."""
        self.stop_controller()
        time.sleep(down_s)
        self.start_controller(timeout)

    def stop(self, grace: float = 5.0, keep_data: bool = False) -> None:
        """Stop the daemons this cluster started: SIGTERM, then SIGKILL after ``grace`` s.

        Running jobs are cancelled first; left-over job processes are killed.  The private
        MariaDB data directory is deleted unless ``keep_data``; configs and logs stay.
        """
        self._cancel_jobs()
        slurmds = sorted(n for n in self.pids if n.startswith("slurmd-"))
        names = slurmds + [n for n in _STOP_ORDER if n in self.pids] + \
            [n for n in self.pids if n not in _STOP_ORDER and n not in slurmds]
        # One at a time: slurmd while its controller is up (a slurmd without controller
        # ignores SIGTERM for minutes), the database last.
        for name in names:
            if name not in self.running_daemons():
                continue
            self._signal(name, signal.SIGTERM)
            if not self._wait_gone(name, grace):
                self._signal(name, signal.SIGKILL)
                self._wait_gone(name, 5.0)
        self._kill_job_processes()
        still = self.running_daemons()
        if still:
            raise RuntimeError(f"could not stop {', '.join(still)} of the cluster in {self.folder}")
        for n in list(self.pids):
            try:
                (self.run_dir / f"{n}.pid").unlink()
            except OSError:
                pass
        self.pids = {}
        self._procs = {}
        if self.folder.is_dir():
            self._save()
            if not keep_data:
                shutil.rmtree(self.folder / "mariadb", ignore_errors=True)

    def _signal(self, name: str, sig: int) -> None:
        rec = self.pids[name]
        if _alive(int(rec["pid"]), rec.get("start_time")):  # type: ignore[arg-type]
            try:
                os.kill(int(rec["pid"]), sig)  # type: ignore[arg-type]
            except OSError:
                pass

    def _wait_gone(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._reap(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _reap(self, name: str) -> bool:
        """True while the daemon is still alive (reaps it when it is our child)."""
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            return False
        rec = self.pids[name]
        return _alive(int(rec["pid"]), rec.get("start_time"))  # type: ignore[arg-type]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"Cluster(folder={str(self.folder)!r}, port_base={self.port_base}, "
                f"accounting={self.accounting}, gpus={self.gpus})")


# --------------------------------------------------------------------------- configs

def _slurm_conf(c: Cluster, host: str) -> str:
    f, p = c.folder, c.ports
    def_mem = max(256, min(2048, c.real_memory // max(1, c.cpus)))
    several = c.nodes > 1
    node_files = ".%n" if several else ""  # each node's slurmd its own spool, pid and log file
    lines = [
        f"# Generated by cluster/localslurm.py: a {c.nodes}-node test cluster on loopback.",
        f"ClusterName={c.name}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={p['slurmctld']}",
        f"SlurmdPort={p['slurmd']}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "AuthInfo=cred_expire=10",
        f"StateSaveLocation={f}/state",
        f"SlurmdSpoolDir={f}/spool{'/%n' if several else ''}",
        f"SlurmctldPidFile={f}/run/slurmctld.slurm.pid",
        f"SlurmdPidFile={f}/run/slurmd{node_files}.slurm.pid",
        f"SlurmctldLogFile={f}/log/slurmctld.log",
        f"SlurmdLogFile={f}/log/slurmd{node_files}.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        f"TaskPlugin={'task/affinity' if several else 'task/none'}",
        "SlurmdParameters=config_overrides",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        f"DefMemPerCPU={def_mem}",
        "JobAcctGatherType=jobacct_gather/linux",
        "JobAcctGatherParams=OverMemoryKill",
        "JobAcctGatherFrequency=task=5",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        "KillWait=5",
        "MinJobAge=600",
        "ReturnToService=2",
        "MailProg=/bin/true",
        f"FirstJobId={c.first_job_id}",
        "JobCompType=jobcomp/none",
    ]
    if several:
        # a node that stops answering is DOWN after this long; its jobs are then requeued if they asked for it
        # (--requeue: the launcher's jobs and the course's scripts do), else end NODE_FAIL (JobRequeue=0, as
        # at many sites)
        lines += ["SlurmdTimeout=20", "JobRequeue=0", "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE"]
    if c.accounting:
        lines += [
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={p['slurmdbd']}",
        ]
        if c.gpus > 0:
            lines.append("AccountingStorageTRES=gres/gpu")
    else:
        lines.append("AccountingStorageType=accounting_storage/none")
    if c.gpus > 0:
        lines.append("GresTypes=gpu")
    if not several:
        node = (f"NodeName={c.node} NodeAddr=127.0.0.1 CPUs={c.cpus} RealMemory={c.real_memory}"
                " State=UNKNOWN")
        lines += [node + (f" Gres=gpu:{c.gpus}" if c.gpus > 0 else ""),
                  f"PartitionName={c.partition} Nodes={c.node} Default=YES MaxTime=INFINITE State=UP"]
        return "\n".join(lines) + "\n"
    cpus, memory = _node_share(c)
    gpu_node = c.node_names[-1]
    for index, name in enumerate(c.node_names):
        gres = f" Gres=gpu:{c.gpus}" if c.gpus > 0 and name == gpu_node else ""
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={c.slurmd_port(index)} "
                     f"CPUs={cpus} RealMemory={memory}{gres} State=UNKNOWN")
    everyone = ",".join(c.node_names)
    lines += [
        f"PartitionName={c.partition} Nodes={everyone} Default=YES MaxTime=INFINITE State=UP PreemptMode=OFF",
        f"PartitionName=short Nodes={everyone} MaxTime={SHORT_MAX_TIME} MaxMemPerNode={SHORT_MAX_MEM_MB} State=UP "
        f"PreemptMode=OFF",
        # a preempted job gets SIGTERM and GraceTime to checkpoint, then it is killed and requeued
        f"PartitionName=low Nodes={everyone} MaxTime=INFINITE PriorityTier=1 PreemptMode=REQUEUE GraceTime=20 "
        f"State=UP",
        f"PartitionName=high Nodes={everyone} MaxTime=INFINITE PriorityTier=2 PreemptMode=OFF State=UP",
    ]
    if c.gpus > 0:
        lines.append(f"PartitionName=gpu Nodes={gpu_node} MaxTime=INFINITE State=UP PreemptMode=OFF")
    return "\n".join(lines) + "\n"


def _node_share(c: Cluster) -> tuple[int, int]:
    """(CPUs, memory in MB) of each node of a multi-node cluster: the machine's, shared out."""
    return max(1, c.cpus // c.nodes), max(256, c.real_memory // c.nodes)


_FAKE_GPU_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def _gres_conf(c: Cluster) -> str:
    """Fake GPUs: each needs a distinct *character device* File= (a regular file leaves
    CUDA_VISIBLE_DEVICES empty; no File= makes the node INVAL)."""
    if c.gpus <= 0:
        return "AutoDetect=off\n"
    node = f"NodeName={c.node_names[-1]} " if c.nodes > 1 else ""
    if c.gpus <= len(_FAKE_GPU_DEVICES):
        files = ",".join(_FAKE_GPU_DEVICES[:c.gpus])
    else:  # more than we have harmless devices for: make /dev/null look-alikes
        import stat
        for i in range(c.gpus):
            os.mknod(c.run_dir / f"fakegpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        files = f"{c.run_dir}/fakegpu[0-{c.gpus - 1}]"
    return f"AutoDetect=off\n{node}Name=gpu Count={c.gpus} File={files}\n"


def _slurmdbd_conf(c: Cluster, host: str) -> str:
    f, p = c.folder, c.ports
    return "\n".join([
        "# Generated by cluster/localslurm.py",
        "AuthType=auth/munge",
        f"DbdHost={host}",
        "DbdAddr=127.0.0.1",
        f"DbdPort={p['slurmdbd']}",
        "SlurmUser=root",
        "DebugLevel=info",
        f"LogFile={f}/log/slurmdbd.log",
        f"PidFile={f}/run/slurmdbd.slurm.pid",
        "StorageType=accounting_storage/mysql",
        "StorageHost=127.0.0.1",
        f"StoragePort={p['mariadb']}",
        "StorageUser=root",
        "StorageLoc=slurm_acct_db",
    ]) + "\n"


_MARIADB_OPTS = [
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=64M",
    "--innodb-log-file-size=16M",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--innodb-lock-wait-timeout=900",
    "--skip-log-bin",
    "--character-set-server=utf8mb4",
]


# --------------------------------------------------------------------------- start

def _wipe(folder: Path) -> None:
    for name in _OWNED:
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def load(folder) -> Cluster | None:
    """The cluster recorded in ``folder`` (running or not), None if there is none."""
    folder = Path(folder).resolve()
    try:
        data = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return Cluster(folder, **data)


def start(folder, *, accounting: bool = True, gpus: int = 1, name: str = "mnist",
          port_base: int | None = None, first_job_id: int | None = None,
          timeout: float = START_TIMEOUT, cpus: int | None = None, nodes: int = 1) -> Cluster:
    """Start a fresh cluster of ``nodes`` nodes under ``folder`` and wait until its nodes are idle.

    ``cpus``: the CPUs the node offers (default: this machine's), shared out between the nodes
    of a multi-node cluster; more than the machine has lets more small jobs run at once, as tests want.

    Raises SlurmStartError (a RuntimeError) with the daemons' log tails on failure; the
    daemons started so far are stopped again.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    problems = missing_requirements(accounting)
    if problems:
        raise SlurmStartError("; ".join(problems))
    if not 1 <= nodes <= MAX_NODES:
        raise SlurmStartError(f"nodes={nodes}: a local cluster has 1 to {MAX_NODES} nodes")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    old = load(folder)
    if old is not None and old.running_daemons():
        raise SlurmStartError(f"a cluster is already running in {folder} "
                              f"({', '.join(old.running_daemons())}); stop it first")
    if len(str(folder / "run" / "mariadb.sock")) > 100:
        raise SlurmStartError(f"folder path too long for unix sockets: {folder}")
    _wipe(folder)
    for d in ("state", "spool", "log", "run"):
        (folder / d).mkdir()
    os.chmod(folder / "state", 0o700)

    ensure_munge()
    if port_base is None:
        port_base = _choose_port_base()
    else:
        busy = [port_base + i for i in range(N_PORTS) if not _port_free(port_base + i)]
        if busy:
            raise SlurmStartError(f"ports in use: {busy} (port_base={port_base} needs "
                                  f"{port_base}..{port_base + N_PORTS - 1} free)")
    if first_job_id is None:
        # distinct per instance (submitit caches job states by id); below MaxJobId (67043328)
        first_job_id = (port_base % 60000) * 1000 + 1
    cpus = cpus or os.cpu_count() or 1
    real_memory = max(512, int(_mem_total_mb() * 0.95))
    cluster = Cluster(folder, name=name, port_base=port_base, first_job_id=first_job_id,
                      accounting=accounting, gpus=gpus, cpus=cpus, real_memory=real_memory, nodes=nodes)
    cluster._t0 = t0
    if nodes > 1:
        _ensure_resolvable(cluster.node_names)
        for node in cluster.node_names:
            (folder / "spool" / node).mkdir()
    host = socket.gethostname().split(".")[0]
    cluster.conf_path.write_text(_slurm_conf(cluster, host))
    (folder / "gres.conf").write_text(_gres_conf(cluster))
    cluster._save()

    try:
        if accounting:
            cluster.dbd_conf_path.write_text(_slurmdbd_conf(cluster, host))
            os.chmod(cluster.dbd_conf_path, 0o600)
            _start_mariadb(cluster, deadline)
            cluster._spawn("slurmdbd", [_which("slurmdbd") or "slurmdbd", "-D"])
            cluster._wait_for("slurmdbd to listen", lambda: _port_open(cluster.ports["slurmdbd"]),
                              deadline, ["mariadbd", "slurmdbd"])
        cluster._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-i"])
        for node in cluster.node_names:
            cluster.start_node(node)
        daemons = list(cluster._procs)
        cluster._wait_for("the node to be idle",
                          lambda: cluster.node_state() == "idle", deadline, daemons)
        # make sure it is our controller that answered (not another one on these ports)
        cluster._wait_for("our slurmctld to answer", cluster._answers, deadline, daemons)
        if accounting:
            cluster._wait_for("the cluster to be registered in slurmdbd",
                              lambda: _registered(cluster), deadline, daemons)
    except BaseException as exc:
        tails = cluster.log_tails()
        try:
            cluster.stop(grace=2, keep_data=True)
        except Exception:
            pass
        if isinstance(exc, SlurmStartError):
            raise SlurmStartError(f"local Slurm cluster in {folder} failed to start: {exc}\n"
                                  f"{tails}") from None
        raise
    cluster.start_seconds = round(time.monotonic() - t0, 3)
    if os.environ.get("LOCALSLURM_DEBUG"):
        print(f"localslurm: started in {cluster.start_seconds}s {cluster.timings}",
              file=sys.stderr)
    return cluster


def _start_mariadb(c: Cluster, deadline: float) -> None:
    datadir = c.folder / "mariadb"
    install = [_which("mariadb-install-db") or "mariadb-install-db", "--no-defaults",
               f"--datadir={datadir}", "--user=root", "--auth-root-authentication-method=normal",
               "--skip-test-db", *_MARIADB_OPTS]
    with open(c.log_dir / "mariadb-install.out", "wb") as out:
        res = subprocess.run(install, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, cwd=str(c.folder),
                             timeout=max(5.0, deadline - time.monotonic()))
    if res.returncode != 0:
        raise SlurmStartError(f"mariadb-install-db failed (rc={res.returncode})")
    c._mark("mariadb-install-db")
    c._spawn("mariadbd", [
        _which("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={datadir}",
        "--user=root", "--bind-address=127.0.0.1", f"--port={c.ports['mariadb']}",
        f"--socket={c.mariadb_socket}", f"--pid-file={c.run_dir / 'mariadbd.mariadb.pid'}",
        f"--log-error={c.log_dir / 'mariadb.log'}", *_MARIADB_OPTS])
    c._wait_for("mariadb to listen", lambda: _port_open(c.ports["mariadb"]), deadline,
                ["mariadbd"])


def _registered(c: Cluster) -> bool:
    try:
        res = c.run(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and c.name in res.stdout.split()


# --------------------------------------------------------------------------- CLI

def _cmd_up(args) -> int:
    folder = Path(args.dir).resolve()
    old = load(folder)
    if old is not None and old.running_daemons():
        if old.is_up():
            print(f"cluster already up in {folder}")
        else:
            print(f"cluster in {folder} is partly up ({', '.join(old.running_daemons())}); "
                  f"run 'down' then 'up' again", file=sys.stderr)
            return 1
        cluster = old
    else:
        try:
            cluster = start(folder, accounting=not args.no_accounting, gpus=args.gpus,
                            name=args.name, nodes=args.nodes)
        except SlurmStartError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        # The daemons are our children only until we exit; they keep running after.
        cluster._procs = {}
    print(f"export SLURM_CONF={cluster.conf_path}")
    print(f"# then sbatch/squeue/sacct use it; stop with: python {sys.argv[0]} down --dir {folder}")
    return 0


def _cmd_down(args) -> int:
    folder = Path(args.dir).resolve()
    cluster = load(folder)
    if cluster is None or not cluster.running_daemons():
        print(f"no cluster running in {folder}")
        return 0
    cluster.stop()
    print(f"cluster in {folder} stopped")
    return 0


def _on_running(args, act, done: str) -> int:
    """Do `act(cluster)` to the cluster running in args.dir; print `done`, or why not (exit status 1)."""
    folder = Path(args.dir).resolve()
    cluster = load(folder)
    if cluster is None or not cluster.running_daemons():
        print(f"no cluster running in {folder}", file=sys.stderr)
        return 1
    try:
        act(cluster)
    except SlurmStartError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    cluster._procs = {}  # the daemons it started are our children only until we exit; they keep running
    print(done)
    return 0


def _cmd_kill_node(args) -> int:
    return _on_running(args, lambda c: c.kill_node(args.name),
                       f"node {args.name} killed (its slurmd and its jobs' processes); the controller marks it DOWN "
                       f"when it misses its pings. Start it again with: python {sys.argv[0]} start-node {args.name} "
                       f"--dir {args.dir}")


def _cmd_start_node(args) -> int:
    return _on_running(args, lambda c: c.start_node(args.name), f"node {args.name}: slurmd started")


def _cmd_restart_controller(args) -> int:
    return _on_running(args, lambda c: c.restart_controller(down_s=args.down),
                       f"slurmctld restarted (down {args.down:g} s)")


def _cmd_status(args) -> int:
    folder = Path(args.dir).resolve()
    cluster = load(folder)
    if cluster is None or not cluster.running_daemons():
        print(f"no cluster running in {folder}")
        return 1
    print(f"SLURM_CONF={cluster.conf_path} daemons: {' '.join(cluster.running_daemons())}")
    try:
        print(cluster.sinfo(), end="")
    except subprocess.TimeoutExpired:
        print("sinfo timed out (slurmctld not answering)")
        return 1
    return 0 if cluster.is_up() else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localslurm.py",
                                     description="A real Slurm cluster (one node or several) in a folder.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster in the background")
    up.add_argument("--no-accounting", action="store_true", help="no slurmdbd/mariadb (no sacct)")
    up.add_argument("--gpus", type=int, default=1, help="fake GPUs on the node (default 1)")
    up.add_argument("--name", default="mnist", help="ClusterName (default mnist)")
    up.add_argument("--nodes", type=int, default=1, help=f"nodes, sharing this machine (1 to {MAX_NODES}; default 1)")
    for name, help_ in (("down", "stop the cluster"), ("status", "show daemons and sinfo")):
        sub.add_parser(name, help=help_)
    for name, help_ in (("kill-node", "kill a node's slurmd and its jobs' processes, as if its power went"),
                        ("start-node", "start a killed node's slurmd again")):
        sub.add_parser(name, help=help_).add_argument("name", help="the node (n1, n2, ...)")
    restart = sub.add_parser("restart-controller", help="stop slurmctld, wait, start it again on its saved state")
    restart.add_argument("--down", type=float, default=0, help="seconds to stay down (default 0)")
    for p in sub.choices.values():
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "kill-node": _cmd_kill_node,
            "start-node": _cmd_start_node, "restart-controller": _cmd_restart_controller}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
