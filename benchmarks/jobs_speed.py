"""How fast `python -m mnist.jobs` answers for a record of many jobs, on a login node.

    python -m benchmarks.jobs_speed [--jobs 500] [--rounds 3]

Writes a record of N jobs (arrays of 100 tasks) with a run folder each (config.yaml, metrics.csv,
usage.json, a log and an .err, one task in ten failed with a traceback), then times, in the same
run, each round one after the other:

listing    `python -m mnist.jobs --logs ...` (the whole table: the record, one squeue -r and one sacct
           call for all jobs, every run's usage.json and the ends of the logs);
baseline   the floor any such command pays: `python -c "import mnist.launch.record"` plus the same
           squeue -r and sacct calls, as subprocesses.

With a Slurm up (`make cluster-up`, then the `export SLURM_CONF=...` it prints) both ask it (the ids are
ones it never had, as for jobs it has forgotten, so every job is read from its files); without, both
find SLURM_CONF naming no file and skip Slurm. Prints medians, the ratio, and whether the listing met
the target (TARGET_S) and imported torch (it must not). Compare figures within one run only.
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

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 1.0
CONFIG = ("model: {name: mlp}\noptimizer: {name: adadelta}\ntrainer: {epochs: 2, seed: 1}\n"
          "data: {name: mnist, batch_size: 64}\nresources: {time: '0:5:0', mem: 2G, nodes: 1, tasks_per_node: 1}\n")
LIST_CHECK = ("import sys\nfrom mnist.jobs import main\nmain(sys.argv[1:])\n"
              "print('TORCH:', 'torch' in sys.modules, file=sys.stderr)\n")


def write_record(folder, n):
    """N jobs, in arrays of 100 tasks, each with its run folder and logs; every tenth failed."""
    logs = folder / "logs"
    logs.mkdir(parents=True)
    entries = []
    for i in range(n):
        array, task = 990000 + i // 100, i % 100
        job_id, run_dir = f"{array}_{task}", folder / "multirun" / str(array) / str(task)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(CONFIG)
        (run_dir / "metrics.csv").write_text("epoch,train_loss,test_loss,accuracy,seconds,samples_per_s\n"
                                             "1,0.5,0.4,0.9,1.2,50000\n")
        usage = {"id": f"{job_id}#0", "job_id": job_id, "restart": 0, "started": "2026-11-25T14:03:08",
                 "end": "error" if task % 10 == 9 else "completed",
                 "ranks": {"0": {"host": "node1", "peak_rss": 900 << 20, "cpu_s": 8.5, "wall_s": 10.2, "cpus": 1}}}
        (run_dir / "usage.json").write_text(json.dumps({"attempts": [usage]}))
        out, err = logs / f"mlp_{job_id}.out", logs / f"mlp_{job_id}.err"
        out.write_text("".join(f"Train Epoch: 1 [{k * 640}/60000 ({k}%)]\tLoss: 0.5\n" for k in range(100)))
        err.write_text("Traceback (most recent call last):\nValueError: boom\n" if task % 10 == 9 else "")
        entries.append({"job_id": job_id, "name": "mlp", "model": "mlp", "run_dir": str(run_dir), "stdout": str(out),
                        "stderr": str(err), "submitted": "2026-11-25T14:03:07", "submitit_folder": "",
                        "mem": "2G", "time": "0:5:0", "cpus": 1})
    (logs / "jobs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return logs, sorted({e["job_id"].split("_")[0] for e in entries})


def timed(argv, env):
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, result


def baseline(arrays, env):
    """The floor: start Python with the record module, and ask squeue and sacct once each."""
    from mnist.launch import record

    ids = ",".join(arrays)
    seconds, _ = timed([sys.executable, "-c", "import mnist.launch.record"], env)
    if not Path(env.get("SLURM_CONF", "/nonexistent")).is_file():
        return seconds
    for command in (["squeue", "-r", "-h", "-j", ids, "-O", ",".join(f + ":|" for f in record.SQUEUE_FIELDS)],
                    ["sacct", "-n", "-P", "-j", ids, "-o", ",".join(record.SACCT_FIELDS)]):
        more, _ = timed(command, env)
        seconds += more
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jobs_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        slurm = bool(env.get("SLURM_CONF")) and Path(env["SLURM_CONF"]).is_file()
        if not slurm:
            env["SLURM_CONF"] = str(Path(tmp) / "no-slurm.conf")
        logs, arrays = write_record(Path(tmp), args.jobs)
        listing, floor = [], []
        for _ in range(args.rounds):
            seconds, result = timed([sys.executable, "-c", LIST_CHECK, "--logs", str(logs)], env)
            if result.returncode != 0 or result.stdout.count("\n") < args.jobs:
                sys.exit(f"mnist.jobs failed:\n{result.stderr}")
            listing.append(seconds)
            floor.append(baseline(arrays, env))
        torch = "TORCH: True" in result.stderr
        median, base = statistics.median(listing), statistics.median(floor)
        print(f"{args.jobs} jobs, {'with Slurm (' + env['SLURM_CONF'] + ')' if slurm else 'no Slurm reachable'}, "
              f"medians of {args.rounds} rounds:")
        verdict = "met" if median <= TARGET_S else "MISSED"
        print(f"  python -m mnist.jobs   {median:6.2f} s   (target {TARGET_S:g} s: {verdict})")
        print(f"  baseline               {base:6.2f} s   "
              f"(python + import mnist.launch.record + one squeue + one sacct)")
        print(f"  ratio                  {median / base:6.2f}x")
        print(f"  torch imported: {'YES (must not be)' if torch else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
