"""Sweeps: a job's lean start, packed against unpacked time to result, the CPUs' useful share, asked against used.

    python -m benchmarks.sweep_speed [--data-root DIR] [--runs 20] [--pack 5] [--rounds 3] [--out FILE]

lean start   a job's process (submitit's LocalExecutor: `python -m submitit.local._local`, as a node runs
             `python -m submitit.core._submit`) from its start to its first training batch's log line,
             against `python -c "import torch"` + reading the four IDX files into tensors. Medians of
             rounds, ratio of medians of same-round ratios. Target: at most 1.3x. No Slurm needed.
sweep        with a Slurm up (`make cluster-up`, then its `export SLURM_CONF=...`): the issue's sweep, N one-epoch
             MLP runs on Fashion-MNIST (`trainer.seed=range(N)`, launcher.array_parallelism=N), unpacked and
             packed (launcher.runs_per_task=P) with resources=auto sized from the unpacked runs, in rounds of
             one each (the first unpacked first, then in turns). Each: seconds from submit to the last task's
             end; the useful CPU share (the runs' epoch seconds over wall x the cluster's CPUs); asked (mem x
             time limit, CPUs x time limit, per task) against used (each run's peak x wall, CPU seconds, from
             its usage.json). The ratio is the median of the rounds' packed/unpacked; each one's figures are
             its median round's. Target: packed at most 0.5x unpacked. (One round alone moved from 0.49x to
             0.58x between runs on the 2-CPU cluster, with the machine's speed.) Then where the time goes
             (waves_model): submitting, a task's start-up S and a run R (from the runs' usage.json), and the
             waves the CPUs run the tasks in; the ratio that predicts, and the S or R that would meet the target.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.submit_speed import median_ratio, slurm_unreachable, submitted_job

TARGET_START = 1.3
TARGET_PACKED = 0.5
BASELINE = ("import sys, torch\nfrom mnist.data import read_idx\nfrom mnist.datafiles import FILES, raw_folder\n"
            "for f in FILES: read_idx(raw_folder(sys.argv[1], 'fashion_mnist') / f)\n")


def _first_batch_s(cfg, folder):
    """Seconds from a job process's start to its first 'Train Epoch' line."""
    import submitit
    from omegaconf import OmegaConf

    from mnist.launch.job import TrainJob

    executor = submitit.LocalExecutor(folder=folder)
    started = time.perf_counter()
    job = executor.submit(TrainJob(OmegaConf.to_container(cfg, resolve=True), Path(folder) / "run", 0))
    while "Train Epoch: 1 [0/" not in (job.stdout() or ""):
        if job.done():
            raise RuntimeError(f"the job ended before its first batch: {job.stderr()}")
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    job.result()  # (one epoch) before its folder goes
    return seconds


def measure_start(data_root, rounds=3):
    from mnist.config import compose

    cfg = compose(["data=fashion_mnist", f"data.root={data_root}", "trainer.epochs=1", "launcher=slurm"])
    jobs, bases = [], []
    with tempfile.TemporaryDirectory(prefix="sweep-speed-") as tmp:
        for r in range(rounds):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", BASELINE, str(data_root)], check=True)
            bases.append(time.perf_counter() - start)
            jobs.append(_first_batch_s(cfg, Path(tmp) / str(r)))
    return {"rounds": rounds, "import_torch_and_read_s": statistics.median(bases),
            "job_to_first_batch_s": statistics.median(jobs),
            "ratio": median_ratio(jobs, bases), "target_ratio": TARGET_START}


def _wait(job_id, timeout=1800):
    """Seconds until every task of the job has ended (sacct, every 0.5 s)."""
    while timeout > 0:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,End"],
                             capture_output=True, text=True).stdout
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        if rows and not any("[" in r[0] or r[2] in ("Unknown", "") for r in rows):
            return
        time.sleep(0.5)
        timeout -= 0.5
    raise RuntimeError(f"job {job_id} did not end")


def _cluster_cpus():
    out = subprocess.run(["sinfo", "-h", "-o", "%C"], capture_output=True, text=True).stdout.split()
    return int(out[0].split("/")[-1]) if out else 1


def _usage(folder, log_dir, job_id):
    """Used (GB-hours, CPU-hours, epoch seconds) from each run's usage.json and metrics; asked per task."""
    from mnist import rundir
    from mnist.launch import record
    from mnist.launch.resources import memory_bytes_of, time_seconds

    used_gbh = used_cpuh = epochs_s = 0.0
    startups, runs_s = [], []
    for run_dir in sorted(p for p in Path(folder).iterdir() if (p / "config.yaml").exists()):
        for attempt in rundir.read_usage(run_dir):
            for f in attempt.ranks.values():
                used_gbh += f.peak_rss / 2**30 * f.wall_s / 3600
                used_cpuh += f.cpu_s / 3600
            first = attempt.task is None or attempt.task.index == 0  # each task's start-up counted once
            startups += [attempt.startup_s] if first and attempt.startup_s else []
            runs_s.append(attempt.work_s)
        epochs_s += sum(row["seconds"] for row in rundir.read_metrics(run_dir))
    tasks = {e.job_id: e for e in record.read(log_dir) if e.job_id.split("_")[0] == job_id}
    asked_gbh = asked_cpuh = 0.0
    for entry in tasks.values():
        config = rundir.read_config(entry.run_dir)
        hours = time_seconds(config["resources"]["time"]) * (entry.pack or (0, 1))[1] / 3600
        asked_gbh += memory_bytes_of(config["resources"]["mem"]) / 2**30 * hours
        asked_cpuh += config["resources"]["cpus_per_task"] * hours
    return {"asked_gb_h": asked_gbh, "used_gb_h": used_gbh, "asked_cpu_h": asked_cpuh, "used_cpu_h": used_cpuh,
            "epochs_s": epochs_s, "tasks": len(tasks), "task_startup_s": statistics.median(startups or [0]),
            "run_s": statistics.median(runs_s or [0])}


def _sweep(tmp, data_root, runs, name, extra):
    log_dir, folder = tmp / "logs", tmp / name
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mnist.run", "-m", "launcher=slurm", "data=fashion_mnist",
                          f"data.root={data_root}", "trainer.epochs=1", f"trainer.seed=range({runs})",
                          f"launcher.array_parallelism={runs}", f"launcher.log_dir={log_dir}",
                          f"hydra.sweep.dir={folder}", *extra], capture_output=True, text=True, cwd=tmp)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    submit_s = time.perf_counter() - start
    job_id = submitted_job(out.stdout)
    _wait(job_id)
    wall = time.perf_counter() - start
    figures = _usage(folder, log_dir, job_id)
    chosen = [line for line in out.stdout.splitlines() if "=auto:" in line]
    cpus = _cluster_cpus()
    return {"wall_s": wall, "submit_s": submit_s, "cpus": cpus, "cpu_share": figures["epochs_s"] / (wall * cpus),
            "chosen": chosen, **figures}


def waves_model(sweep):
    """Where a sweep's time goes, from its median rounds' own figures: submitting (c); each task's own time, Slurm's
    (G: scheduling it, srun's step, Python's exit) and its start-up (S, its process start to its first run's start);
    a run (R); and the waves of tasks the cluster's CPUs run in turn: c + waves x (G + S + k x R) for k runs a task.
    G is what the unpacked sweep's wall time leaves over; the packed wall this predicts from it, its ratio to the
    unpacked one, and the per-task time G + S (or the R) at which the ratio would meet the target, the other
    figures as measured (None: none would)."""
    packed, unpacked, t = sweep["packed"], sweep["unpacked"], TARGET_PACKED
    c_p, c_u = packed["submit_s"], unpacked["submit_s"]
    w_p, w_u = (math.ceil(x["tasks"] / x["cpus"]) for x in (packed, unpacked))
    k_p, k_u = (math.ceil(sweep["runs"] / x["tasks"]) for x in (packed, unpacked))
    S = statistics.mean([packed["task_startup_s"], unpacked["task_startup_s"]])
    R = statistics.mean([packed["run_s"], unpacked["run_s"]])
    G = max(0.0, (unpacked["wall_s"] - c_u) / w_u - S - k_u * R)
    # c_p + w_p (O + k_p R) <= t (c_u + w_u (O + k_u R)) with O = G + S, solved for O, then for R
    o_gain, r_cost = t * w_u - w_p, w_p * k_p - t * w_u * k_u
    o_needed = (c_p - t * c_u + R * r_cost) / o_gain if o_gain > 0 else None
    r_needed = (t * c_u - c_p + (G + S) * o_gain) / r_cost if r_cost > 0 else None
    return {"submit_packed_s": c_p, "submit_unpacked_s": c_u, "slurm_per_task_s": G, "startup_s": S, "run_s": R,
            "waves": {"packed": w_p, "unpacked": w_u},
            "predicted_ratio": (c_p + w_p * (G + S + k_p * R)) / (c_u + w_u * (G + S + k_u * R)),
            "per_task_for_target_s": o_needed if o_needed and o_needed > 0 else None,
            "run_for_target_s": r_needed if r_needed and r_needed > 0 else None}


def measure_sweep(data_root, runs=20, pack=5, rounds=3):
    why = slurm_unreachable()
    if why:
        return {"skipped": why}
    extra = {"unpacked": [], "packed": [f"launcher.runs_per_task={pack}", "resources=auto"]}
    sweeps = {name: [] for name in extra}
    with tempfile.TemporaryDirectory(prefix="sweep-speed-", dir=os.getcwd()) as tmp:
        tmp = Path(tmp)
        for round_ in range(rounds):  # the first unpacked first: packed's resources=auto sizes from its runs
            for name in extra if round_ % 2 == 0 else reversed(extra):
                sweeps[name].append(_sweep(tmp, data_root, runs, f"{name}{round_}", extra[name]))
        suggested = subprocess.run([sys.executable, "-m", "mnist.jobs", "--logs", str(tmp / "logs"), "suggest",
                                    "data=fashion_mnist", "model=cnn", "trainer.epochs=1"],
                                   capture_output=True, text=True).stdout.splitlines()
    walls = {name: [s["wall_s"] for s in done] for name, done in sweeps.items()}
    median_round = {name: sorted(done, key=lambda s: s["wall_s"])[len(done) // 2] for name, done in sweeps.items()}
    result = {"runs": runs, "pack": pack, "rounds": rounds, **median_round,
              "ratio": median_ratio(walls["packed"], walls["unpacked"]),
              "round_ratios": [p / u for p, u in zip(walls["packed"], walls["unpacked"])],
              "target_ratio": TARGET_PACKED, "cnn_suggested": suggested}
    result["model"] = waves_model(result)
    return result


def _s(seconds):
    return "-" if seconds is None else f"{seconds:.2f} s"


def table(results):
    lines = []
    start = results.get("lean_start")
    if start:
        lines.append(f"lean start (median of {start['rounds']})  import torch + read data "
                     f"{start['import_torch_and_read_s']:.2f} s   job start to first batch "
                     f"{start['job_to_first_batch_s']:.2f} s   {start['ratio']:.2f}x (target <= {TARGET_START}x)")
    sweep = results.get("packed_sweep")
    if sweep and "skipped" in sweep:
        lines.append(f"packed sweep: skipped: {sweep['skipped']}")
    elif sweep:
        for name in ("unpacked", "packed"):
            s = sweep[name]
            lines.append(f"{sweep['runs']} runs {name:<8} ({s['tasks']:>2} tasks) {s['wall_s']:6.1f} s to result, "
                         f"useful CPU share {s['cpu_share']:.0%}, asked {s['asked_gb_h']:.3f} GB-h / "
                         f"{s['asked_cpu_h']:.3f} CPU-h, used {s['used_gb_h']:.3f} GB-h / {s['used_cpu_h']:.3f} CPU-h")
        rounds = ", ".join(f"{ratio:.2f}" for ratio in sweep["round_ratios"])
        lines.append(f"packed/unpacked wall {sweep['ratio']:.2f}x, median of {sweep['rounds']} rounds ({rounds}) "
                     f"(target <= {TARGET_PACKED}x)")
        m = sweep["model"]
        lines.append(
            f"  where the time goes: submit {m['submit_unpacked_s']:.1f} s unpacked / "
            f"{m['submit_packed_s']:.1f} s packed; a task's own time G + S, Slurm's G "
            f"{m['slurm_per_task_s']:.2f} s (the rest of the unpacked wall: scheduling, "
            f"srun, exit) + its start-up S {m['startup_s']:.2f} s; a run R {m['run_s']:.2f} s; the CPUs run the tasks "
            f"in {m['waves']['unpacked']} waves of G + S + R unpacked, "
            f"{m['waves']['packed']} of G + S + {sweep['pack']}R "
            f"packed: {m['predicted_ratio']:.2f}x predicted; {TARGET_PACKED}x would need G + S >= "
            f"{_s(m['per_task_for_target_s'])} or R <= {_s(m['run_for_target_s'])}")
        lines += [f"  auto (MLP): {line}" for line in sweep["packed"]["chosen"]]
        lines += [f"  suggest (CNN): {line}" for line in sweep["cnn_suggested"]]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_DATA", "data"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pack", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if min(args.runs, args.pack, args.rounds) < 1:
        parser.error("--runs, --pack and --rounds take a positive count")
    root = os.path.abspath(args.data_root)
    results = {"lean_start": measure_start(root),
               "packed_sweep": measure_sweep(root, args.runs, args.pack, args.rounds)}
    print("\n".join(table(results)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
