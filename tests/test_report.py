"""`python -m mnist.report` on real runs (a local sweep on tiny generated data), read the way a user
reads it: the printed table and report.csv against each run's metrics.csv, and the PNGs as images."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, read_only_data):
    """A real two-run sweep (adadelta, sgd; 2 epochs each), plus two folders made from its runs:
    2/ a copy of the sgd run with only its first epoch in metrics.csv (stopped or still training),
    3/ a copy of the adadelta run with only config.yaml and .hydra/ (submitted, not started)."""
    base = tmp_path_factory.mktemp("report")
    folder = base / "sweep"
    with pytest.MonkeyPatch.context() as mp:  # a local sweep, even when pytest itself runs in a job
        for name in [k for k in os.environ if k.startswith("SLURM_")]:
            mp.delenv(name)
        result = run(["-m", "optimizer=adadelta,sgd", f"data.root={read_only_data}", "trainer.epochs=2",
                      f"hydra.sweep.dir={folder}"], cwd=base)
    assert result.returncode == 0, result.stderr
    shutil.copytree(folder / "1", folder / "2")
    lines = (folder / "2" / "metrics.csv").read_text().splitlines(keepends=True)
    (folder / "2" / "metrics.csv").write_text("".join(lines[:2]))
    shutil.copytree(folder / "0", folder / "3")
    for name in ("metrics.csv", "checkpoint.pt", "train.log", "environment.json"):
        (folder / "3" / name).unlink()
    return folder


@pytest.fixture
def no_slurm(tmp_path):
    """No cluster to ask: Slurm's own tools then fail at once, as on a laptop with Slurm installed."""
    return {"SLURM_CONF": str(tmp_path / "no-such-cluster.conf")}


def report(args, cwd, env=None):
    return run([str(a) for a in args], cwd=cwd, env=env, timeout=120, module="mnist.report")


def table(stdout):
    """The printed table as {RUN: {HEADER: cell}}; columns are two or more spaces apart."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("RUN  "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def read_csv(path):
    with open(path, newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape
    assert image.min() < image.max(), f"{path} is blank"


def check_against_metrics(shown, saved, rows):
    """A table row and a report.csv row show the run's last epoch as its metrics.csv has it."""
    last = rows[-1]
    assert float(shown["ACC %"]) == pytest.approx(100 * float(last["accuracy"]), abs=0.005)
    assert float(shown["TEST LOSS"]) == pytest.approx(float(last["test_loss"]), abs=0.00005)
    assert [float(saved[k]) for k in ("accuracy", "test_loss", "train_loss")] == [
        float(last[k]) for k in ("accuracy", "test_loss", "train_loss")]
    assert shown["BEST EPOCH"] == saved["best_epoch"] and saved["best_epoch"] in [r["epoch"] for r in rows]
    assert int(saved["epochs_done"]) == len(rows)


def test_a_sweep_report_has_every_run_its_numbers_and_two_figures(sweep, tmp_path, no_slurm):
    result = report([sweep], cwd=tmp_path, env=no_slurm)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"4 runs in {sweep}")
    shown, saved = table(result.stdout), read_csv(sweep / "report.csv")
    assert list(shown) == list(saved) == ["0", "1", "2", "3"]  # none skipped, in order

    for name in ("0", "1", "2"):
        check_against_metrics(shown[name], saved[name], metrics(sweep / name))
    assert [shown[n]["STATE"] for n in "0123"] == ["COMPLETED", "COMPLETED", "incomplete (epoch 1 of 2)",
                                                   "not started"]
    assert [saved[n]["state"] for n in "0123"] == [shown[n]["STATE"] for n in "0123"]
    assert [shown[n]["EPOCHS"] for n in "0123"] == ["2/2", "2/2", "1/2", "0/2"]
    assert [shown[n]["JOB"] for n in "0123"] == ["-"] * 4
    not_started = shown["3"]
    assert [not_started[k] for k in ("ACC %", "TEST LOSS", "BEST EPOCH", "S/EPOCH", "SAMPLES/S")] == ["-"] * 5
    assert saved["3"]["accuracy"] == saved["3"]["test_loss"] == saved["3"]["best_epoch"] == ""

    # Labelled by what differs: the optimizer, not data.root or trainer.epochs, which all share.
    assert [shown[n]["MODEL"] + "/" + shown[n]["OPTIMIZER"] for n in "0123"] == [
        "mlp/adadelta", "mlp/sgd", "mlp/sgd", "mlp/adadelta"]
    assert [shown[n]["OVERRIDES"] for n in "0123"] == [
        "optimizer=adadelta", "optimizer=sgd", "optimizer=sgd", "optimizer=adadelta"]
    labels = [saved[n]["label"] for n in "0123"]
    assert labels == ["optimizer=adadelta [0]", "optimizer=sgd [1]", "optimizer=sgd [2]", "optimizer=adadelta [3]"]
    assert not any("data.root" in label or "trainer.epochs" in label or "hydra" in label for label in labels)

    for name in ("report_loss.png", "report_accuracy.png"):
        check_png(sweep / name)
    assert f"written: {sweep / 'report.csv'}, {sweep / 'report_loss.png'}, {sweep / 'report_accuracy.png'}" \
        in result.stdout


METRICS = "epoch,train_loss,test_loss,accuracy,seconds,samples_per_s\n"


def finished_run(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"model: {{name: mlp}}\noptimizer: {{name: sgd}}\ndata: {{name: mnist}}\n"
                                         f"trainer: {{epochs: {len(rows)}}}\n")
    (run_dir / "metrics.csv").write_text(METRICS + "".join(f"{row}\n" for row in rows))


def test_the_best_epoch_goes_to_the_lower_test_loss_then_the_earlier_epoch_and_times_are_epoch_means(
        tmp_path, no_slurm):
    finished_run(tmp_path / "runs" / "a", ["1,0.9,0.50,0.80,3.0,100.0",
                                           "2,0.5,0.30,0.90,2.0,150.0",   # ties epoch 3 on accuracy, lower loss
                                           "3,0.4,0.35,0.90,1.0,200.0"])
    finished_run(tmp_path / "runs" / "b", ["1,0.3,0.20,0.95,1.5,100.0",
                                           "2,0.2,0.20,0.95,2.0,110.0"])  # a tie on both: the earlier one
    result = report([tmp_path / "runs", "--no-figures"], cwd=tmp_path, env=no_slurm)
    assert result.returncode == 0, result.stderr
    shown, saved = table(result.stdout), read_csv(tmp_path / "runs" / "report.csv")
    columns = ("ACC %", "TEST LOSS", "BEST EPOCH", "S/EPOCH", "SAMPLES/S")
    assert [shown["a"][c] for c in columns] == ["90.00", "0.3500", "2", "2.00", "150"]
    assert [shown["b"][c] for c in columns] == ["95.00", "0.2000", "1", "1.75", "105"]
    assert [saved["a"][c] for c in ("best_epoch", "best_accuracy", "seconds_per_epoch", "samples_per_s")] == [
        "2", "0.9", "2.000", "150.0"]


@pytest.mark.slurm
def test_a_sweep_run_on_slurm_shows_its_job_ids_and_states(slurm_env, tiny_data, tmp_path):
    result = run(["-m", "launcher=slurm", "optimizer=adadelta,sgd", f"data.root={tiny_data}", "trainer.epochs=1",
                  "resources.mem=2G", f"launcher.log_dir={tmp_path / 'logs'}",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = re.search(r"Submitted job array (\d+)", result.stdout).group(1)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((tmp_path / "sweep").glob("*/metrics.csv"))) < 2:
        time.sleep(2)
    time.sleep(3)  # let sacct catch up with the ends
    result = report([tmp_path / "sweep"], cwd=tmp_path)  # --logs: ./logs by default
    assert result.returncode == 0, result.stderr
    shown, saved = table(result.stdout), read_csv(tmp_path / "sweep" / "report.csv")
    assert [shown[n]["JOB"] for n in "01"] == [f"{job}_0", f"{job}_1"]
    assert [shown[n]["STATE"] for n in "01"] == ["COMPLETED", "COMPLETED"]
    for n in "01":
        check_against_metrics(shown[n], saved[n], metrics(tmp_path / "sweep" / n))


def test_a_single_run_folder_is_labelled_by_model_and_optimizer(sweep, tmp_path, no_slurm):
    result = report([sweep / "0", "--out", tmp_path / "out"], cwd=tmp_path, env=no_slurm)
    assert result.returncode == 0, result.stderr
    shown, saved = table(result.stdout), read_csv(tmp_path / "out" / "report.csv")
    assert list(shown) == list(saved) == ["0"]
    check_against_metrics(shown["0"], saved["0"], metrics(sweep / "0"))
    assert saved["0"]["label"] == "mlp/adadelta" and shown["0"]["STATE"] == "COMPLETED"
    assert "optimizer=adadelta" in shown["0"]["OVERRIDES"]
    for name in ("report_loss.png", "report_accuracy.png"):
        check_png(tmp_path / "out" / name)


def test_the_report_reads_files_only_no_torch_and_no_matplotlib_without_figures(sweep, tmp_path, no_slurm):
    code = ("import sys; from mnist.report import main; main([sys.argv[1], '--no-figures', '--out', sys.argv[2]]); "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, 'imported'")
    result = subprocess.run([sys.executable, "-c", code, str(sweep), str(tmp_path / "out")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env={**os.environ, **no_slurm})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "report.csv").exists() and not (tmp_path / "out" / "report_loss.png").exists()


@pytest.mark.parametrize("what", ["missing", "empty", "nothing here"])
def test_no_run_folder_is_one_paragraph_and_exit_status_2(tmp_path, what):
    (tmp_path / "empty").mkdir()
    args = {"missing": [tmp_path / "nope"], "empty": [tmp_path / "empty"], "nothing here": []}[what]
    result = report(args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "run folder" in result.stderr
    assert not list(tmp_path.rglob("report*"))


def test_the_module_is_documented_in_its_help():
    result = run(["--help"], cwd=ROOT, module="mnist.report")
    assert result.returncode == 0 and "--out" in result.stdout and "--logs" in result.stdout


def fake_run(folder, optimizer, seed, epochs, rng):
    """A finished run folder as a run leaves it (config, start record, metrics, the course's log lines), made
    without training: the figures' data can then be checked against known numbers."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model: {{name: mlp}}\noptimizer: {{name: {optimizer}}}\n"
                                        f"trainer: {{epochs: {epochs}, seed: {seed}}}\ndata: {{name: mnist}}\n")
    (folder / "run.json").write_text(json.dumps({"started": f"2026-11-25T10:00:0{seed}",
                                                 "overrides": [f"optimizer={optimizer}", f"trainer.seed={seed}"]}))
    rows, log = [], []
    for epoch in range(1, epochs + 1):
        for seen in (0, 256, 512, 768):
            log.append(f"Train Epoch: {epoch} [{seen}/1024 ({seen * 100 // 1024}%)]\tLoss: {rng.uniform(0.1, 2):.6f}")
        rows.append(f"{epoch},{rng.uniform(0.1, 1):.6f},{rng.uniform(0.1, 1):.6f},{rng.uniform(0.5, 1):.6f},1.0,1000.0")
    (folder / "train.log").write_text("\n".join(log) + "\n")
    (folder / "metrics.csv").write_text("epoch,train_loss,test_loss,accuracy,seconds,samples_per_s\n"
                                        + "\n".join(rows) + "\n")


@pytest.fixture
def seed_sweep(tmp_path):
    import random

    rng = random.Random(3)
    sweep = tmp_path / "seeds"
    runs = {("sgd", s): sweep / str(i) for i, s in enumerate((1, 2, 3))}
    runs.update({("adadelta", s): sweep / str(3 + i) for i, s in enumerate((1, 2))})
    for (optimizer, seed), folder in runs.items():
        fake_run(folder, optimizer, seed, 1, rng)
    return sweep, runs


def test_runs_differing_only_in_seed_are_one_line_with_a_band_and_a_dot_per_seed(seed_sweep, no_slurm, monkeypatch):
    from matplotlib.collections import PolyCollection

    from mnist import report as reporting

    sweep, runs = seed_sweep
    for key, value in no_slurm.items():
        monkeypatch.setenv(key, value)
    table = reporting.report(sweep, figures=False)
    drawn = reporting.figures(table, "t")
    loss, accuracy = drawn["report_loss.png"], drawn["report_accuracy.png"]
    batch_axes, test_axes = loss.axes[:2]
    epoch_axes, final_axes = accuracy.axes[:2]
    labels = ["optimizer=sgd (3 seeds)", "optimizer=adadelta (2 seeds)"]
    for axes in (batch_axes, test_axes, epoch_axes):
        assert [line.get_label() for line in axes.lines] == labels  # one line per configuration...
        assert len([c for c in axes.collections if isinstance(c, PolyCollection)]) == 2  # ...each with its band

    for line, optimizer, seeds in zip(batch_axes.lines, ("sgd", "adadelta"), ((1, 2, 3), (1, 2))):
        logged = [reporting.batch_losses(runs[optimizer, s]) for s in seeds]
        assert list(line.get_xdata()) == [0.0, 0.25, 0.5, 0.75]  # the logged batches of epoch 1
        means = [sum(losses[i][1] for losses in logged) / len(seeds) for i in range(4)]
        assert list(line.get_ydata()) == pytest.approx(means)
    for line, band, optimizer, seeds in zip(test_axes.lines, test_axes.collections, ("sgd", "adadelta"),
                                            ((1, 2, 3), (1, 2))):
        losses = [float(metrics(runs[optimizer, s])[0]["test_loss"]) for s in seeds]
        assert list(line.get_ydata()) == pytest.approx([sum(losses) / len(losses)])
        corners = band.get_paths()[0].vertices[:, 1]
        assert (corners.min(), corners.max()) == pytest.approx((min(losses), max(losses)))

    dots = [line for line in final_axes.lines if line.get_marker() == "o"]
    assert len(dots) == 2 and [len(d.get_xdata()) for d in dots] == [3, 2]  # a row per configuration, a dot per seed
    for dot, optimizer, seeds in zip(dots, ("sgd", "adadelta"), ((1, 2, 3), (1, 2))):
        assert list(dot.get_xdata()) == pytest.approx([100 * float(metrics(runs[optimizer, s])[-1]["accuracy"])
                                                       for s in seeds])
    assert [t.get_text() for t in final_axes.get_yticklabels()] == labels
    for axes in (test_axes, epoch_axes, batch_axes):  # 1-epoch runs: whole epochs only
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
