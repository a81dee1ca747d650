"""Submission speed on the login node: the submit path against a bare `import hydra`, and a sweep
submitted as one job array against the same runs submitted one by one.

    python -m benchmarks.submit_speed [--rounds 5] [--n 50] [--out FILE]

submit path   `python -m mnist.run launcher=slurm dry_run=true` (the whole login-node path up to
              the sbatch script: composing, checking config, resources and data, rendering) against
              `python -c "import hydra"`, the floor any Hydra app pays. Each round runs both, one
              after the other; seconds are medians over the rounds, the ratio is the median of the
              rounds' ratios (so a burst of other work on the machine slows both sides alike).
              Target: at most 1.3x. A separate run reports whether torch, torchvision or numpy
              were imported on that path (they must not be).
sweep         `python -m mnist.run -m launcher=slurm trainer.seed=range(N)` (one sbatch array)
              against N processes `python -m mnist.run launcher=slurm trainer.seed=I`, as a shell
              loop would run them. Needs a reachable Slurm (`make cluster-up`, then the
              `export SLURM_CONF=...` it prints); skipped with a note otherwise. The jobs are
              submitted held (`sbatch --hold`) and cancelled right after: only submitting is timed.

Both use small generated IDX files as data.root (the submit path checks their headers) and a
temporary folder for run folders and logs. Compare figures within one run only.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.3
HEAVY = ("torch", "torchvision", "numpy")
# The dry run as test_launch runs it: the same path, then which heavy modules got imported.
HEAVY_CHECK = (
    "import sys\nfrom mnist.run import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    f"print('HEAVY:', ','.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')\n"
)
# Every job asks for little and is held, so none of them starts before it is cancelled.
JOB_ARGS = ("resources.mem=1G", "+resources.extra.hold=true")


def write_tiny_data(root):
    """A data.root with a 16-image MNIST in IDX files: enough for the login node's header checks."""
    from mnist.idx import write_idx

    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 16), ("t10k", 8)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", bytes(n * 784), (n, 28, 28))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", bytes(n), (n,))
    return Path(root)


def _timed(argv, cwd, env):
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return seconds, result.stdout


def median_ratio(numerators, denominators):
    """The median of the per-round ratios."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def measure_submit_path(rounds=5):
    """Medians over `rounds` of `import hydra` and of the slurm dry run, their ratio, and whether
    the dry run imported torch (or torchvision, numpy)."""
    with tempfile.TemporaryDirectory(prefix="submit-speed-") as tmp:
        env = {**os.environ, "MNIST_DATA": str(write_tiny_data(Path(tmp) / "data"))}
        bare = [sys.executable, "-c", "import hydra"]
        dry = [sys.executable, "-m", "mnist.run", "launcher=slurm", "dry_run=true"]
        _timed(bare, tmp, env), _timed(dry, tmp, env)  # warm the file cache
        hydra_s, dry_s = [], []
        for _ in range(rounds):
            hydra_s.append(_timed(bare, tmp, env)[0])
            seconds, script = _timed(dry, tmp, env)
            dry_s.append(seconds)
        if not script.startswith("#!/bin/bash"):
            raise RuntimeError(f"the dry run printed no sbatch script: {script[:500]}")
        out = _timed([sys.executable, "-c", HEAVY_CHECK, "launcher=slurm", "dry_run=true"], tmp, env)[1]
        heavy = out.rsplit("HEAVY:", 1)[1].strip()
    return {
        "rounds": rounds,
        "import_hydra_s": statistics.median(hydra_s),
        "dry_run_s": statistics.median(dry_s),
        "ratio": median_ratio(dry_s, hydra_s),
        "target_ratio": TARGET_RATIO,
        "heavy_imported": [] if heavy == "none" else heavy.split(","),
        "torch_imported": "torch" in heavy.split(","),
    }


def slurm_unreachable():
    """Why Slurm cannot be used from here, or None when `sinfo` answers."""
    how = ("start the local one-node Slurm with `make cluster-up`, run the `export SLURM_CONF=...` line it "
           "prints, then run this again (`make cluster-down` stops it)")
    if not os.environ.get("SLURM_CONF"):
        return f"no Slurm: SLURM_CONF is not set; {how}"
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return f"no Slurm: sbatch/sinfo are not on PATH; {how}"
    try:
        answer = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"no Slurm: sinfo did not answer within 20 s; {how}"
    if answer.returncode != 0:
        return f"no Slurm: sinfo failed ({answer.stderr.strip()}); {how}"
    return None


def submitted_job(stdout):
    """The job id `python -m mnist.run launcher=slurm` printed (of a single job or of an array)."""
    match = re.search(r"Submitted job (?:array )?(\d+)", stdout)
    if not match:
        raise RuntimeError(f"no job id in: {stdout[:500]}")
    return match.group(1)


def _cancel(job_ids):
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True)


def measure_sweep_submission(n=50, rounds=3):
    """Seconds to submit `n` runs as one array (median over `rounds`) against `n` separate
    submissions (one after another, summed), and their ratio. {"skipped": why} without Slurm."""
    why = slurm_unreachable()
    if why:
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="submit-speed-") as tmp:
        tmp = Path(tmp)
        common = [f"data.root={write_tiny_data(tmp / 'data')}", f"launcher.log_dir={tmp / 'logs'}", *JOB_ARGS]
        env = dict(os.environ)
        array_s = []
        for r in range(rounds):
            seconds, out = _timed([sys.executable, "-m", "mnist.run", "-m", "launcher=slurm", *common,
                                   f"trainer.seed=range({n})", f"hydra.sweep.dir={tmp / f'sweep{r}'}"], tmp, env)
            _cancel([submitted_job(out)])
            array_s.append(seconds)
            tasks = sum(1 for p in (tmp / f"sweep{r}").iterdir() if (p / "config.yaml").exists())
            if tasks != n:
                raise RuntimeError(f"the array made {tasks} run folders, not {n}")
        each_s = []
        for seed in range(n):
            seconds, out = _timed([sys.executable, "-m", "mnist.run", "launcher=slurm", *common,
                                   f"trainer.seed={seed}", f"hydra.run.dir={tmp / 'single' / str(seed)}"], tmp, env)
            _cancel([submitted_job(out)])
            each_s.append(seconds)
    return {
        "n": n,
        "rounds": rounds,
        "array_s": statistics.median(array_s),
        "separate_s": sum(each_s),
        "separate_median_each_s": statistics.median(each_s),
        "ratio": sum(each_s) / statistics.median(array_s),
    }


def table(results):
    """Short human lines for {"submit_path": ..., "sweep": ...} (either may be missing)."""
    lines = []
    path = results.get("submit_path")
    if path:
        met = "met" if path["ratio"] <= path["target_ratio"] else "NOT met"
        lines += [
            f"submit path (median of {path['rounds']})  import hydra {path['import_hydra_s']:.3f} s   "
            f"dry run {path['dry_run_s']:.3f} s   {path['ratio']:.2f}x  (target <= {path['target_ratio']}x: {met})",
            f"  heavy modules imported on the submit path: {', '.join(path['heavy_imported']) or 'none'}",
        ]
    sweep = results.get("sweep")
    if sweep and "skipped" in sweep:
        lines.append(f"sweep submission: skipped: {sweep['skipped']}")
    elif sweep:
        lines.append(
            f"sweep of {sweep['n']}  one array {sweep['array_s']:.2f} s (median of {sweep['rounds']})   "
            f"{sweep['n']} separate {sweep['separate_s']:.2f} s ({sweep['separate_median_each_s']:.2f} s each)   "
            f"array is {sweep['ratio']:.1f}x faster"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the submit-path timing")
    parser.add_argument("--n", type=int, default=50, help="runs in the sweep")
    parser.add_argument("--sweep-rounds", type=int, default=3, help="array submissions to take the median of")
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    results = {"submit_path": measure_submit_path(args.rounds),
               "sweep": measure_sweep_submission(args.n, args.sweep_rounds)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(table(results)))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
