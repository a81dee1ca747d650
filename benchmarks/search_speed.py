"""A search against a grid over the same space, on a Slurm up here (`make cluster-up`, then its export line).

    python -m benchmarks.search_speed [--data-root DIR] [--trials 24] [--epochs 5] [--seeds 8] [--out FILE]
    (or: make bench ARGS='--sections search')

The space: the MLP's optimizer.lr (log scale, 0.01 to 3) and model.hidden (64, 128, 256 or 512) on Fashion-MNIST. The
grid: 6 learning rates (0.01 0.03 0.1 0.3 1 3) x 4 widths = 24 runs of 5 epochs, one job array of as many tasks at
once as the cluster has CPUs. The search: 24 trials of at most 5 epochs (search=optuna, TPE, median pruner or
--pruner) by as many workers as the cluster has CPUs, one job array; eight times, with search.seed 0 to 7, as one
search is one draw (its epochs range from 0.45x to 0.85x the grid's). Each: seconds from submitting to the last
task's end, epochs trained in all, and the best test accuracy of a completed run or trial.
Target: the searches' mean best accuracy within 0.3 points of the grid's (or better), with at most 60% of its epochs
on average.
"""
import argparse
import json
import os
import statistics
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


def measure_search(data_root, trials=24, epochs=5, pruner="median", seeds=8):
    """The grid once, then the search with search.seed 0, 1, ... `seeds`-1: one search is one draw (the order the
    sampler tries values in decides how many trials the pruner stops), so the figures are the searches' mean."""
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
        each = []
        for seed in range(seeds):
            wall_s = _submit(tmp, f"search-{seed}", data_root, [
                *common, "search=optuna", f"search.n_trials={trials}", f"search.workers={cpus}", f"search.seed={seed}",
                f"search.pruner={pruner}", f"optimizer.lr=tag(log, interval({LRS[0]}, {LRS[-1]}))",
                f"model.hidden=choice({','.join(WIDTHS)})"])
            search_epochs, search_best = _results(tmp / f"search-{seed}", _completed_trial)
            each.append({"seed": seed, "wall_s": wall_s, "epochs": search_epochs, "best_accuracy": search_best})
    mean = {key: statistics.mean(e[key] for e in each) for key in ("wall_s", "epochs", "best_accuracy")}
    met = sum(e["epochs"] / grid_epochs <= TARGET_EPOCHS and 100 * (grid_best - e["best_accuracy"]) <= TARGET_POINTS
              for e in each)
    return {"runs": len(LRS) * len(WIDTHS), "trials": trials, "epochs": epochs, "workers": cpus, "pruner": pruner,
            "grid": {"wall_s": grid_s, "epochs": grid_epochs, "best_accuracy": grid_best},
            "search": mean, "each": each, "met_by": met,
            "epochs_ratio": mean["epochs"] / grid_epochs, "points_behind": 100 * (grid_best - mean["best_accuracy"]),
            "target_epochs_ratio": TARGET_EPOCHS, "target_points": TARGET_POINTS}


def table(results):
    found = results.get("search")
    if not found:
        return []
    if "skipped" in found:
        return [f"search: skipped: {found['skipped']}"]
    each = found.get("each", [])
    lines = [f"{name:<6} {found[name]['wall_s']:6.1f} s to result, {found[name]['epochs']:5.1f} epochs trained, best "
             f"accuracy {100 * found[name]['best_accuracy']:.2f}%"
             for name in ("grid", "search")]
    lines[0] += f"  ({found['runs']} runs of {found['epochs']} epochs, {found['workers']} at once)"
    lines[1] += (f"  (the mean of {len(each)} searches, search.seed 0-{len(each) - 1}: {found['trials']} trials, "
                 f"{found['pruner']} pruner, {found['workers']} workers)")
    lines += [f"  seed {e['seed']}: {e['wall_s']:6.1f} s, {e['epochs']:3d} epochs "
              f"({e['epochs'] / found['grid']['epochs']:.2f}x), best accuracy {100 * e['best_accuracy']:.2f}%"
              for e in each]
    lines.append(f"search/grid: {found['epochs_ratio']:.2f}x the epochs (target <= {TARGET_EPOCHS}x), "
                 f"{found['points_behind']:+.2f} points behind the grid's best (target <= {TARGET_POINTS}), "
                 f"{found['search']['wall_s'] / found['grid']['wall_s']:.2f}x the wall time; both targets met by "
                 f"{found['met_by']} of {len(each)} searches")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_DATA", "data"))
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pruner", default="median", help="search.pruner (the target is the median's)")
    parser.add_argument("--seeds", type=int, default=8, help="searches, with search.seed 0, 1, ...: their mean counts")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds takes a positive count")
    results = {"search": measure_search(Path(args.data_root).resolve(), args.trials, args.epochs, args.pruner,
                                            args.seeds)}
    print("\n".join(table(results)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
