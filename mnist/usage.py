"""What a run used, recorded by the run itself into its folder's usage.json (mnist.rundir owns the file).

Slurm samples a job's memory every 30 s by default, so a short job has no MaxRSS at all, and sites
without accounting have none of it. So each process that trains records, for each attempt (a
requeue or a resubmission is a new one) and each rank: its peak resident memory (VmHWM; a packed task's later
runs start it afresh, so each run's peak is its own), its
user+system CPU seconds, its wall time since the process started, the CPUs it was given and, on a
GPU, `torch.cuda.max_memory_allocated` against the device's memory. A thread samples every
SAMPLE_S and writes when the peak has grown or every WRITE_EVERY_S, so a job killed for its memory
leaves the figures of its last moments (Slurm's SIGTERM before a kill also writes them, end
"terminated"); the end (completed, stopped, error) is written on the way out.

    with usage.recording(run_dir):
        train(cfg, run_dir, stop)

Standard library only (torch is looked at only if the run has imported it).
"""
import contextlib
import datetime
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator

from mnist import env, rundir
from mnist.errors import UserError
from mnist.stopping import StopRequested

SAMPLE_S = 0.02  # reading /proc/self/status takes ~30 us
WRITE_EVERY_S = 5.0
GROWTH = 1.02  # a peak 2% above the last written one is written at once


def _status(field):
    """A memory figure of /proc/self/status ("VmHWM", "VmRSS") in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident memory in bytes since it started or since reset_peak (VmHWM; getrusage's
    maxrss where /proc lacks it)."""
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Start VmHWM afresh from the memory resident now (Linux >= 4.0: clear_refs 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and its waited-for children."""
    return sum(x.ru_utime + x.ru_stime for x in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))


def process_started() -> float:
    """When this process started (seconds since the epoch): its start in clock ticks since boot (/proc/self/stat)
    against the boot clock now; /proc/stat's btime is whole seconds, up to 1 s early. Now where /proc cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # (AttributeError: no CLOCK_BOOTTIME off Linux)
        return time.time()


def gpu_memory() -> tuple[int | None, int | None]:
    """(peak allocated, device total) in bytes of the GPU this rank trains on, if this process uses one through torch;
    else (None, None). (Not torch's current device: that is each thread's own, and this runs in the watcher's.)"""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None, None
        device = env.cuda_index(env.rank()[1], torch.cuda.device_count())
        return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.get_device_properties(device).total_memory)
    except Exception:  # a GPU that went away must not stop the run
        return None, None


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


class Recorder:
    """One rank's figures for one attempt, written into the run folder's usage.json."""

    def __init__(self, run_dir, task=None):
        self.run_dir = run_dir
        self.rank = env.rank()[0]
        # A packed task's later runs count from their own start (the process's start-up is the first run's).
        self.started = task["started"] if task and task.get("index") else process_started()
        self.cpu_before = cpu_seconds() if task and task.get("index") else 0.0  # ... and their own CPU seconds
        restart = env.restarts()
        job = env.job_id()
        since = datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds")
        self.attempt_id = f"{job}#{restart}" if job else f"local {since} {os.getpid()}"
        self.attempt = {"job_id": job, "restart": restart, "started": since}
        if task:  # one of a packed task's runs (mnist.launch.job)
            self.attempt["task"] = rundir.Task(task["index"], task["runs"], task["startup_s"])
        # A packed task's later runs measure their own peak, not the largest of the runs before them: VmHWM reset
        # at their start, else the largest resident memory the watcher samples
        self.own_hwm = not (task and task.get("index")) or reset_peak()
        self.sampled_peak = 0
        self.checkpoint_before = _checkpoint_stamp(run_dir)
        self.written_peak, self.written_at = 0, 0.0
        self.done = threading.Event()
        self.writing = threading.RLock()  # (re-entrant: Slurm's SIGTERM may come while the main thread writes)
        self.thread = threading.Thread(target=self._watch, name="usage", daemon=True)
        self.previous = None  # the SIGTERM handler before ours

    def figures(self) -> rundir.RankUsage:
        gpu_peak, gpu_total = gpu_memory()
        return rundir.RankUsage(env.node_name(), self.peak(), round(cpu_seconds() - self.cpu_before, 3),
                                round(time.time() - self.started, 3), env.cpus_given(), gpu_peak, gpu_total, _now())

    def write(self, **end) -> None:
        with self.writing:  # the watcher's and the main thread's writes, in turn
            figures = self.figures()
            self.written_peak, self.written_at = figures.peak_rss, time.monotonic()
            with contextlib.suppress(OSError):  # a full disk must not stop the training
                rundir.record_usage(self.run_dir, self.attempt_id, self.rank, figures, **self.attempt, **end)

    def peak(self) -> int:
        """This run's peak resident memory so far (bytes)."""
        if self.own_hwm:
            return peak_rss()
        self.sampled_peak = max(self.sampled_peak, _status("VmRSS") or 0)
        return self.sampled_peak

    def _watch(self):
        while not self.done.wait(SAMPLE_S):
            if self.peak() > self.written_peak * GROWTH or time.monotonic() - self.written_at > WRITE_EVERY_S:
                self.write()

    def start(self) -> None:
        self.write(end=None)
        self.thread.start()
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._terminated)

    def _terminated(self, signum, frame):
        """Slurm's SIGTERM before it kills a job (memory, time limit, scancel): the figures of this moment."""
        self.write(end="terminated")
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous != signal.SIG_IGN:  # the default: end as SIGTERM ends a process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, end, error=None) -> None:
        self.done.set()
        self.thread.join()
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        details = {"end": end}
        if error is not None:
            details.update(error=_last_line(error), user_error=isinstance(error, UserError))
        if end == "completed" and self._trained_nothing():  # it found the run done: no attempt, which would hide
            with contextlib.suppress(OSError):  # the one that trained it
                rundir.forget_attempt(self.run_dir, self.attempt_id, self.rank)
            return
        self.write(**details)

    def _trained_nothing(self):
        """Whether the run was done already: every checkpoint is a new file, and this attempt wrote none."""
        return self.checkpoint_before is not None and _checkpoint_stamp(self.run_dir) == self.checkpoint_before


def _checkpoint_stamp(run_dir):
    try:
        stat = rundir.checkpoint_path(run_dir).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _last_line(error):
    """A UserError's paragraph; otherwise the exception's last traceback line (`ValueError: ...`)."""
    if isinstance(error, UserError):
        return str(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1]}" if text else type(error).__name__


@contextlib.contextmanager
def recording(run_dir, task=None) -> Iterator[Recorder]:
    """Record this process's usage into run_dir's usage.json while the block runs, and how it ended.
    `task`: the run's place in a packed array task, {index, runs, startup_s, started}."""
    recorder = Recorder(run_dir, task)
    recorder.start()
    try:
        yield recorder
    except (StopRequested, SystemExit):  # checkpointed; requeued or resumed later
        recorder.stop("stopped")
        raise
    except KeyboardInterrupt as e:
        recorder.stop("interrupted", e)
        raise
    except BaseException as e:
        recorder.stop("error", e)
        raise
    recorder.stop("completed")
