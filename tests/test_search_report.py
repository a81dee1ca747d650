"""The report of a search=optuna sweep (`python -m mnist.report SWEEP`, mnist/search/report.py) on a real local
search: the table's ranking against each trial's trial.json, the best line's command run as written, search.csv,
and the two figures as images and as what they draw."""
import csv
import json
import os
import re
import shlex
import shutil

import pytest
from conftest import run

from mnist.search import report as search_report
from mnist.search import study as studies

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 3
BEST_LINE = re.compile(r"^best: trial (\d+), accuracy (\S+); train it on with: python -m mnist\.run (.+)$", re.M)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, read_only_data):
    """One seeded local search of 8 trials, 3 epochs each, over a log-scaled float and a choice; the median pruner
    stops some trials early (seed 3: 6 complete, 2 pruned here, one of them above two complete ones)."""
    base = tmp_path_factory.mktemp("search_report")
    folder = base / "search"
    with pytest.MonkeyPatch.context() as mp:  # a local search, even when pytest itself runs in a job
        for name in [k for k in os.environ if k.startswith("SLURM_")]:
            mp.delenv(name)
        result = run(["-m", "search=optuna", "search.n_trials=8", "search.seed=3",
                      "optimizer.lr=tag(log, interval(0.0001, 3))", "model.hidden=choice([16],[32])",
                      f"trainer.epochs={EPOCHS}", f"data.root={read_only_data}", f"hydra.sweep.dir={folder}"], cwd=base)
    assert result.returncode == 0, result.stderr
    return folder


def trials(folder):
    return {t["number"]: t for t in (json.loads(p.read_text()) for p in folder.glob("*/trial.json"))}


def expected_order(found):
    """Trial numbers, ranked: COMPLETE by accuracy (best first), then PRUNED by accuracy; ties: lower number first."""
    def by(state):
        return [n for n, _ in sorted(((n, t) for n, t in found.items() if t["state"] == state),
                                     key=lambda item: (-item[1]["value"], item[0]))]
    return by("COMPLETE") + by("PRUNED")


def table(stdout):
    """The printed table as a list of {HEADER: cell}, in printed order; columns are two or more spaces apart."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("RANK  "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1:]:
        if not line.strip() or not line.lstrip()[0].isdigit():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells)))
    return header, rows


def report(args, cwd):
    return run([str(a) for a in args], cwd=cwd, timeout=120, module="mnist.report")


def check_png(path):
    from matplotlib.image import imread

    assert path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_MAGIC, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape


def test_the_search_has_what_the_report_is_checked_against(sweep):
    found = trials(sweep)
    states = [t["state"] for t in found.values()]
    assert sorted(found) == list(range(8)) and set(states) == {"COMPLETE", "PRUNED"}, found
    assert states.count("COMPLETE") >= 2 and all(t["epochs"] < EPOCHS for t in found.values() if t["state"] == "PRUNED")


def test_the_command_prints_the_trials_ranked_by_the_objective_and_writes_the_csv_and_figures(sweep, tmp_path):
    """`python -m mnist.report SWEEP` hands a search over: the ranked table (COMPLETE by accuracy, then PRUNED),
    search.csv with a row per trial, the two PNGs; none of the run report's files."""
    out = tmp_path / "out"
    result = report([sweep, "--out", out], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "8 of 8 trials: " in result.stdout, result.stdout
    header, rows = table(result.stdout)
    assert header == ["RANK", "TRIAL", "STATE", "ACCURACY", "EPOCHS", "optimizer.lr", "model.hidden", "FOLDER"]
    found = trials(sweep)
    assert [int(r["TRIAL"]) for r in rows] == expected_order(found), result.stdout
    assert [r["RANK"] for r in rows] == [str(i) for i in range(1, 9)]
    for row in rows:
        trial = found[int(row["TRIAL"])]
        assert row["STATE"] == trial["state"]
        assert row["ACCURACY"] == f"{trial['value']:.4f}"
        assert row["EPOCHS"] == f"{trial['epochs']}/{EPOCHS}"
        assert row["model.hidden"] == trial["params"]["model.hidden"]
        assert float(row["optimizer.lr"]) == pytest.approx(trial["params"]["optimizer.lr"], rel=1e-3)
        assert row["FOLDER"] == str(sweep / row["TRIAL"])

    with open(out / search_report.CSV_NAME, newline="") as f:
        written = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in written] == expected_order(found)
    for row in written:
        trial = found[int(row["trial"])]
        assert (row["state"], float(row["accuracy"]), int(row["epochs_done"]), int(row["epochs"])) == (
            trial["state"], trial["value"], trial["epochs"], EPOCHS)
        assert float(row["optimizer.lr"]) == trial["params"]["optimizer.lr"]
        assert row["model.hidden"] == trial["params"]["model.hidden"] and row["folder"] == str(sweep / row["trial"])
    for name in (search_report.PROGRESS_PNG, search_report.PARAMS_PNG):
        check_png(out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [search_report.CSV_NAME, search_report.PROGRESS_PNG, search_report.PARAMS_PNG])


def test_the_best_line_names_the_best_trial_and_its_command_trains_it_on(sweep, tmp_path):
    """The best line's command, run as printed, resumes the best trial's folder and trains it to twice its epochs;
    the report then says the trial trained on, and its next command asks for twice that."""
    copy = tmp_path / "search"
    shutil.copytree(sweep, copy)
    result = report([copy, "--no-figures"], tmp_path)
    assert result.returncode == 0, result.stderr
    match = BEST_LINE.search(result.stdout)
    assert match, result.stdout
    found = trials(copy)
    best = expected_order(found)[0]
    assert studies.best_trial(studies.read_search(copy), list(found.values()))["number"] == best
    assert int(match[1]) == best and float(match[2]) == pytest.approx(found[best]["value"], abs=1e-6)
    assert table(result.stdout)[1][0]["TRIAL"] == str(best)
    args = shlex.split(match[3])
    assert args == [f"hydra.run.dir={copy / str(best)}", f"trainer.epochs={2 * EPOCHS}"], args

    trained = run(args, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "Resuming from" in trained.stdout + (copy / str(best) / "train.log").read_text()
    with open(copy / str(best) / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, 2 * EPOCHS + 1))

    again = report([copy, "--no-figures"], tmp_path)
    assert again.returncode == 0, again.stderr
    first = table(again.stdout)[1][0]
    assert (first["TRIAL"], first["EPOCHS"]) == (str(best), f"{2 * EPOCHS}/{2 * EPOCHS}")
    assert f"trial {best} trained on after the search ({2 * EPOCHS} epochs now)" in again.stdout, again.stdout
    assert BEST_LINE.search(again.stdout)[3].endswith(f" trainer.epochs={4 * EPOCHS}"), again.stdout


def test_the_figures_draw_each_trial_pruned_ones_hollow_the_best_so_far_and_each_parameter(sweep):
    search = studies.read_search(sweep)
    rows = search_report.rank(sweep)
    drawn = search_report.figures(rows, search)
    assert set(drawn) == {search_report.PROGRESS_PNG, search_report.PARAMS_PNG}
    found = trials(sweep)

    progress = drawn[search_report.PROGRESS_PNG].axes[0]
    lines = {line.get_label(): line for line in progress.get_lines()}
    complete = sorted(n for n, t in found.items() if t["state"] == "COMPLETE")
    pruned = sorted(n for n, t in found.items() if t["state"] == "PRUNED")
    dots = lines["complete"]
    assert sorted(zip(dots.get_xdata(), dots.get_ydata())) == [(n, found[n]["value"]) for n in complete]
    hollow = next(line for label, line in lines.items() if label.startswith("pruned"))
    assert hollow.get_markerfacecolor() == "none" and dots.get_markerfacecolor() != "none"
    assert sorted(zip(hollow.get_xdata(), hollow.get_ydata())) == [(n, found[n]["value"]) for n in pruned]
    step = lines["best so far"]
    assert step.get_drawstyle() == "steps-post"
    best_so_far, current = [], None
    for n in complete:
        current = found[n]["value"] if current is None else max(current, found[n]["value"])
        best_so_far.append(current)
    if complete[-1] < 7:
        best_so_far.append(current)
    assert list(step.get_ydata()) == best_so_far

    lr_axes, hidden_axes = drawn[search_report.PARAMS_PNG].axes[:2]
    assert lr_axes.get_xscale() == "log" and "optimizer.lr" in lr_axes.get_xlabel()
    assert hidden_axes.get_xscale() == "linear"
    assert [t.get_text() for t in hidden_axes.get_xticklabels()] == ["[16]", "[32]"]
    assert list(hidden_axes.get_xticks()) == [0, 1]

    def drawn_points(axes):
        return sorted((x, y) for line in axes.get_lines() if not line.get_label().startswith("best")
                      for x, y in zip(line.get_xdata(), line.get_ydata()))

    assert drawn_points(lr_axes) == sorted((t["params"]["optimizer.lr"], t["value"]) for t in found.values())
    places = {"[16]": 0, "[32]": 1}  # (each point a small step aside from its choice's place)
    assert sorted((round(x), y) for x, y in drawn_points(hidden_axes)) == sorted(
        (places[t["params"]["model.hidden"]], t["value"]) for t in found.values())
    star = next(line for line in lr_axes.get_lines() if line.get_label().startswith("best"))
    assert star.get_label() == f"best (trial {rows[0]['trial']})"
    assert list(star.get_xdata()) == [found[rows[0]["trial"]]["params"]["optimizer.lr"]]
