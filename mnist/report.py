"""What a run or a sweep gave: one table row per run, the same as CSV, and loss/accuracy figures.

    python -m mnist.report PATH [--out DIR] [--logs DIR] [--no-figures]
    python -m mnist.report          the latest run or sweep folder under ./outputs and ./multirun

PATH is a run folder (`outputs/<date>/<time>`) or any folder above run folders: a sweep
(`multirun/<date>/<time>`, or `hydra.sweep.dir`), a day, all of `outputs/`. A run folder is one
holding `config.yaml`, `metrics.csv` or Hydra's `.hydra/`; they are found up to four levels down.

Writes `report.csv`, `report_loss.png` (the training loss of each logged batch, from the course's
lines in train.log, and the test loss per epoch) and `report_accuracy.png` (test accuracy per epoch,
and the final accuracy of each configuration, one row each, a dot per seed) into PATH, or into
`--out DIR`, and prints the table:

    RUN  MODEL  OPTIMIZER  OVERRIDES  STATE  EPOCHS  ACC %  TEST LOSS  BEST EPOCH  S/EPOCH  SAMPLES/S  JOB
    TIME  CPU  MEM  CAUSE

In the figures, runs that differ only in `trainer.seed` are one configuration: one line, the mean of
its runs, with a min-max band, labelled with its number of seeds; epochs are whole numbers.

- EPOCHS: the epochs finished (rows of metrics.csv) / trainer.epochs.
- ACC % and TEST LOSS are those of the last finished epoch (report.csv: the values of metrics.csv,
  accuracy as the fraction 0..1 it is written there).
- BEST EPOCH has the highest test accuracy (a tie goes to the lower test loss, then the earlier epoch).
- S/EPOCH and SAMPLES/S are the means over the finished epochs (the first one includes warm-up).
- OVERRIDES and the figures' labels (report.csv: overrides, label) are the command-line
  overrides of the command that first started each run (`run.json`, else `.hydra/overrides.yaml`) that
  differ between the runs shown: `hydra.*` ones and ones
  every run has alike are left out. A run lacking such an override gets no entry for it. A run
  started from a preset (`+experiment=course_mlp`) is labelled by the preset's name, then its
  other differing overrides (`course_mlp`, `notebook_sgd model=cnn`); runs with no preset and no
  differing override are labelled model/optimizer, and labels that would be the same get the
  run's folder added (`optimizer=sgd [2]`). A single run is labelled by its preset, else its
  model/optimizer, and its OVERRIDES are all of its own (`hydra.*` left out).
- TIME (used/limit), CPU (CPU seconds / (elapsed x CPUs)), MEM (peak/asked) and CAUSE (why an
  unsuccessful job ended, with the fix in report.csv) are those `python -m mnist.jobs` shows, from the
  run's own usage.json first and Slurm's accounting second; a sweep gets one more line, min/median/max
  of each and the CPU-hours used against those held. report.csv's `jobs` lists every job that ran the
  run folder (a resubmitted run has several), oldest first.
- JOB is the Slurm job id: from `<logs>/jobs.jsonl` (the launcher's record, `--logs`, default
  `./logs` if it exists), the job that trained the run (the latest submission of that run folder
  that is still going or has attempts in its usage.json: a later one that found nothing to do does
  not hide it), else from the run's `environment.json` (any job that started it, `sbatch
  slurm/*.sh` included). report.csv's `attempt` is the last attempt that trained it (`job#requeues`).

STATE, by the first rule that applies:

1. every epoch of `trainer.epochs` has its row in metrics.csv: COMPLETED;
2. the run has a job id and Slurm knows it (one `squeue -r` and one `sacct` call for all jobs, through
   `mnist.launch.record`, as `python -m mnist.jobs` does): Slurm's state, e.g. PENDING, RUNNING,
   FAILED, TIMEOUT, CANCELLED, REQUEUED; where accounting is off, a finished job's outcome from the
   result submitit left (COMPLETED or FAILED). When Slurm cannot be reached, it says so once and
   this rule is skipped;
3. otherwise: `not started` without any finished epoch, else `incomplete (epoch k of n)`. A local
   run that is still training and one that died or was interrupted look alike on disk, so neither
   is guessed; `python -m mnist.run hydra.run.dir=<run folder>` resumes the latter.

No run is left out: one not started, still going or failed has its row (numbers `-` where no epoch
finished) and, once it has an epoch, its line in the figures. Reads only the CSV, YAML and JSON
files; imports no torch, and matplotlib (Agg, no display needed) only to draw the figures.

A search's folder (search=optuna: one holding search.json) gets mnist.search.report's instead: its trials ranked by
the objective, the best one and the command that trains it on, search.csv and its two figures.
"""
import argparse
import csv
import datetime
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mnist import atomic, rundir
from mnist.errors import UserError
from mnist.launch import gateway, outcome, record

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_NAME = "report.csv"
LOSS_PNG = "report_loss.png"
ACCURACY_PNG = "report_accuracy.png"
CSV_COLUMNS = [
    "run", "run_dir", "model", "optimizer", "overrides", "label", "state", "epochs_done", "epochs", "accuracy",
    "test_loss", "train_loss", "best_epoch", "best_accuracy", "seconds_per_epoch", "samples_per_s",
    "job_id", "slurm_state", "cause", "fix", "time_used_s", "time_limit_s", "wait_s", "cpus", "cpu_s", "cpu_percent",
    "mem_peak_bytes", "mem_asked_bytes", "gpu_peak_bytes", "gpu_total_bytes", "jobs", "attempt",
]
TABLE_COLUMNS = [  # (header, key, right-aligned)
    ("RUN", "run", False), ("MODEL", "model", False), ("OPTIMIZER", "optimizer", False),
    ("OVERRIDES", "overrides", False), ("STATE", "state", False), ("EPOCHS", "epochs_shown", True),
    ("ACC %", "accuracy_shown", True), ("TEST LOSS", "test_loss_shown", True), ("BEST EPOCH", "best_epoch", True),
    ("S/EPOCH", "seconds_shown", True), ("SAMPLES/S", "samples_shown", True), ("JOB", "job_id", False),
    ("TIME", "time_shown", True), ("CPU", "cpu_shown", True), ("MEM", "mem_shown", True),
    ("CAUSE", "cause_shown", False),
]


# ---------------------------------------------------------------- finding and reading run folders

def latest_folder(base=".") -> Path | None:
    """The run folder of ./outputs or sweep folder of ./multirun whose runs started last, or None.

    When a run started is its start record's (rundir.read_start), else its folder's modification
    time: a report written into a folder, or a resume, does not make it the latest."""
    candidates = [p for p in Path(base, "outputs").glob("*/*") if p.is_dir()]
    candidates += [p for p in Path(base, "multirun").glob("*/*") if p.is_dir()]
    started = {p: [_started(run) for run in rundir.find_runs(p)] for p in candidates}
    return max((p for p in candidates if started[p]), key=lambda p: min(started[p]), default=None)


def _started(run_dir):
    start = rundir.read_start(run_dir)
    if start and isinstance(start.get("started"), str):
        return start["started"]
    return datetime.datetime.fromtimestamp(Path(run_dir).stat().st_mtime).isoformat(timespec="seconds")


def _load_yaml(path):
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def read_overrides(run_dir) -> dict[str, str]:
    """The overrides of the command that first started the run as {key: value}, `hydra.*` ones left out
    (a resume's command rewrites Hydra's .hydra/overrides.yaml, not the run's start record)."""
    start = rundir.read_start(run_dir)
    overrides = start["overrides"] if start else _load_yaml(Path(run_dir) / ".hydra" / "overrides.yaml")
    result = {}
    for item in overrides if isinstance(overrides, list) else []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key == "hydra" or key.startswith("hydra."):
            continue
        result[key] = value
    return result


def read_run(run_dir) -> dict:
    """What the table needs of a run folder; a damaged file is noted in "damaged", the rest still read."""
    damaged = []

    def careful(read, default):
        try:
            return read(run_dir)
        except rundir.RunFolderError as e:
            damaged.append(e)
            return default

    config = careful(rundir.read_config, None)
    if config is None and not damaged:  # not written yet (or a local run that stopped before training)
        config = _load_yaml(Path(run_dir) / ".hydra" / "config.yaml")
    config = config if isinstance(config, dict) else {}
    epochs = rundir.select(config, "trainer.epochs")
    return {
        "run_dir": Path(run_dir),
        "model": str(rundir.select(config, "model.name", "?")),
        "optimizer": str(rundir.select(config, "optimizer.name", "?")),
        "preset": rundir.select(config, "experiment"),
        "epochs": epochs if isinstance(epochs, int) else None,
        "metrics": careful(rundir.read_metrics, []),
        "overrides": read_overrides(run_dir),
        "env_job_id": rundir.environment_job_id(run_dir),
        "damaged": damaged,
        "seed": rundir.select(config, "trainer.seed"),
        "batch_losses": batch_losses(run_dir),
    }


def batch_losses(run_dir) -> list[tuple[float, float]]:
    """[(epoch position, loss)] from the course's `Train Epoch: E [n/N (p%)]  Loss: x` lines of train.log, the
    position being E - 1 + n/N; a resumed run's repeated positions keep their latest loss."""
    try:
        text = (Path(run_dir) / rundir.LOG).read_text(errors="replace")
    except OSError:
        return []
    losses = {}
    for epoch, seen, total, loss in rundir.TRAIN_LINE.findall(text):
        try:
            losses[int(epoch) - 1 + int(seen) / max(int(total), 1)] = float(loss)
        except ValueError:
            continue
    return sorted(losses.items())


# ---------------------------------------------------------------- Slurm

def submissions(runs, log_dir) -> dict[Path, list[record.Entry]]:
    """{run folder: its record entries, oldest first} from the launcher's record, else one made of the job its
    environment.json names (`sbatch slurm/*.sh`); each run also gets its job ids in order ("history")."""
    recorded = record.by_run(record.read(log_dir)) if log_dir is not None else {}
    found = {}
    for run in runs:
        mine = recorded.get(str(run["run_dir"].resolve()), [])
        run["history"] = [e.job_id for e in mine]
        if not mine and run["env_job_id"]:
            mine = [_bare_entry(run, str(run["env_job_id"]))]
        if mine:
            found[run["run_dir"]] = mine
    return found


def slurm_lookup(runs, log_dir) -> None:
    """Set each run's job_id, slurm_state and job (mnist.launch.outcome's description: cause, usage) of the job
    that trained it (outcome.trained_by); asks Slurm once, and only when some run has a job. A run without a job
    gets its usage.json's figures."""
    found = submissions(runs, log_dir)
    with_job = [run for run in runs if run["run_dir"] in found]
    entries = [e for run in with_job for e in found[run["run_dir"]]]
    known = record.states(entries)
    if known.unreachable:
        print(gateway.unreachable(known.unreachable, "states are read from the run folders only"), file=sys.stderr)
    described = iter(outcome.describe(entries, known, log_dir or "logs"))
    for run in with_job:
        job = outcome.trained_by([next(described) for _ in found[run["run_dir"]]])
        run["job"], run["job_id"] = job, job["job_id"]
        run["slurm_state"] = None if known.unreachable or job["state"] in ("UNKNOWN", "ENDED") else job["state"]
    alone = [run for run in runs if run["run_dir"] not in found]
    for run, job in zip(alone, outcome.describe([_bare_entry(run, None) for run in alone], record.States({}))):
        run["job"], run["job_id"] = {**job, "state": "", "cause": "", "fix": ""}, None  # a local run: its figures only


def _bare_entry(run, job_id):
    return record.Entry(job_id, str(run["run_dir"]), str(run["run_dir"] / rundir.LOG))


# ---------------------------------------------------------------- the table

def run_state(run) -> str:
    if run["damaged"]:
        return "DAMAGED (" + ", ".join(sorted({e.damaged for e in run["damaged"]})) + ")"
    done, epochs = len(run["metrics"]), run["epochs"]
    if rundir.all_done(done, epochs):
        return "COMPLETED"
    if run.get("slurm_state"):
        return run["slurm_state"]
    if done == 0:
        return "not started"
    return f"incomplete (epoch {done} of {epochs if epochs is not None else '?'})"


def labels(runs, base) -> tuple[list[str], list[str]]:
    """Per run: its preset (+experiment=<name>) and the other overrides that differ between the runs
    (a single run: its preset, else model/optimizer)."""
    names = [_run_name(r["run_dir"], base) for r in runs]
    if len(runs) == 1:
        return [runs[0]["preset"] or f"{runs[0]['model']}/{runs[0]['optimizer']}"], [
            " ".join(_pairs(runs[0]["overrides"])) or "-"]
    keys = []
    for run in runs:
        keys += [k for k in run["overrides"] if k not in keys]
    differing = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]
    shown = [" ".join(f"{k}={r['overrides'][k]}" for k in differing if k in r["overrides"]) for r in runs]
    plain = [_label(run, differing) for run in runs]
    result = [f"{label} [{name}]" if plain.count(label) > 1 else label for label, name in zip(plain, names)]
    return result, [s or "-" for s in shown]


def _config_key(run):
    """What a run trains, less its seed: runs that differ only in trainer.seed are one configuration."""
    return (run["model"], run["optimizer"],
            tuple(sorted((k, v) for k, v in run["overrides"].items() if k != "trainer.seed")))


def _label(run, differing):
    """The run's preset, then its differing overrides but the preset's own; else model/optimizer."""
    parts = [run["preset"]] if run["preset"] else []
    parts += [f"{k}={run['overrides'][k]}" for k in differing if k in run["overrides"] and k != "experiment"]
    return " ".join(parts) or f"{run['model']}/{run['optimizer']}"


def _pairs(overrides):
    return [f"{k}={v}" for k, v in overrides.items()]


def _run_name(run_dir, base):
    try:
        name = str(Path(run_dir).relative_to(base))
    except ValueError:
        name = str(run_dir)
    return Path(run_dir).name if name == "." else name


def _mean(values):
    return sum(values) / len(values) if values else None


def summarize(runs, base) -> list[dict]:
    """One dict per run, the columns of report.csv and of the table."""
    figure_labels, shown_overrides = labels(runs, base)
    table = []
    for run, label, overrides in zip(runs, figure_labels, shown_overrides):
        rows, epochs = run["metrics"], run["epochs"]
        last = rows[-1] if rows else None
        best = (min(rows, key=lambda r: (-float(r["accuracy"]), float(r["test_loss"]), int(r["epoch"])))
                if rows else None)
        seconds = _mean([float(r["seconds"]) for r in rows])
        samples = _mean([float(r["samples_per_s"]) for r in rows])
        state = run_state(run)
        table.append({
            "run": _run_name(run["run_dir"], base),
            "run_dir": str(run["run_dir"]),
            "model": run["model"],
            "optimizer": run["optimizer"],
            "overrides": overrides,
            "label": label,
            "state": state,
            "epochs_done": len(rows),
            "epochs": epochs if epochs is not None else "",
            "accuracy": last["accuracy"] if last else "",
            "test_loss": last["test_loss"] if last else "",
            "train_loss": last["train_loss"] if last else "",
            "best_epoch": best["epoch"] if best else "-",
            "best_accuracy": best["accuracy"] if best else "",
            "seconds_per_epoch": f"{seconds:.3f}" if seconds is not None else "",
            "samples_per_s": f"{samples:.1f}" if samples is not None else "",
            "job_id": run.get("job_id") or "-",
            "slurm_state": run.get("slurm_state") or "",
            # as printed
            "epochs_shown": f"{len(rows)}/{epochs if epochs is not None else '?'}",
            "accuracy_shown": f"{100 * float(last['accuracy']):.2f}" if last else "-",
            "test_loss_shown": f"{float(last['test_loss']):.4f}" if last else "-",
            "seconds_shown": f"{seconds:.2f}" if seconds is not None else "-",
            "samples_shown": f"{samples:.0f}" if samples is not None else "-",
            "metrics": rows,
            "config_key": _config_key(run),
            "seed": run.get("seed"),
            "batch_losses": run.get("batch_losses", []),
            **_usage_columns(run.get("job")),
            "jobs": " ".join(run.get("history") or []),
            "attempt": _last_attempt(run.get("job")),
        })
    return table


def _last_attempt(job):
    """The id of the last attempt of the job that trained the run (`job#requeues`), "" if none."""
    return job["attempts"][-1].id if job and job["attempts"] else ""


def _usage_columns(job):
    """The report's cause and usage columns from a run's job description (mnist.launch.outcome)."""
    if not job:
        return {"cause": "", "fix": "", "time_shown": "-", "cpu_shown": "-", "mem_shown": "-", "cause_shown": "-"}
    cells = outcome.shown(job)
    number = lambda v, digits=1: "" if v is None else round(v, digits)  # noqa: E731
    return {"cause": job["cause"], "fix": job["fix"], "time_used_s": number(job["time_used_s"]),
            "time_limit_s": number(job["time_limit_s"]), "wait_s": number(job["wait_s"]), "cpus": job["cpus"] or "",
            "cpu_s": number(job["cpu_s"]), "cpu_percent": number(job["cpu_pct"]),
            "mem_peak_bytes": job["mem_peak"] or "", "mem_asked_bytes": job["mem_asked"] or "",
            "gpu_peak_bytes": job["gpu_peak"] or "", "gpu_total_bytes": job["gpu_total"] or "",
            "time_shown": cells["time"], "cpu_shown": cells["cpu"], "mem_shown": cells["mem"],
            "cause_shown": outcome.cut(job["cause"], 60), "job": job}


def format_table(table) -> str:
    header = [h for h, _, _ in TABLE_COLUMNS]
    lines = [[str(row[key]) for _, key, _ in TABLE_COLUMNS] for row in table]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    right = [r for _, _, r in TABLE_COLUMNS]
    out = []
    for line in (header, *lines):
        cells = [x.rjust(w) if r else x.ljust(w) for x, w, r in zip(line, widths, right)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


# ---------------------------------------------------------------- files

def write_csv(table, path) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**row, "best_epoch": "" if row["best_epoch"] == "-" else row["best_epoch"],
                              "job_id": "" if row["job_id"] == "-" else row["job_id"]} for row in table)

    atomic.write_whole(path, write)


def configurations(table) -> list[dict]:
    """The runs grouped into configurations (runs that differ only in trainer.seed are one), in table order:
    [{label, runs, seeds, epochs: {key: (epochs, mean, low, high)}, batches: (positions, mean, low, high),
    final: [accuracy of each completed run]}]. The figures draw exactly this."""
    groups = {}
    for row in table:
        groups.setdefault(row["config_key"], []).append(row)
    names = _config_labels(list(groups))
    found = []
    for key, rows in groups.items():
        seeds = {row["seed"] for row in rows}
        count = f"{len(rows)} seeds" if len(seeds) == len(rows) else f"{len(rows)} runs"
        found.append({
            "label": names[key] + (f" ({count})" if len(rows) > 1 else ""),
            "runs": [row["run"] for row in rows],
            "seeds": len(seeds),
            "epochs": {k: _spread([{int(r["epoch"]): float(r[k]) for r in row["metrics"]} for row in rows])
                       for k in ("train_loss", "test_loss", "accuracy")},
            "batches": _spread([dict(row["batch_losses"]) for row in rows]),
            "final": [float(row["metrics"][-1]["accuracy"]) for row in rows if row["state"] == "COMPLETED"],
        })
    return found


def _config_labels(keys):
    """Each configuration's label: the overrides (seed aside) that differ between them, else model/optimizer."""
    overrides = [dict(key[2]) for key in keys]
    names = sorted({k for o in overrides for k in o})
    differing = [k for k in names if len({o.get(k) for o in overrides}) > 1]
    labels = {}
    for key, o in zip(keys, overrides):
        label = " ".join(f"{k}={o[k]}" for k in differing if k in o)
        labels[key] = label or f"{key[0]}/{key[1]}"
    return labels


def _spread(series):
    """(xs, mean, low, high) over the runs' {x: value}, at every x some run has."""
    xs = sorted({x for one in series for x in one})
    values = [[one[x] for one in series if x in one] for x in xs]
    return (xs, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def figures(table, title) -> dict[str, "Figure"]:
    """The two figures as matplotlib Figures (Agg): report_loss (train loss per logged batch; test loss per epoch)
    and report_accuracy (test accuracy per epoch; final accuracy per configuration, a dot per seed).
    Each configuration is one line, the mean of its runs, with a min-max band when it has several."""
    from matplotlib.figure import Figure

    configs = configurations(table)
    legend_width = 0.5 + 0.056 * max(len(c["label"]) for c in configs)
    loss = Figure(figsize=(11 + legend_width, 4.5), layout="constrained")
    batch_axes, test_axes = loss.subplots(1, 2)
    for i, config in enumerate(configs):
        _draw(batch_axes, config["batches"], config, i)
        _draw(test_axes, config["epochs"]["test_loss"], config, i)
    _style(batch_axes, "train loss (each logged batch)", configs, per_batch=True)
    _style(test_axes, "test loss", configs)
    accuracy = Figure(figsize=(11 + legend_width, max(4.5, 1 + 0.35 * len(configs))), layout="constrained")
    epoch_axes, final_axes = accuracy.subplots(1, 2)
    for i, config in enumerate(configs):
        _draw(epoch_axes, config["epochs"]["accuracy"], config, i, scale=100.0)
    _style(epoch_axes, "test accuracy (%)", configs)
    _finals(final_axes, configs)
    if epoch_axes.lines:  # no room above 100%
        epoch_axes.set_ylim(epoch_axes.get_ylim()[0], min(epoch_axes.get_ylim()[1], 100.5))
        final_axes.set_xlim(final_axes.get_xlim()[0], min(final_axes.get_xlim()[1], 100.5))
    for figure in (loss, accuracy):
        handles, names = figure.axes[0].get_legend_handles_labels()
        if handles:
            figure.legend(handles, names, loc="outside right upper", fontsize=8)
        figure.suptitle(title, fontsize=9)
    return {LOSS_PNG: loss, ACCURACY_PNG: accuracy}


def _draw(axes, spread, config, i, scale=1.0):
    xs, mean, low, high = spread
    if not xs:
        return
    colour, style = f"C{i % 10}", ("-", "--", ":", "-.")[i // 10 % 4]
    axes.plot(xs, [scale * v for v in mean], color=colour, linestyle=style, label=config["label"],
              marker="o" if len(xs) < 30 else None, markersize=3)
    if len(config["runs"]) > 1:
        axes.fill_between(xs, [scale * v for v in low], [scale * v for v in high], color=colour, alpha=0.2, linewidth=0)


def _style(axes, ylabel, configs, per_batch=False):
    from matplotlib.ticker import MaxNLocator

    last = max((max(c["epochs"]["accuracy"][0], default=0) for c in configs), default=0)
    last = max(last, math.ceil(max((max(c["batches"][0], default=0) for c in configs), default=0)))
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if per_batch:
        axes.set_xlim(0, max(last, 1))
    elif last:
        axes.set_xlim(0.75, last + 0.25)
    if not axes.lines:
        axes.text(0.5, 0.5, "no logged batch yet" if per_batch else "no finished epoch yet", ha="center",
                  va="center", transform=axes.transAxes)


def _finals(axes, configs):
    """One row per configuration, a dot per completed run's final accuracy, a bar at their mean."""
    for row, config in enumerate(configs):
        values = [100 * v for v in config["final"]]
        axes.plot(values, [row] * len(values), "o", color=f"C{row % 10}", alpha=0.7, markersize=5)
        if values:
            axes.plot([sum(values) / len(values)], [row], "|", color="black", markersize=14)
    axes.set_yticks(range(len(configs)), [c["label"] for c in configs], fontsize=8)
    axes.set_ylim(-0.5, len(configs) - 0.5)
    axes.invert_yaxis()
    axes.set_xlabel("final test accuracy (%), completed runs: a dot each, | their mean")
    axes.grid(True, axis="x", alpha=0.3)


def write_figures(table, out_dir, title) -> None:
    """report_loss.png and report_accuracy.png (see figures), each written whole (through a temporary file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for name, figure in figures(table, title).items():
        FigureCanvasAgg(figure)
        atomic.write_whole(out_dir / name, lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=100))


# ---------------------------------------------------------------- the command

def report(path, out_dir=None, log_dir=None, figures=True) -> list[dict]:
    """Print the table and write report.csv (+ the figures) for the runs at or below `path`."""
    if path is None:
        path = latest_folder()
        if path is None:
            raise UserError(
                f"No run folder to report on: neither ./outputs nor ./multirun holds one (in {Path.cwd()}). "
                f"Name one: python -m mnist.report outputs/<date>/<time> (a run) or multirun/<date>/<time> (a sweep)."
            )
    path = Path(path)
    if not path.exists():
        latest = latest_folder()
        hint = f" The latest here is {latest}." if latest else ""
        raise UserError(
            f"{path} does not exist. Give a run folder (outputs/<date>/<time>) or a sweep folder "
            f"(multirun/<date>/<time>, or the sweep's hydra.sweep.dir).{hint}"
        )
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a folder. Give the run folder or sweep folder that holds it: "
                        f"python -m mnist.report {path.parent}")
    from mnist.search import report as search_report
    from mnist.search import study

    if study.is_search(path):  # a search=optuna sweep: its trials ranked (mnist/search/report.py)
        return search_report.report(path, out_dir, figures=figures)
    folders = rundir.find_runs(path)
    if not folders:
        raise UserError(
            f"{path} holds no run folders (a folder with config.yaml, metrics.csv or .hydra/, up to "
            f"{rundir.MAX_DEPTH} levels down). Give a run folder (outputs/<date>/<time>) or a sweep folder "
            f"(multirun/<date>/<time>)."
        )
    if log_dir is None and Path("logs").is_dir():
        log_dir = Path("logs")
    if log_dir is not None and not Path(log_dir).is_dir():
        raise UserError(f"--logs {log_dir} is not a folder. Give the launcher's log folder (launcher.log_dir, "
                        f"default logs), or leave --logs out.")
    runs = [read_run(f) for f in folders]
    slurm_lookup(runs, log_dir)
    table = summarize(runs, path)

    draw = (lambda folder: write_figures(table, folder, str(path.resolve()))) if figures else None
    written, skipped = write_files(path, out_dir, CSV_NAME, lambda csv: write_csv(table, csv), (LOSS_PNG, ACCURACY_PNG),
                                   draw)

    print(f"{len(table)} run{'s' if len(table) != 1 else ''} in {path}\n")
    print(format_table(table))
    jobs = [row["job"] for row in table if row.get("job") and (row["job"]["attempts"] or row["job"]["slurm"])]
    if len(jobs) > 1:
        print(f"\nusage: {outcome.summary(jobs)}")
    for run in runs:
        for problem in run["damaged"]:
            print(f"\ndamaged: {problem}")
    print("\nwritten: " + ", ".join(str(p) for p in written))
    if skipped:
        print(skipped, file=sys.stderr)
    return table


def write_files(path, out_dir, csv_name, write_table, pngs=(), write_pngs=None) -> tuple[list[Path], str | None]:
    """Write the report of `path` into out_dir (default: path): `write_table(the csv's path)`, then, unless
    write_pngs is None, `write_pngs(out_dir)` where matplotlib is installed. Returns (the files written, why the
    figures were skipped, or None); a folder that cannot be written is one paragraph."""
    out_dir = Path(out_dir) if out_dir is not None else Path(path)
    fix = f"Write it elsewhere: python -m mnist.report {path} --out <folder>"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_table(out_dir / csv_name)
    except OSError as e:
        raise UserError(f"Cannot write the report into {out_dir} ({e.strerror or e}). {fix}") from None
    written = [out_dir / csv_name]
    if write_pngs is None:
        return written, None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written, "figures skipped: matplotlib is not installed (.venv/bin/pip install matplotlib)"
    try:
        write_pngs(out_dir)
    except OSError as e:
        raise UserError(f"Cannot write the figures into {out_dir} ({e.strerror or e}). {fix}") from None
    return written + [out_dir / png for png in pngs], None


def main(argv=None) -> int:
    from mnist.config import report_errors

    parser = argparse.ArgumentParser(
        prog="python -m mnist.report",
        description="A table (printed and report.csv) and loss/accuracy figures for a run folder or a sweep folder.",
    )
    parser.add_argument("path", nargs="?", help="run folder or sweep folder (default: the latest under "
                                                "./outputs and ./multirun)")
    parser.add_argument("--out", help="write report.csv and the PNGs here (default: PATH)")
    parser.add_argument("--logs", help="the launcher's log folder holding jobs.jsonl (default: ./logs if it exists)")
    parser.add_argument("--no-figures", action="store_true", help="the table and report.csv only")
    args = parser.parse_args(argv)
    with report_errors():
        report(args.path, args.out, args.logs, figures=not args.no_figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
