"""Stopping early and being requeued: the one protocol between a signal, training and the job.

Slurm sends SIGUSR2 before a job's time limit (sbatch --signal) or when it is preempted; Ctrl-C
is SIGINT. Either sets a `StopFlag`; training finishes its step, writes a checkpoint of exactly
where it is and raises `StopRequested`. Then:

- a submitit job asks submitit to requeue it (mnist/launch/job.py);
- `python -m mnist.run` exits REQUEUE_EXIT after USR2, which slurm/*.sh turns into
  `scontrol requeue`, or INTERRUPTED_EXIT after Ctrl-C.

Either way, running again in the same folder resumes. Standard library only.
"""
import signal

REQUEUE_SIGNAL = signal.SIGUSR2
REQUEUE_SIGNAL_NAME = REQUEUE_SIGNAL.name.removeprefix("SIG")  # USR2, as sbatch --signal and trap/kill spell it
REQUEUE_EXIT = 3  # "stopped before the time limit, checkpointed: requeue me"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class StopFlag:
    """Set `requested` (from a signal handler, say) to make training checkpoint and stop."""

    requested = False


class StopRequested(Exception):
    """Training stopped on request after writing a checkpoint; running again resumes it."""


EARLY = []  # requeue signals that came before training began (Slurm's timing is coarse)


def catch_early_signals() -> None:
    """Remember a requeue signal that comes while Python is still importing and composing."""
    signal.signal(REQUEUE_SIGNAL, lambda signum, frame: EARLY.append(signum))
