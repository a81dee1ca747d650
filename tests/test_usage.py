"""A run's own record of what it used (mnist/usage.py -> usage.json, owned by mnist/rundir.py)."""
import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import run, write_dataset

from mnist import atomic, rundir, usage
from mnist.errors import UserError


def resident_now():
    """This process's resident memory now (its peak so far may be higher: a long test session's)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmRSS:"))


def test_a_process_knows_when_it_started_to_the_clock_tick():
    """Not to the second: /proc/stat's btime is whole seconds, and a start-up read from it was up to 1 s long."""
    code = "import time; from mnist import usage; print(usage.process_started(), time.time())"
    before = time.time()
    started, child_now = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                    check=True).stdout.split())
    tick = 1 / os.sysconf("SC_CLK_TCK")  # /proc/self/stat counts whole ticks
    assert before - 2 * tick <= started <= child_now


def test_a_block_records_its_peak_cpu_and_wall_and_how_it_ended(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    before = resident_now()
    with usage.recording(tmp_path):
        block = bytearray(200 * 2**20)  # 200 MiB, touched
        block[::4096] = b"x" * len(block[::4096])
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:  # CPU time
            pass
    [attempt] = rundir.read_usage(tmp_path)
    assert (attempt.id, attempt.job_id, attempt.restart, attempt.end) == ("77#2", "77", 2, "completed")
    figures = attempt.ranks["0"]
    assert figures.peak_rss >= before + 200 * 2**20 * 0.95
    assert figures.cpu_s >= 0.3 and figures.wall_s >= figures.cpu_s / figures.cpus
    del block


PACKED_RUNS = """
import sys, time
from mnist import usage
if sys.argv[2] == "sampled":
    usage.reset_peak = lambda: False  # a kernel without clear_refs: the watcher's samples
task = {"runs": 2, "startup_s": 1.0, "started": time.time()}
with usage.recording(sys.argv[1] + "/big", {**task, "index": 0}):
    block = bytearray(300 * 2**20)
    block[::4096] = b"x" * len(block[::4096])
    del block
with usage.recording(sys.argv[1] + "/small", {**task, "index": 1, "started": time.time()}):
    time.sleep(0.2)
"""


@pytest.mark.parametrize("how", ["reset", "sampled"])
def test_each_packed_run_records_its_own_peak_not_the_largest_before_it(tmp_path, how):
    """Two runs of one packed task, a big one then a small one: the small one's peak is its own (it read the
    big one's 300M: VmHWM is the whole process's)."""
    for name in ("big", "small"):
        (tmp_path / name).mkdir()
    subprocess.run([sys.executable, "-c", PACKED_RUNS, str(tmp_path), how], check=True, timeout=60)
    [big], [small] = (rundir.read_usage(tmp_path / name) for name in ("big", "small"))
    assert big.node_peak > 300 * 2**20
    assert small.node_peak < big.node_peak - 250 * 2**20, (small, big)


@pytest.mark.parametrize("error, recorded, user", [
    (ValueError("first line\nbad value 3"), "ValueError: bad value 3", False),
    (UserError("data.root=/x holds no MNIST. Run `python -m mnist.data download`."),
     "data.root=/x holds no MNIST. Run `python -m mnist.data download`.", True),
])
def test_an_error_is_recorded_as_its_last_line_or_its_paragraph(tmp_path, error, recorded, user):
    with pytest.raises(type(error)):
        with usage.recording(tmp_path):
            raise error
    [attempt] = rundir.read_usage(tmp_path)
    assert (attempt.end, attempt.error, attempt.user_error) == ("error", recorded, user)


def test_each_rank_writes_its_own_figures_into_the_same_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("RANK", raising=False)  # (submitit exports it only once the run starts, after the recorder)
    for rank in ("0", "1"):
        monkeypatch.setenv("SLURM_PROCID", rank)
        with usage.recording(tmp_path):
            pass
    [attempt] = rundir.read_usage(tmp_path)
    assert sorted(attempt.ranks) == ["0", "1"]


def test_a_one_task_job_is_rank_0_whatever_rank_the_submitting_shell_had(tmp_path, monkeypatch):
    """sbatch passes the submitting shell's environment on: a RANK=3 left there is not this job's rank."""
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("RANK", "3")
    with usage.recording(tmp_path):
        pass
    [attempt] = rundir.read_usage(tmp_path)
    assert list(attempt.ranks) == ["0"]


def test_ranks_on_nodes_without_shared_locks_keep_each_others_figures(tmp_path, monkeypatch):
    """Where flock fails (ENOLCK: NFS mounted nolock), each rank's write between another's read and write lost
    that one's figures; each rank now writes a file of its own, and the lock of the run folder still works."""
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    write_whole = atomic.write_whole

    def meanwhile(path, write):  # rank 1 writes between rank 0's read and write, as on another node
        if not (tmp_path / rundir.RANK_USAGE.format(1)).exists() and path.name == rundir.USAGE:
            rundir.record_usage(tmp_path, "5#0", 1, rundir.RankUsage("n2", 2), job_id="5")
        write_whole(path, write)

    monkeypatch.setattr(atomic, "write_whole", meanwhile)
    rundir.record_usage(tmp_path, "5#0", 0, rundir.RankUsage("n1", 1), job_id="5")
    [read] = rundir.read_usage(tmp_path)
    assert {rank: figures.host for rank, figures in read.ranks.items()} == {"0": "n1", "1": "n2"}
    with rundir.lock(tmp_path, "5"):
        assert rundir.holder(tmp_path) is None  # no lock to see: no holder, and no refusal


class FakeCuda:
    """torch.cuda as the watcher thread sees it on a node of 2 GPUs: its current device is device 0 (each
    thread's own), whichever GPU the rank trains on."""
    @staticmethod
    def is_initialized():
        return True

    @staticmethod
    def device_count():
        return 2

    @staticmethod
    def current_device():
        return 0

    @staticmethod
    def max_memory_allocated(device):
        return {0: 100, 1: 200}[device]

    @staticmethod
    def get_device_properties(device):
        return type("Properties", (), {"total_memory": 1000})


def test_each_rank_records_the_gpu_it_trains_on_not_its_watchers_current_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", type("FakeTorch", (), {"cuda": FakeCuda}))
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    seen = []
    watcher = threading.Thread(target=lambda: seen.append(usage.gpu_memory()))
    watcher.start()
    watcher.join()
    assert seen == [(200, 1000)]


def test_a_damaged_usage_record_reads_as_none(tmp_path):
    (tmp_path / rundir.USAGE).write_text('{"attempts": [')
    assert rundir.read_usage(tmp_path) == []
    (tmp_path / rundir.USAGE).write_text('{"attempts": [{"ranks": {}}, {"id": ["x"], "ranks": {}}, {"id": "1#0", '
                                         '"ranks": {"0": {"peak_rss": "a lot"}}}]}')
    [attempt] = rundir.read_usage(tmp_path)  # what is not an attempt is left out; a bad figure reads as none
    assert attempt.id == "1#0" and attempt.node_peak == 0


def test_a_local_run_writes_usage_json(tmp_path):
    write_dataset(tmp_path / "data", "MNIST", n_train=128, n_test=64)
    result = run([f"data.root={tmp_path / 'data'}", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    [attempt] = json.loads((tmp_path / "run" / "usage.json").read_text())["attempts"]
    assert attempt["end"] == "completed" and attempt["job_id"] is None
    figures = attempt["ranks"]["0"]
    assert figures["peak_rss"] > 100 * 2**20 and figures["cpu_s"] > 0.5 and figures["wall_s"] > 1


def test_an_attempt_shows_each_nodes_peak_the_fullest_first_as_resources_mem_must_hold_it():
    from mnist.jobs import _attempt_line

    ranks = {str(rank): rundir.RankUsage(host, peak << 20, 2.0, 3.0)
             for rank, (host, peak) in enumerate([("node1", 600), ("node1", 700), ("node2", 900), ("node2", 200)])}
    line = _attempt_line(rundir.Attempt("1#0", started="2026-11-30T10:00:00", end="completed", ranks=ranks))
    assert line == ("started 2026-11-30T10:00:00 on node1,node2, 4 ranks, 3.0 s, 8.0 CPU s, peaks node1 1.3G, "
                    "node2 1.1G; completed")  # node1's 600M + 700M first (MEM's), not the 2.4G of all four
