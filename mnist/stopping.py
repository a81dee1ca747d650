"""Stopping early and being requeued: the one protocol between a signal, training and the job.

Slurm sends SIGUSR2 before a job's time limit (sbatch --signal), SIGTERM when it ends a job (preempted,
cancelled, or past its limit); Ctrl-C is SIGINT. Each sets a `StopFlag`; training finishes its step,
writes a checkpoint of exactly where it is and raises `StopRequested`. Then:

- after USR2 a submitit job asks submitit to requeue it (mnist/launch/job.py), and `python -m mnist.run`
  exits REQUEUE_EXIT, which slurm/*.sh turns into `scontrol requeue`;
- after SIGTERM both exit with the checkpoint written: Slurm requeues a preempted job itself (it resumes
  there), a cancelled one keeps its checkpoint (TERMINATED_EXIT);
- after Ctrl-C `python -m mnist.run` exits INTERRUPTED_EXIT.

Either way, running again in the same folder resumes. Standard library only.
"""
import signal

REQUEUE_SIGNAL = signal.SIGUSR2
REQUEUE_SIGNAL_NAME = REQUEUE_SIGNAL.name.removeprefix("SIG")  # USR2, as sbatch --signal and trap/kill spell it
REQUEUE_EXIT = 3  # "stopped before the time limit, checkpointed: requeue me"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C
TERMINATED_EXIT = 143  # 128 + SIGTERM


class StopFlag:
    """Set `requested` (from a signal handler, say) to make training checkpoint and stop."""

    requested = False


class StopRequested(Exception):
    """Training stopped on request after writing a checkpoint; running again resumes it."""


def stop_on_terminate(stop, received=None) -> object:
    """SIGTERM (Slurm ending the job) sets `stop` (and is appended to `received`), then runs the handler that was
    there before (the run's usage record writes its last figures; submitit's logs the signal). Returns that one."""
    previous = signal.getsignal(signal.SIGTERM)

    def terminated(signum, frame):
        if received is not None:
            received.append(signum)
        stop.requested = True
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, terminated)
    return previous


EARLY = []  # requeue signals that came before training began (Slurm's timing is coarse)


def catch_early_signals() -> None:
    """Remember a requeue signal that comes while Python is still importing and composing."""
    signal.signal(REQUEUE_SIGNAL, lambda signum, frame: EARLY.append(signum))


def stop_on_signals() -> tuple[StopFlag, list]:
    """A process that trains here: Ctrl-C, USR2 (which sbatch scripts forward before the time limit) and SIGTERM
    (Slurm ending the job) set the flag (a second Ctrl-C stops at once). Returns (the flag, the signals received,
    a requeue signal that came early included)."""
    stop, received = StopFlag(), list(EARLY)
    stop.requested = bool(received)

    def request_stop(signum, frame):
        if received and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        received.append(signum)
        stop.requested = True

    for signum in (signal.SIGINT, REQUEUE_SIGNAL, signal.SIGTERM):
        signal.signal(signum, request_stop)
    return stop, received


def stopped_by(received) -> tuple[str, int]:
    """(what stopped the process, in words; its exit status) from the first signal it received."""
    return {signal.SIGINT: ("Interrupted", INTERRUPTED_EXIT), signal.SIGTERM: ("Terminated", TERMINATED_EXIT)}.get(
        received[0], ("Stopped before the time limit", REQUEUE_EXIT))
