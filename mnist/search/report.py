"""What a search found: its trials ranked by the objective, the best one and the command that trains it on, the same
as CSV, and two figures. `python -m mnist.report SWEEP` (and `make report RUN=SWEEP`) hands a search's folder (one
holding search.json) over to `report` here.

    RANK  TRIAL  STATE     ACCURACY  EPOCHS  optimizer.lr  model.hidden  FOLDER
       1      1  COMPLETE    1.0000     3/3         2.168  [16]          multirun/2026-11-25/14-03-07/1
       ...
       7      3  PRUNED      0.0078     1/3      0.001056  [16]          multirun/2026-11-25/14-03-07/3

    best: trial 1, accuracy 1; train it on with: python -m mnist.run hydra.run.dir=multirun/2026-11-25/14-03-07/1 \
trainer.epochs=6

- RANK: the COMPLETE trials by the objective, best first (search.direction), then the PRUNED ones by the objective
  they stopped with, then the RUNNING (training, or interrupted) and FAIL ones, by number; a tie keeps the lower
  trial number first, so rank 1 is the trial `python -m mnist.jobs` names as the study's best.
- ACCURACY (or TEST LOSS: search.objective): the study's value, trial.json's, that of the last epoch the trial
  trained in the search (a pruned trial's: the epoch it stopped after); a RUNNING or FAIL trial has none, so its
  metrics.csv's last epoch is shown, if any.
- EPOCHS: the rows of the trial's metrics.csv / its config.yaml's trainer.epochs. A trial trained on after the
  search (the best line's command) has more rows than the study's value is of: a line below the table says so.
- The parameters: each trial's value (a choice: its override text, as `[32]`); FOLDER: the trial's run folder.
- best: the best COMPLETE trial (mnist.search.study.best_trial), and the command that resumes its folder and trains
  it to twice its epochs (a run folder resumes with its own config: of what it trains, only `trainer.epochs` may
  change, mnist.rundir.resume_config).

Writes `search.csv` (one row per trial, values unrounded), `search_progress.png` (each trial's objective in
trial-number order, pruned trials hollow, and a step line of the best so far) and `search_params.png` (one panel per
parameter: the objective against its value, on a log axis for log-scaled ones, choices as evenly spaced labelled
categories) into the sweep folder or `--out DIR`. Reads only the JSON, YAML and CSV files: no torch, no optuna, and
matplotlib (Agg) only to draw the figures.
"""
import csv
import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mnist import atomic, rundir
from mnist.search import study as studies

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_NAME = "search.csv"
PROGRESS_PNG = "search_progress.png"
PARAMS_PNG = "search_params.png"
ORDER = {"COMPLETE": 0, "PRUNED": 1}  # then RUNNING and FAIL (and anything else), by trial number


# ---------------------------------------------------------------- the rows

def rank(folder) -> list[dict]:
    """One row per trial of the search in `folder`, ranked: {rank, trial, state, value (the objective, or None),
    epochs_done (metrics.csv's rows), epochs (trainer.epochs of its config.yaml, or None), study_epochs (the epochs
    the study's value is of, or None), params {key: value}, folder}."""
    search = studies.read_search(folder)
    rows = []
    for trial in studies.read_trials(folder):
        number = int(trial.get("number", 0))
        run_dir = studies.trial_folder(search, number)
        config = rundir.config_if_readable(run_dir) or {}
        epochs = rundir.select(config, "trainer.epochs")
        try:
            metrics = rundir.read_metrics(run_dir)
        except rundir.RunFolderError:
            metrics = []
        value = trial.get("value")
        if value is None and metrics:  # (RUNNING or FAIL: how far it got)
            value = search.objective(metrics[-1])
        rows.append({
            "trial": number,
            "state": str(trial.get("state", "?")),
            "value": float(value) if value is not None else None,
            "epochs_done": len(metrics),
            "epochs": epochs if isinstance(epochs, int) else None,
            "study_epochs": trial.get("epochs"),
            "params": dict(trial.get("params") or {}),
            "folder": run_dir,
        })
    sign = -1 if search.settings["direction"] == "maximize" else 1

    def key(row):
        group = ORDER.get(row["state"], len(ORDER))
        ranked = group < len(ORDER) and row["value"] is not None and not math.isnan(row["value"])
        return group, not ranked, sign * row["value"] if ranked else 0.0, row["trial"]

    rows.sort(key=key)
    return [{"rank": i, **row} for i, row in enumerate(rows, start=1)]


def summary(rows, search) -> str:
    """"8 of 8 trials: 5 complete, 3 pruned" (running, failed too, when there are)."""
    states = [r["state"] for r in rows]
    counts = [(states.count(s), word) for s, word in (("COMPLETE", "complete"), ("PRUNED", "pruned"),
                                                      ("RUNNING", "running or interrupted"), ("FAIL", "failed"))]
    other = len(states) - sum(n for n, _ in counts)
    parts = [f"{n} {word}" for n, word in [*counts, (other, "other")] if n]
    return f"{len(rows)} of {search.n_trials} trials" + (": " + ", ".join(parts) if parts else "")


def best_row(rows, search) -> dict | None:
    """The row of the study's best trial (mnist.search.study.best_trial), or None when no trial is COMPLETE."""
    trials = [{"number": r["trial"], "state": r["state"], "value": r["value"]} for r in rows]
    best = studies.best_trial(search, trials)
    return next(r for r in rows if r["trial"] == best["number"]) if best else None


def train_on_command(row) -> str:
    """The command that resumes the trial's folder and trains it to twice the epochs it has."""
    epochs = 2 * max(row["epochs_done"], row["study_epochs"] or 0, 1)
    return f"python -m mnist.run {shlex.quote('hydra.run.dir=' + str(row['folder']))} trainer.epochs={epochs}"


def best_line(rows, search) -> str:
    """`best: trial 3, accuracy 0.981; train it on with: python -m mnist.run hydra.run.dir=<folder> trainer.epochs=6`"""
    best = best_row(rows, search)
    if best is None:
        return "best: none yet, no trial is COMPLETE"
    return (f"best: trial {best['trial']}, {search.settings['objective']} {best['value']:g}; train it on with: "
            f"{train_on_command(best)}")


# ---------------------------------------------------------------- the table

def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows, search) -> str:
    """The ranked trials as an aligned table, then the best line (and a line per trial trained on after the
    search)."""
    objective = search.settings["objective"]
    params = list(search.space.params)
    header = ["RANK", "TRIAL", "STATE", objective.replace("_", " ").upper(), "EPOCHS", *params, "FOLDER"]
    right = [True, True, False, True, True, *(search.space.params[k].kind != "categorical" for k in params), False]
    lines = [[str(row["rank"]), str(row["trial"]), row["state"],
              f"{row['value']:.4f}" if row["value"] is not None else "-",
              f"{row['epochs_done']}/{row['epochs'] if row['epochs'] is not None else '?'}",
              *(_number(row["params"][k]) if k in row["params"] else "-" for k in params),
              str(row["folder"])] for row in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    out = []
    for line in (header, *lines):
        cells = [x.rjust(w) if r else x.ljust(w) for x, w, r in zip(line, widths, right)]
        out.append("  ".join(cells).rstrip())
    for row in rows:
        if row["study_epochs"] is not None and row["epochs_done"] > row["study_epochs"]:
            out.append(f"trial {row['trial']} trained on after the search ({row['epochs_done']} epochs now): its "
                       f"{objective} above is the study's, of epoch {row['study_epochs']}; metrics.csv has the rest")
    out += ["", best_line(rows, search)]
    return "\n".join(out)


# ---------------------------------------------------------------- files

def write_csv(rows, path, objective="value") -> None:
    """search.csv: rank, trial, state, the objective (its column named `objective`: report gives search.objective),
    epochs_done, epochs, study_epochs, each parameter (named by its key), folder; one row per trial, in rank order."""
    params = []
    for row in rows:
        params += [k for k in row["params"] if k not in params]
    columns = ["rank", "trial", "state", objective, "epochs_done", "epochs", "study_epochs", *params, "folder"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({
                    "rank": row["rank"], "trial": row["trial"], "state": row["state"],
                    objective: "" if row["value"] is None else row["value"],
                    "epochs_done": row["epochs_done"], "epochs": "" if row["epochs"] is None else row["epochs"],
                    "study_epochs": "" if row["study_epochs"] is None else row["study_epochs"],
                    **{k: row["params"].get(k, "") for k in params}, "folder": str(row["folder"]),
                })

    atomic.write_whole(path, write)


def figures(rows, search) -> dict[str, "Figure"]:
    """search_progress (each trial's objective by trial number, the best so far as a step line) and search_params
    (the objective against each parameter), as matplotlib Figures (Agg); pruned trials are hollow markers."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    objective = search.settings["objective"].replace("_", " ")
    maximize = search.settings["direction"] == "maximize"
    shown = [r for r in rows if r["state"] in ORDER and r["value"] is not None]
    best = best_row(rows, search)

    progress = Figure(figsize=(8, 4.5), layout="constrained")
    axes = progress.subplots()
    _points(axes, shown, lambda r: r["trial"])
    done = sorted((r for r in shown if r["state"] == "COMPLETE"), key=lambda r: r["trial"])
    if done:
        xs, so_far, current = [], [], None
        for row in done:
            current = row["value"] if current is None else (max if maximize else min)(current, row["value"])
            xs.append(row["trial"])
            so_far.append(current)
        last = max(r["trial"] for r in rows)
        if xs[-1] < last:  # (the line runs on to the last trial)
            xs.append(last)
            so_far.append(so_far[-1])
        axes.plot(xs, so_far, drawstyle="steps-post", color="C2", label="best so far")
    if best is not None:
        axes.annotate(f"best: trial {best['trial']}", (best["trial"], best["value"]), xytext=(6, 6),
                      textcoords="offset points", fontsize=8)
    axes.set_xlabel("trial")
    axes.set_ylabel(f"{objective} (last epoch trained)")
    axes.grid(True, alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    _empty(axes, shown)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    progress.suptitle(str(Path(search.folder).resolve()), fontsize=9)

    params = list(search.space.params.items())
    columns = min(max(len(params), 1), 3)
    grid_rows = max(math.ceil(len(params) / columns), 1)
    panels = Figure(figsize=(4.2 * columns, 3.8 * grid_rows), layout="constrained")
    axes_list = panels.subplots(grid_rows, columns, squeeze=False).ravel()
    for axes, (key, param) in zip(axes_list, params):
        with_value = [r for r in shown if key in r["params"]]
        if param.kind == "categorical":
            choices = list(param.choices or [])
            with_value = [r for r in with_value if str(r["params"][key]) in choices]
            xs = _categories(with_value, key, choices)
            axes.set_xticks(range(len(choices)), choices, fontsize=8)
            axes.set_xlim(-0.5, len(choices) - 0.5)
        else:
            xs = {r["trial"]: float(r["params"][key]) for r in with_value}
            if param.log:
                axes.set_xscale("log")
        _points(axes, with_value, lambda r, xs=xs: xs[r["trial"]])
        if best is not None and best["trial"] in xs:
            axes.plot([xs[best["trial"]]], [best["value"]], "*", color="C3", markersize=12,
                      label=f"best (trial {best['trial']})")
        axes.set_xlabel(key + (" (log scale)" if param.log else ""))
        axes.set_ylabel(objective)
        axes.grid(True, alpha=0.3)
        _empty(axes, with_value)
    for axes in axes_list[len(params):]:
        axes.set_visible(False)
    handles, names = axes_list[0].get_legend_handles_labels()
    if handles:
        panels.legend(handles, names, loc="outside lower center", fontsize=8, ncols=len(handles))
    panels.suptitle(str(Path(search.folder).resolve()), fontsize=9)
    return {PROGRESS_PNG: progress, PARAMS_PNG: panels}


def _categories(rows, key, choices):
    """{trial: x} for a choice parameter: the choice's place (0, 1, ...), each further trial of one choice a small
    step to either side, so that equal objectives do not hide each other."""
    place, seen, xs = {c: i for i, c in enumerate(choices)}, {}, {}
    for row in rows:
        position = place[str(row["params"][key])]
        n = seen[position] = seen.get(position, -1) + 1
        xs[row["trial"]] = position + 0.06 * ((n + 1) // 2) * (1 if n % 2 else -1)
    return xs


def _points(axes, rows, x_of):
    """COMPLETE trials as filled dots, PRUNED ones as hollow ones."""
    for state, label, fill in (("COMPLETE", "complete", "C0"), ("PRUNED", "pruned (at the epoch it stopped)", "none")):
        mine = [r for r in rows if r["state"] == state]
        if mine:
            axes.plot([x_of(r) for r in mine], [r["value"] for r in mine], "o", color="C0", markerfacecolor=fill,
                      linestyle="none", markersize=6, label=label)


def _empty(axes, rows):
    if not rows:
        axes.text(0.5, 0.5, "no trial with an objective yet", ha="center", va="center", transform=axes.transAxes)


def write_figures(rows, search, out_dir) -> None:
    """search_progress.png and search_params.png (see figures), each written whole."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for name, figure in figures(rows, search).items():
        FigureCanvasAgg(figure)
        atomic.write_whole(Path(out_dir) / name, lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=100))


# ---------------------------------------------------------------- the command

def report(folder, out_dir=None, figures=True) -> list[dict]:
    """Print the ranked table and the best line of the search in `folder`; write search.csv (+ the figures) into
    `out_dir` or the folder. Returns rank's rows."""
    folder = Path(folder)
    search = studies.read_search(folder)
    rows = rank(folder)
    from mnist.report import write_files

    draw = (lambda out: write_figures(rows, search, out)) if figures else None
    written, skipped = write_files(folder, out_dir, CSV_NAME, lambda csv: write_csv(
        rows, csv, search.settings["objective"]), (PROGRESS_PNG, PARAMS_PNG), draw)
    print(f"search in {folder}: {summary(rows, search)}\n")
    print(format_table(rows, search))
    print("\nwritten: " + ", ".join(str(p) for p in written))
    if skipped:
        print(skipped, file=sys.stderr)
    return rows
