"""The runs this project submitted, like the course's `sq` but for them, with why each ended and what
it used (like `seff`). Also show one job in full, tail its log, cancel it, rerun what did not finish.

    python -m mnist.jobs [--watch [S]]   list: job, state, requeues, time used/limit, CPU %, memory peak/asked,
                                         node, cause, last log line, run folder (from logs/jobs.jsonl + one
                                         squeue -r and one sacct call); --watch refreshes until all have ended
    python -m mnist.jobs show JOB        one job or task (an array id: each of its tasks) in full
    python -m mnist.jobs tail [JOB] [-n 20] [-f]      the job's %x_%j.out (default: the latest job)
    python -m mnist.jobs cancel JOB      scancel it; its log and last checkpoint stay
    python -m mnist.jobs resubmit TARGET [overrides] [--more]   rerun, as one array, what did not complete
    python -m mnist.jobs suggest [overrides...]   what resources=auto and runs_per_task=auto would ask for

Works without Slurm accounting too: a job squeue no longer knows is then read from the result
submitit left in its folder, the run's usage.json and slurmstepd's last words in its .err, else
shown as ENDED (UNKNOWN without a log). When Slurm cannot be reached at all, it says why and shows
every state as ?. The record and the states come from mnist.launch.record, causes and figures
from mnist.launch.outcome. Imports no torch.
"""
import argparse
import sys
import time
from pathlib import Path

from mnist import figures, rundir
from mnist.errors import UserError
from mnist.launch import gateway, outcome, record
from mnist.search import study

HEADER = ("JOB", "NAME", "STATE", "REQUEUED", "TIME", "CPU", "MEM", "NODE", "CAUSE", "LAST LOG LINE", "RUN FOLDER")
CAUSE_WIDTH, LINE_WIDTH = 80, 50
WATCH_S = 5.0


def describe(log_dir, entries=None) -> list[dict]:
    """The jobs of the record (or these entries), described by mnist.launch.outcome; says once when Slurm
    cannot be reached."""
    entries = record.read(log_dir) if entries is None else entries
    known = record.states(entries)
    if known.unreachable:
        print(gateway.unreachable(known.unreachable, "job states are shown as ?"), file=sys.stderr)
    return outcome.describe(entries, known, log_dir)


def table(jobs) -> list[str]:
    """The status table's lines, and one summary line per array of two or more tasks."""
    lines, searches = [], {}
    for job in jobs:
        cells = outcome.shown(job)
        requeued = f"{job['requeues']}x" if job["requeues"] else "-"
        folder = job["run_dir"]
        if study.is_search(folder):  # a search's worker: the trial it is on
            if folder not in searches:
                searches[folder] = study.read_trials(folder)
            trial = study.current_trial(folder, job["job_id"], searches[folder])
            folder = f"{folder} (trial {trial})" if trial is not None else folder
        lines.append((job["job_id"], job["name"] or "-", job["state"], requeued, cells["time"], cells["cpu"],
                      cells["mem"], job["node"] or "-", outcome.cut(job["cause"], CAUSE_WIDTH),
                      outcome.cut(job["last_line"], LINE_WIDTH), folder))
    widths = [max(len(str(x)) for x in column) for column in zip(HEADER, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (HEADER, *lines)]
    arrays = {}
    for job in jobs:
        if "_" in job["job_id"]:
            arrays.setdefault(job["job_id"].split("_")[0], []).append(job)
    summaries = [f"array {array}: {outcome.summary(tasks)}" for array, tasks in arrays.items() if len(tasks) > 1]
    summaries += [f"search {folder}: {study.progress(folder, trials=trials)}" for folder, trials in searches.items()]
    return out + ([""] + summaries if summaries else [])


def list_jobs(log_dir, watch=None) -> None:
    if watch is None:
        return _print_table(log_dir)
    clear = sys.stdout.isatty()
    while True:
        text, live = _table_text(log_dir)
        if clear:
            sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: the table is redrawn in place
        print(text + f"\n\n{time.strftime('%H:%M:%S')}, " + (f"{live} not ended; every {watch:g} s, Ctrl-C to stop"
                                                          if live else "every job listed has ended"), flush=True)
        if not live:
            return
        time.sleep(watch)


def _print_table(log_dir):
    text, _ = _table_text(log_dir)
    print(text)


def _table_text(log_dir):
    jobs = describe(log_dir)
    if not jobs:
        return (f"No jobs submitted from here yet ({record.path(log_dir)} is empty). "
                f"Submit one with: python -m mnist.run launcher=slurm"), 0
    live = sum(job["state"] in outcome.GOING or job["state"] == "?" for job in jobs)
    return "\n".join(table(jobs)), live


def show(log_dir, job_id) -> None:
    """Every field of one job or task (an array id: each of its tasks), its cause, usage, run folder and the
    history of its run folder's submissions."""
    if not record.JOB_ID.fullmatch(job_id):
        raise UserError(f"'{job_id}' is not a Slurm job id (like 123456 or 123456_3). "
                        f"List them with: python -m mnist.jobs")
    entries = record.read(log_dir)
    chosen = [e for e in entries if e.job_id == job_id] or [e for e in entries if e.job_id.split("_")[0] == job_id]
    if not chosen:
        record.find(log_dir, job_id)  # says which jobs there are
    lines = {id(e): _submissions(entries, e) for e in chosen}
    shown = {id(h) for line in lines.values() for h in line}
    history = [e for e in entries if id(e) in shown]
    jobs = {id(entry): job for entry, job in zip(history, describe(log_dir, history))}  # (a packed task: a run each)
    print("\n\n".join(_details(jobs[id(e)], [jobs[id(h)] for h in lines[id(e)]]) for e in chosen))


def _submissions(entries, entry) -> list:
    """The submissions of the entry's run folder, in order. A search's workers share its folder: a worker's are
    its own line of them (each resubmitted worker names the one it follows), not its siblings."""
    if not study.is_search(entry.run_dir):
        return [e for e in entries if e.run_dir == entry.run_dir]
    by_id = {e.job_id: e for e in entries if e.run_dir == entry.run_dir}
    followed_by = {e.previous: e for e in by_id.values() if e.previous}
    line = [entry]
    while line[0].previous in by_id and by_id[line[0].previous] not in line:
        line.insert(0, by_id[line[0].previous])
    while line[-1].job_id in followed_by and followed_by[line[-1].job_id] not in line:
        line.append(followed_by[line[-1].job_id])
    return line


def _details(job, history):
    cells, slurm = outcome.shown(job), job["slurm"] or record.JobState("")
    state = job["state"] + (f", {job['reason']}" if job["reason"] else "") + (
        f", exit code {job['exit_code']}" if job["exit_code"] not in ("", "0:0") else "")
    lines = [f"Job {job['job_id']} ({job['name']})",
             ("state", state + (f", requeued {job['requeues']}x" if job["requeues"] else "")
              + (f" (last: {job['requeued_because']})" if job.get("requeued_because") else "")),
             ("cause", job["cause"] or "-"), ("fix", job["fix"] or "-"),
             ("node", job["node"] or "-"),
             ("submitted", f"{slurm.submit or job.get('submitted') or '-'}; started {slurm.start or '-'}; "
                           f"ended {slurm.end or '-'}; waited {cells['wait']}"),
             ("time", f"{cells['time']} (used/limit)"),
             ("CPU", _cpu_line(job)), ("memory", _memory_line(job)), ("GPU", _gpu_line(job)),
             ("run folder", job["run_dir"]), ("log", job["stdout"]), ("errors", job["stderr"] or "-"),
             ("last line", job["last_line"] or "-")]
    for attempt in job["attempts"]:
        lines.append((f"attempt {attempt.restart}", _attempt_line(attempt)))
    lines.append(("submissions", " -> ".join(f"{h['job_id']} {h['state']}" for h in history)
                  + f"  (of {Path(job['run_dir']).name})"))
    lines.append(("trained by", _trained_by(job["run_dir"])) if not study.is_search(job["run_dir"]) else
                 ("trials", _trials_of(job["run_dir"], job["job_id"])))
    return "\n".join(line if isinstance(line, str) else f"  {line[0] + ':':<12} {line[1]}" for line in lines)


def _trials_of(folder, worker):
    """What a search's worker trained, by the trials' own records (trial.json): each trial it took, in order."""
    mine = study.taken_by(study.read_trials(folder), worker)
    if not mine:
        return "- (none taken yet)"
    return "; ".join(f"{t['number']} {t['state']}" + (f" after {t['epochs']} epoch{'s' * (t['epochs'] != 1)}"
                                                      if t.get("epochs") else "")
                     + ("" if t.get("worker") == worker else f" (finished by {t.get('worker')})") for t in mine)


def _trained_by(run_dir):
    """The job and attempt that last trained in the run folder, by the run's own record (usage.json)."""
    attempts = rundir.read_usage(run_dir)
    if not attempts:
        return "- (no attempt recorded yet)"
    last = attempts[-1]
    where = f"job {last.job_id}, attempt {last.restart}" if last.job_id else "a local run"
    return f"{where}, started {last.started}; {last.end or 'no end written (killed, or still running)'}"


def _cpu_line(job):
    if job["cpu_s"] is None:
        return f"{job['cpus'] or '?'} allocated" if job["cpus"] else "-"
    pct = f"{job['cpu_pct']:.0f}%" if job["cpu_pct"] is not None else "?"
    return f"{job['cpu_s']:.1f} CPU s on {job['cpus'] or '?'} CPUs: efficiency {pct} (CPU s / (elapsed x CPUs))"


def _memory_line(job):
    if not job["mem_peak"] and not job["mem_asked"]:
        return "-"
    slurm, kill = job["slurm"], job["memory_kill"]
    sources = [f"own record {figures.human_bytes(job['mem_peak_own'])}" if job["mem_peak_own"] else "",
               f"Slurm MaxRSS {figures.human_bytes(slurm.max_rss)}" if slurm and slurm.max_rss else "",
               f"killed at {figures.human_bytes(kill[0])}" if kill else ""]
    sources = ", ".join(s for s in sources if s)
    return (f"peak {figures.human_bytes(job['mem_peak'])} of {figures.human_bytes(job['mem_asked'])} asked"
            + (f" ({sources})" if sources else ""))


def _gpu_line(job):
    if not job["gpu_peak"]:
        return "-"
    peak, total = figures.human_bytes(job["gpu_peak"]), figures.human_bytes(job["gpu_total"])
    return f"peak {peak} allocated of the device's {total}"


def _attempt_line(attempt):
    ranks, hosts = len(attempt.ranks), attempt.hosts
    peak = figures.human_bytes(attempt.node_peak)  # what resources.mem (a node's) must hold, as MEM shows
    if len(attempt.node_peaks) > 1:  # each node's, the fullest first
        each = sorted(attempt.node_peaks.items(), key=lambda item: -item[1])
        peak = "peaks " + ", ".join(f"{node} {figures.human_bytes(bytes_)}" for node, bytes_ in each)
    else:
        peak = f"peak {peak}"
    end = attempt.end or "no end written (killed, or still running)"
    error = f": {attempt.error}" if attempt.error else ""
    return (f"started {attempt.started} on {','.join(hosts) or '?'}, {ranks} "
            f"rank{'s' if ranks != 1 else ''}, {attempt.wall_s:.1f} s, {attempt.cpu_s:.1f} CPU s, {peak}; {end}{error}")


def tail(log_dir, job_id, lines, follow) -> None:
    entry = record.find(log_dir, job_id)
    path = Path(entry.stdout)
    print(f"==> {path} <==", flush=True)  # on stdout: `make logs | less` keeps it
    if not path.exists():
        print(f"(no log yet: job {entry.job_id} has not started)", file=sys.stderr)
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


def cancel(log_dir, job_id) -> None:
    if not record.JOB_ID.fullmatch(job_id):
        raise UserError(f"'{job_id}' is not a Slurm job id (like 123456 or 123456_3).")
    entry = record.find(log_dir, job_id)
    known = record.states([entry])
    if known.unreachable:
        raise UserError(gateway.unreachable(known.unreachable, f"{job_id} cannot be cancelled"))
    before = known.by_job.get(entry.job_id)
    whole_array = job_id != entry.job_id
    if before and before.state in record.ENDED and not whole_array:
        print(f"Job {job_id} had already ended ({before.state}): nothing to cancel.")
        return
    _, problem = gateway.call(["scancel", job_id])
    if problem:
        raise UserError(f"scancel {job_id} failed: {problem}. Its log and run folder are as they were.")
    if whole_array:
        print(f"Cancelled job array {job_id}, all its tasks. The logs of the tasks that started and the run "
              f"folders ({Path(entry.run_dir).parent}) stay.")
    elif before and before.state == "PENDING" and not Path(entry.stdout).exists():
        print(f"Cancelled {job_id} while it was pending: it never started, so it has no log. "
              f"Its run folder ({entry.run_dir}) holds only its config.")
    else:
        print(f"Cancelled {job_id}. Its log ({entry.stdout}) and run folder ({entry.run_dir}) stay.")


def suggest(log_dir, overrides) -> None:
    """Print what resources.mem/time=auto and launcher.runs_per_task=auto choose for this config; submits nothing."""
    from mnist.config import compose
    from mnist.launch.slurm import fill_auto

    given = [o for o in overrides if not o.startswith(("launcher.log_dir=", "launcher=", "resources.mem=",
                                                       "resources.time=", "launcher.runs_per_task="))]
    cfg = compose(["launcher=slurm", f"launcher.log_dir={log_dir}", *given, "resources.mem=auto",
                   "resources.time=auto", "launcher.runs_per_task=auto"])
    print("\n".join(fill_auto([cfg], whole=False)))


def main(argv=None) -> int:
    from mnist.config import report_errors

    parser = argparse.ArgumentParser(prog="python -m mnist.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", default="logs", help="the launcher's log folder (launcher.log_dir)")
    parser.add_argument("--watch", nargs="?", type=float, const=WATCH_S, metavar="S",
                        help=f"redraw the table every S seconds (default {WATCH_S:g}) until every job has ended")
    commands = parser.add_subparsers(dest="command")
    show_parser = commands.add_parser("show", help="one job or task in full: state, cause, usage, run folder, history")
    show_parser.add_argument("job")
    tail_parser = commands.add_parser("tail", help="print the end of a job's log")
    tail_parser.add_argument("job", nargs="?", help="job id (default: the latest)")
    tail_parser.add_argument("-n", type=int, default=20, help="lines (default 20)")
    tail_parser.add_argument("-f", "--follow", action="store_true", help="keep printing as it grows")
    cancel_parser = commands.add_parser("cancel", help="cancel a job (scancel)")
    cancel_parser.add_argument("job")
    again = commands.add_parser("resubmit", help="rerun, as one job array, the runs of a job, an array or a sweep "
                                                 "folder that did not complete; each resumes in its own folder")
    again.add_argument("target", help="job id, array id, or a sweep's multirun/<date>/<time> folder")
    again.add_argument("overrides", nargs=argparse.REMAINDER,
                       help="where and how, e.g. resources.mem=8G; dry_run=true prints the script")
    again.add_argument("--more", action="store_true", help="twice the memory for runs killed for memory, twice "
                                                           "the time for runs that timed out")
    suggest_parser = commands.add_parser("suggest", help="what resources=auto would ask for a config, from past runs")
    suggest_parser.add_argument("overrides", nargs="*", help="the run's overrides, as for python -m mnist.run")
    args = parser.parse_args(argv)
    with report_errors():
        try:
            if args.watch is not None and args.watch <= 0:
                raise UserError(f"--watch {args.watch:g}: give the seconds between refreshes, e.g. --watch 5.")
            if args.command == "show":
                show(args.logs, args.job)
            elif args.command == "tail":
                tail(args.logs, args.job, args.n, args.follow)
            elif args.command == "cancel":
                cancel(args.logs, args.job)
            elif args.command == "resubmit":
                from mnist.launch.resubmit import resubmit

                overrides = [o for o in args.overrides if o != "--more"]  # --more may come among the overrides
                resubmit(args.logs, args.target, overrides, args.more or len(overrides) < len(args.overrides))
            elif args.command == "suggest":
                suggest(args.logs, args.overrides)
            else:
                list_jobs(args.logs, args.watch)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
