"""A search against a grid over the same space, on a Slurm up here (`make cluster-up`, then its export line).

    python -m benchmarks.search_speed [--data-root DIR] [--trials 24] [--epochs 5] [--out FILE]
    (or: make bench ARGS='--sections search')

The space: the MLP's optimizer.lr (log scale, 0.01 to 3) and model.hidden (64, 128, 256 or 512) on Fashion-MNIST.
The grid: 6 learning rates (0.01 0.03 0.1 0.3 1 3) x 4 widths = 24 runs of 5 epochs, one job array of as many tasks
at once as the cluster has CPUs. The search: 24 trials of at most 5 epochs (search=optuna, TPE, median pruner or
--pruner, search.seed=0) by as many workers as the cluster has CPUs, one job array. Each: seconds from submitting to the
last task's end, epochs trained in all, and the best test accuracy of a completed run or trial.
Target: the search's best accuracy within 0.3 points of the grid's (or better), with at most 60% of its epochs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.submit_speed import slurm_unreachable, submitted_job
from benchmarks.sweep_speed import _cluster_cpus, _wait

TARGET_EPOCHS = 0.6
TARGET_POINTS = 0.3
LRS = (0.01, 0.03, 0.1, 0.3, 1, 3)
WIDTHS = ("[64]", "[128]", "[256]", "[512]")


def _submit(tmp, name, data_root, args):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mnist.run", "-m", "launcher=slurm", "data=fashion_mnist",
                          f"data.root={data_root}", "resources.mem=1G", f"launcher.log_dir={tmp / 'logs'}",
                          f"hydra.sweep.dir={tmp / name}", *args], capture_output=True, text=True, cwd=tmp)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    _wait(submitted_job(out.stdout), timeout=3600)
    return time.perf_counter() - start


def _results(folder, completed):
    """(epochs trained in all, best last-epoch accuracy of the runs `completed` says count)."""
    from mnist import rundir

    epochs, best = 0, 0.0
    for run_dir in (p for p in Path(folder).iterdir() if (p / "metrics.csv").exists()):
        rows = rundir.read_metrics(run_dir)
        epochs += len(rows)
        if rows and completed(run_dir):
            best = max(best, float(rows[-1]["accuracy"]))
    return epochs, best


def _completed_trial(run_dir):
    return json.loads((run_dir / "trial.json").read_text())["state"] == "COMPLETE"


def measure_search(data_root, trials=24, epochs=5, pruner="median"):
    why = slurm_unreachable()
    if why:
        return {"skipped": why}
    cpus = _cluster_cpus()
    common = [f"trainer.epochs={epochs}", "trainer.threads=1"]
    with tempfile.TemporaryDirectory(prefix="search-speed-", dir=os.getcwd()) as tmp:
        tmp = Path(tmp)
        grid_s = _submit(tmp, "grid", data_root, [*common, f"optimizer.lr={','.join(map(str, LRS))}",
                                                  f"model.hidden={','.join(WIDTHS)}",
                                                  f"launcher.array_parallelism={cpus}"])
        grid_epochs, grid_best = _results(tmp / "grid", lambda run_dir: True)
        search_s = _submit(tmp, "search", data_root, [*common, "search=optuna", f"search.n_trials={trials}",
                                                      f"search.workers={cpus}", "search.seed=0",
                                                      f"search.pruner={pruner}",
                                                      f"optimizer.lr=tag(log, interval({LRS[0]}, {LRS[-1]}))",
                                                      f"model.hidden=choice({','.join(WIDTHS)})"])
        search_epochs, search_best = _results(tmp / "search", _completed_trial)
    return {"runs": len(LRS) * len(WIDTHS), "trials": trials, "epochs": epochs, "workers": cpus, "pruner": pruner,
            "grid": {"wall_s": grid_s, "epochs": grid_epochs, "best_accuracy": grid_best},
            "search": {"wall_s": search_s, "epochs": search_epochs, "best_accuracy": search_best},
            "epochs_ratio": search_epochs / grid_epochs, "points_behind": 100 * (grid_best - search_best),
            "target_epochs_ratio": TARGET_EPOCHS, "target_points": TARGET_POINTS}


def table(results):
    found = results.get("search")
    if not found:
        return []
    if "skipped" in found:
        return [f"search: skipped: {found['skipped']}"]
    lines = [f"{name:<6} {found[name]['wall_s']:6.1f} s to result, {found[name]['epochs']:3d} epochs trained, best "
             f"accuracy {100 * found[name]['best_accuracy']:.2f}%"
             for name in ("grid", "search")]
    lines[0] += f"  ({found['runs']} runs of {found['epochs']} epochs, {found['workers']} at once)"
    lines[1] += f"  ({found['trials']} trials, {found['pruner']} pruner, {found['workers']} workers)"
    lines.append(f"search/grid: {found['epochs_ratio']:.2f}x the epochs (target <= {TARGET_EPOCHS}x), "
                 f"{found['points_behind']:+.2f} points behind the grid's best (target <= {TARGET_POINTS}), "
                 f"{found['search']['wall_s'] / found['grid']['wall_s']:.2f}x the wall time")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_DATA", "data"))
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pruner", default="median", help="search.pruner (the target is the median's)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    results = {"search": measure_search(Path(args.data_root).resolve(), args.trials, args.epochs, args.pruner)}
    print("\n".join(table(results)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
