"""The runs this project submitted, like the course's `sq` but for them: job id, name, state,
elapsed time, node, last log line, run folder. Also tail a job's log and cancel a job.

    python -m mnist.jobs                 list (from logs/jobs.jsonl + one squeue and one sacct call)
    python -m mnist.jobs tail [JOB] [-n 20] [-f]      the job's %x_%j.out (default: the latest job)
    python -m mnist.jobs cancel JOB      scancel it; its log and last checkpoint stay

Works without Slurm accounting too: a job squeue no longer knows is then read from the
result submitit left in its folder (COMPLETED or FAILED), else shown as ENDED.
"""
import argparse
import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

from mnist.errors import UserError
from mnist.launch.slurm import JOBS_RECORD

JOB_ID = re.compile(r"\d+(_\d+)?")


def read_record(log_dir):
    path = Path(log_dir) / JOBS_RECORD
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _query(command):
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_states(job_ids):
    """{job id: (state, elapsed, node)} from one squeue call and one sacct call for all jobs."""
    states = {}
    mains = sorted({j.split("_")[0] for j in job_ids})
    if not mains:
        return states
    listing = ",".join(mains)
    # sacct first, squeue second: squeue is live and wins for jobs still queued or running.
    accounted = _query(["sacct", "-n", "-P", "-X", "-j", listing, "-o", "JobID,State,Elapsed,NodeList"])
    for line in (accounted or "").splitlines():
        job, state, elapsed, node = line.split("|")[:4]
        states[job] = (state.split()[0], elapsed, node)
    queued = _query(["squeue", "-h", "-j", listing, "-o", "%i|%T|%M|%N"])
    for line in (queued or "").splitlines():
        job, state, elapsed, node = line.split("|")[:4]
        states[job] = (state, elapsed, node)
    return states


def result_state(entry):
    """Without accounting: submitit's result file says whether a finished job succeeded."""
    result = Path(entry.get("submitit_folder", "")) / f"{entry['job_id']}_0_result.pkl"
    if not result.exists():
        return None
    try:
        with open(result, "rb") as f:
            outcome = pickle.load(f)[0]
    except Exception:
        return None
    return "COMPLETED" if outcome == "success" else "FAILED"


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
    entries = read_record(log_dir)
    states = slurm_states([e["job_id"] for e in entries])
    for entry in entries:
        state, elapsed, node = states.get(entry["job_id"], (None, "", ""))
        if state is None:
            state = result_state(entry) or ("ENDED" if Path(entry["stdout"]).exists() else "UNKNOWN")
        yield {**entry, "state": state, "elapsed": elapsed or "-", "node": node or "-",
               "last_line": last_line(entry["stdout"])}


def list_jobs(log_dir):
    table = list(rows(log_dir))
    if not table:
        print(f"No jobs submitted from here yet ({Path(log_dir) / JOBS_RECORD} is empty). "
              f"Submit one with: python -m mnist.run launcher=slurm")
        return
    header = ("JOB", "NAME", "STATE", "ELAPSED", "NODE", "LAST LOG LINE", "RUN FOLDER")
    lines = [(r["job_id"], r["name"], r["state"], r["elapsed"], r["node"], r["last_line"][:50], r["run_dir"])
             for r in table]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def find(log_dir, job_id):
    entries = read_record(log_dir)
    if not entries:
        raise UserError(f"No jobs recorded in {Path(log_dir) / JOBS_RECORD}. Submit one with launcher=slurm first.")
    if job_id is None:
        return entries[-1]
    for entry in reversed(entries):
        if entry["job_id"] == job_id or entry["job_id"].split("_")[0] == job_id:
            return entry
    known = ", ".join(e["job_id"] for e in entries[-10:])
    raise UserError(f"Job {job_id} was not submitted from here. Recent jobs: {known}.")


def tail(log_dir, job_id, lines, follow):
    entry = find(log_dir, job_id)
    path = Path(entry["stdout"])
    print(f"==> {path} <==", file=sys.stderr)
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
    if not JOB_ID.fullmatch(job_id):
        raise UserError(f"'{job_id}' is not a Slurm job id (like 123456 or 123456_3).")
    entry = find(log_dir, job_id)
    out = subprocess.run(["scancel", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {out.stderr.strip()}")
    print(f"Cancelled {job_id}. Its log ({entry['stdout']}) and run folder ({entry['run_dir']}) stay.")


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
    args = parser.parse_args(argv)
    with report_errors():
        try:
            if args.command == "tail":
                tail(args.logs, args.job, args.n, args.follow)
            elif args.command == "cancel":
                cancel(args.logs, args.job)
            else:
                list_jobs(args.logs)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
