"""The runs this project submitted, like the course's `sq` but for them: job id, name, state,
elapsed time, node, last log line, run folder. Also tail a job's log and cancel a job.

    python -m mnist.jobs                 list (from logs/jobs.jsonl + one squeue -r and one sacct call)
    python -m mnist.jobs tail [JOB] [-n 20] [-f]      the job's %x_%j.out (default: the latest job)
    python -m mnist.jobs cancel JOB      scancel it; its log and last checkpoint stay
    python -m mnist.jobs suggest [overrides...]   what resources=auto and runs_per_task=auto would ask for

Works without Slurm accounting too: a job squeue no longer knows is then read from the
result submitit left in its folder (COMPLETED or FAILED), else shown as ENDED (UNKNOWN without
a log). When Slurm cannot be reached at all, it says why and shows every state as ?.
The record and the states come from mnist.launch.record.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

from mnist.errors import UserError
from mnist import rundir
from mnist.launch import record


def last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [l.strip() for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    ours = [l for l in lines if not l.startswith("submitit ")]  # the run's lines, not submitit's
    return (ours or lines or [""])[-1]


def rows(log_dir):
    entries = record.read(log_dir)
    known = record.states(entries)
    if known.unreachable:
        print(f"Cannot reach Slurm, so job states are shown as ?: {known.unreachable}.", file=sys.stderr)
    for entry in entries:
        state, elapsed, node = known.by_job.get(entry["job_id"], ("", "", ""))
        if known.unreachable:
            state = "?"
        elif not state:  # neither Slurm nor a result file knows it
            state = "ENDED" if Path(entry["stdout"]).exists() else "UNKNOWN"
        if entry.get("pack"):  # one of a packed task's runs: its own state and log, not the task's
            state = packed_run_state(entry["run_dir"], state)
        log = Path(entry["run_dir"]) / rundir.LOG if entry.get("pack") else entry["stdout"]
        yield {**entry, "state": state, "elapsed": elapsed or "-", "node": node or "-",
               "last_line": last_line(log).replace("\t", " ")}


def packed_run_state(run_dir, task_state):
    """COMPLETED once the run's epochs are done; WAITING while its running task trains the runs before it."""
    config = rundir.read_config(run_dir) or {}
    try:
        if config and rundir.holds_run(run_dir) and rundir.epochs_left(run_dir, config) <= 0:
            return "COMPLETED"
    except rundir.RunFolderError:
        return task_state
    if task_state == "RUNNING" and not (Path(run_dir) / rundir.LOG).exists():
        return "WAITING"
    return task_state


def list_jobs(log_dir):
    table = list(rows(log_dir))
    if not table:
        print(f"No jobs submitted from here yet ({record.path(log_dir)} is empty). "
              f"Submit one with: python -m mnist.run launcher=slurm")
        return
    header = ("JOB", "NAME", "STATE", "ELAPSED", "NODE", "LAST LOG LINE", "RUN FOLDER")
    lines = [(r["job_id"], r["name"], r["state"], r["elapsed"], r["node"], r["last_line"][:50], r["run_dir"])
             for r in table]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def tail(log_dir, job_id, lines, follow):
    entry = record.find(log_dir, job_id)
    path = Path(entry["stdout"])
    print(f"==> {path} <==", flush=True)  # on stdout: `make logs | less` keeps it
    if not path.exists():
        print(f"(no log yet: job {entry['job_id']} has not started)", file=sys.stderr)
        if not follow:
            return
        while not path.exists():
            time.sleep(1)
    with open(path, errors="replace") as f:
        sys.stdout.write("".join(f.readlines()[-lines:]))
        while follow:  # like tail -f, until Ctrl-C
            chunk = f.read()
            sys.stdout.write(chunk)
            sys.stdout.flush()
            if not chunk:
                time.sleep(1)


def cancel(log_dir, job_id):
    if not record.JOB_ID.fullmatch(job_id):
        raise UserError(f"'{job_id}' is not a Slurm job id (like 123456 or 123456_3).")
    entry = record.find(log_dir, job_id)
    known = record.states([entry])
    if known.unreachable:
        raise UserError(f"Cannot cancel {job_id}: Slurm cannot be reached ({known.unreachable}). Check that `sinfo` "
                        f"answers (SLURM_CONF, the controller), then cancel again.")
    before = known.by_job.get(entry["job_id"])
    whole_array = job_id != entry["job_id"]
    if before and before.state in record.ENDED and not whole_array:
        print(f"Job {job_id} had already ended ({before.state}): nothing to cancel.")
        return
    out = subprocess.run(["scancel", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {out.stderr.strip()}")
    if whole_array:
        print(f"Cancelled job array {job_id}, all its tasks. The logs of the tasks that started and the run "
              f"folders ({Path(entry['run_dir']).parent}) stay.")
    elif before and before.state == "PENDING" and not Path(entry["stdout"]).exists():
        print(f"Cancelled {job_id} while it was pending: it never started, so it has no log. "
              f"Its run folder ({entry['run_dir']}) holds only its config.")
    else:
        print(f"Cancelled {job_id}. Its log ({entry['stdout']}) and run folder ({entry['run_dir']}) stay.")


def suggest(log_dir, overrides):
    """Print what resources.mem/time=auto and launcher.runs_per_task=auto choose for this config; submits nothing."""
    from mnist.config import compose
    from mnist.launch.slurm import fill_auto

    given = [o for o in overrides if not o.startswith(("launcher.log_dir=", "launcher=", "resources.mem=",
                                                       "resources.time=", "launcher.runs_per_task="))]
    cfg = compose(["launcher=slurm", f"launcher.log_dir={log_dir}", *given, "resources.mem=auto",
                   "resources.time=auto", "launcher.runs_per_task=auto"])
    print("\n".join(fill_auto([cfg])))


def main(argv=None):
    from mnist.config import report_errors

    parser = argparse.ArgumentParser(prog="python -m mnist.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", default="logs", help="the launcher's log folder (launcher.log_dir)")
    commands = parser.add_subparsers(dest="command")
    tail_parser = commands.add_parser("tail", help="print the end of a job's log")
    tail_parser.add_argument("job", nargs="?", help="job id (default: the latest)")
    tail_parser.add_argument("-n", type=int, default=20, help="lines (default 20)")
    tail_parser.add_argument("-f", "--follow", action="store_true", help="keep printing as it grows")
    cancel_parser = commands.add_parser("cancel", help="cancel a job (scancel)")
    cancel_parser.add_argument("job")
    suggest_parser = commands.add_parser("suggest", help="what resources=auto would ask for a config, from past runs")
    suggest_parser.add_argument("overrides", nargs="*", help="the run's overrides, as for python -m mnist.run")
    args = parser.parse_args(argv)
    with report_errors():
        try:
            if args.command == "tail":
                tail(args.logs, args.job, args.n, args.follow)
            elif args.command == "cancel":
                cancel(args.logs, args.job)
            elif args.command == "suggest":
                suggest(args.logs, args.overrides)
            else:
                list_jobs(args.logs)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
