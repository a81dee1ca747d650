"""Tests of the local Slurm recipe (cluster/localslurm.py) against real daemons."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from slurm_fixtures import localslurm, skip_unless_slurm

pytestmark = pytest.mark.slurm

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def sbatch(cluster, *args, cwd):
    """Submit with sbatch --parsable; returns the CompletedProcess."""
    return cluster.run(["sbatch", "--parsable", *args], cwd=cwd, timeout=15)


def submit(cluster, *args, cwd) -> str:
    res = sbatch(cluster, *args, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def wait_sacct(cluster, job_id: str, timeout: float = 30) -> str:
    """Poll sacct until the job has a finished state; return it."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        res = cluster.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], timeout=10)
        assert res.returncode == 0, res.stderr
        state = res.stdout.strip().split(" ")[0] or None
        if state in FINISHED:
            return state
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not finished after {timeout}s (sacct state {state})\n"
                f"{cluster.log_tails()}")


def scontrol_state(cluster, job_id: str) -> str:
    res = cluster.run(["scontrol", "-o", "show", "job", job_id], timeout=10)
    assert res.returncode == 0, res.stderr
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    return fields["JobState"]


def wait_scontrol(cluster, job_id: str, states, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = scontrol_state(cluster, job_id)
        if state in states:
            return state
        time.sleep(0.3)
    pytest.fail(f"job {job_id} not in {states} after {timeout}s (state {state})")


def test_cluster_is_idle_and_configured(slurm_cluster):
    c = slurm_cluster
    assert c.conf_path.is_file() and c.conf_path.parent == c.folder
    assert c.env == {"SLURM_CONF": str(c.conf_path)}
    # The session's cluster: a job of an earlier test file may still be ending. After a data-parallel job was
    # requeued, Slurm 22.05 once kept the node "mixed" for minutes with no job left (CI, session 8), and it
    # still ran every later job: schedulable and without jobs is what this checks.
    state = c.wait_idle(timeout=90)
    queue = c.run(["squeue", "-h"]).stdout.strip()
    assert state in ("idle", "mixed") and not queue, (state, queue, c.run(["scontrol", "show", "node"]).stdout)
    res = c.run(["sinfo", "-h", "-o", "%P %G %c"])
    assert res.stdout.split() == [f"{c.partition}*", "gpu:1", str(c.cpus)]
    dbd = c.folder / "slurmdbd.conf"
    assert dbd.stat().st_mode & 0o777 == 0o600
    # nothing of it lives outside its folder
    config = c.run(["scontrol", "show", "config"]).stdout
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldLogFile", "SlurmdLogFile"):
        line = next(ln for ln in config.splitlines() if ln.startswith(key))
        assert str(c.folder) in line, line


def test_batch_job_completes_and_sacct_reports_it(slurm_cluster, tmp_path):
    c = slurm_cluster
    job_id = submit(c, "--job-name=hello", "--output=%x_%j.out", "--error=%x_%j.err",
                    "--time=0:1:0", "--cpus-per-task=1", "--mem=100M",
                    "--wrap", 'echo "hello from $SLURM_JOB_ID on $SLURMD_NODENAME"',
                    cwd=tmp_path)
    assert int(job_id) >= c.first_job_id
    assert wait_sacct(c, job_id) == "COMPLETED"
    out = (tmp_path / f"hello_{job_id}.out").read_text()
    assert out.strip() == f"hello from {job_id} on {c.node}"
    assert (tmp_path / f"hello_{job_id}.err").read_text() == ""
    # slurmdbd gets the step record before the job record: for a few seconds the job's
    # row reads JobName=allocation with no partition, then it is filled in.
    deadline = time.monotonic() + 20
    while True:
        res = c.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobName,Partition,ExitCode"])
        if res.stdout.strip() == f"hello|{c.partition}|0:0" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert res.stdout.strip() == f"hello|{c.partition}|0:0"


def test_gpu_job_sees_one_fake_gpu(slurm_cluster, tmp_path):
    c = slurm_cluster
    job_id = submit(c, "--gres=gpu:1", "--output=gpu_%j.out",
                    "--wrap", 'echo "CVD=$CUDA_VISIBLE_DEVICES"', cwd=tmp_path)
    assert wait_sacct(c, job_id) == "COMPLETED"
    assert (tmp_path / f"gpu_{job_id}.out").read_text().strip() == "CVD=0"


def test_two_gpus_are_refused_at_submit(slurm_cluster, tmp_path):
    res = sbatch(slurm_cluster, "--gres=gpu:2", "--wrap", "true", cwd=tmp_path)
    assert res.returncode != 0
    assert "Requested node configuration is not available" in res.stderr


def test_slurm_env_exports_slurm_conf(slurm_env):
    assert os.environ["SLURM_CONF"] == str(slurm_env.conf_path)
    res = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr


def test_cluster_without_accounting(slurm_cluster_no_accounting, slurm_cluster, tmp_path):
    c = slurm_cluster_no_accounting
    # coexists with the session cluster: own config, ports and job ids
    assert c.conf_path != slurm_cluster.conf_path
    assert c.port_base != slurm_cluster.port_base
    assert c.first_job_id != slurm_cluster.first_job_id
    assert not (c.folder / "slurmdbd.conf").exists()
    job_id = submit(c, "--job-name=noacct", "--output=%x_%j.out", "--wrap", "echo done",
                    cwd=tmp_path)
    assert int(job_id) >= c.first_job_id
    assert wait_scontrol(c, job_id, FINISHED) == "COMPLETED"
    assert (tmp_path / f"noacct_{job_id}.out").read_text().strip() == "done"
    res = c.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i %T"])
    assert res.stdout.split() == [job_id, "COMPLETED"]
    res = c.run(["sacct", "-j", job_id])
    assert res.returncode != 0
    assert "accounting storage is disabled" in (res.stdout + res.stderr)


def test_cli_up_down_stops_every_daemon(tmp_path):
    skip_unless_slurm(accounting=True)
    folder = tmp_path / "cli"
    cli = [sys.executable, str(localslurm.__file__)]

    def run(*args):
        return subprocess.run([*cli, *args, "--dir", str(folder)], capture_output=True,
                              text=True, timeout=90, cwd=tmp_path)

    up = run("up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        lines = up.stdout.splitlines()
        assert lines[0] == f"export SLURM_CONF={folder / 'slurm.conf'}"
        assert len(lines) == 2
        again = run("up")
        assert again.returncode == 0
        assert "already up" in again.stdout
        assert f"export SLURM_CONF={folder / 'slurm.conf'}" in again.stdout.splitlines()
        assert run("status").returncode == 0

        cluster = localslurm.load(folder)
        assert cluster is not None and cluster.is_up()
        daemons = json.loads((folder / "cluster.json").read_text())["pids"]
        assert set(daemons) == {"mariadbd", "slurmdbd", "slurmctld", "slurmd"}
        # a running job: its slurmstepd and its processes must go too
        job_id = submit(cluster, "--output=sleep_%j.out", "--wrap", "sleep 300", cwd=tmp_path)
        wait_scontrol(cluster, job_id, {"RUNNING"})
        assert cluster.run(["sacct", "-n", "-X", "-j", job_id]).returncode == 0
    finally:
        down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    for name, rec in daemons.items():
        assert not localslurm._alive(rec["pid"], rec["start_time"]), f"{name} still running"
    assert _processes_mentioning(str(folder)) == []
    assert run("status").returncode != 0
    assert "no cluster running" in run("down").stdout


def _processes_mentioning(text: str):
    """Live (non-zombie) processes whose command line or environment mentions text."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        if not localslurm._alive(pid):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            found.append((pid, cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found
