"""Training speed: the in-memory data path against the course's pipeline and the compute floor.

    python -m benchmarks.train_speed [--data-root DIR] [--models mlp,cnn] [--out FILE] [--quick]
    make bench ARGS='--data-root DIR'

For each model, on Fashion-MNIST with the reference settings (Adadelta lr 1.0, seed 1, batch 64,
test batch 1000, on the CPU with all the CPUs we may use), this process trains one epoch three ways:

  in-memory  the project's way: mnist.data.loaders() (the split as one uint8 tensor, one
             indexing per batch) through mnist.train.train_epoch
  classic    the course's way: torchvision's dataset with ToTensor()+Normalize per sample,
             through a DataLoader (batch 64, shuffle=True, no workers), in the course's loop
  floor      the model's compute floor: train_epoch's forward/backward/step calls, as many and
             with the same batch sizes, all on one pre-made batch; no data path at all

and passes over the test set both ways: mnist.train.evaluate on the in-memory loader, and the
course's test loop (each batch of 1000 in one forward pass) on a DataLoader of batch 1000.

The three epochs of a round run side by side, in turns of 10 batches (the test passes: of one
batch), so that a burst of other work on the machine, or its speed drifting (it does, by tens of
percent, on this shared VM), slows all paths alike. After a short warm-up, a model gets another
round (up to --repeat, in a rotated order) while its rounds so far took under --budget seconds:
the MLP gets 3, the CNN 1; test passes get --repeat rounds. Seconds are medians over rounds;
ratios are medians of the ratios within each round. The report says which share of the CPUs other
processes took meanwhile, and warns above 5%: two-thread torch slows down many times over when it
shares its cores, so such figures mean little.

Peak memory: the in-memory and the classic pipeline each train one epoch and evaluate once in a
child process of their own (this module again), which reports its VmHWM: the peak resident memory
of its own address space, so the interpreter, torch, the data as that pipeline holds it, the
model, the optimizer state and the batches. Identical MLP runs agree within 0.2 MiB; identical
CNN runs differ by up to 4% (the allocator's state after an epoch decides where evaluation's
batches of 1000 land), so "no higher than classic's" allows 5%. (Not ru_maxrss: Linux carries it
over from the parent through fork and exec, so a child reports at least the parent's peak.)

Reading the table: `x in-mem` and `x floor` are a row's epoch time over the in-memory and the floor
epoch times. The in-memory row's `x floor` is what the data path adds to the model's own
arithmetic; the classic row's `x in-mem` is the speedup over the course's pipeline. All figures,
the targets and whether each is met also go to --out as JSON. Compare figures within one run only.

Speed switches (--sections switches): each trainer.* switch that applies (bf16, fp16 on a GPU,
channels_last for the CNN, compile) trains the in-memory path's batches in turns with the default,
after a warm-up of 10 batches (for compile: the compilation, from an emptied cache); `speedup` is
the default's time over the switch's, median of rounds. --device cuda measures them on a GPU.

Data-parallel steps (--sections parallel): two ranks of this machine (gloo on the CPU, one thread each;
NCCL on two GPUs, skipped with fewer) train the same batches with the stop agreement (an all-reduce and
a wait for its answer) every step, as it was, every log_interval steps, as it is, and never (the baseline:
once per round), in rotated turns; `x baseline` is the median over rounds of each one's time over the
baseline's in the same round.

Submitting (--sections submit, sweep) and searching (--sections search, with a Slurm up: a 24-trial search
against a 24-run grid over the same space): benchmarks/submit_speed.py, sweep_speed.py, search_speed.py.

On a GPU machine, `make bench ARGS='--device cuda'` is the whole GPU record in one go: the epochs and test
passes with the data on the GPU, each speed switch, and the data-parallel step (with 2 GPUs), written to
bench/train_speed_cuda.json.

The record: benchmarks/record.json holds each target's best value so far (commit, date); the
report shows it beside this run's, and --save-record writes the ones this run beats (whole
epochs only; run it on a quiet machine, and commit the file).
"""
import argparse
import itertools
import json
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchvision import datasets, transforms

from benchmarks import search_speed, submit_speed, sweep_speed
from mnist import data, datafiles, env, registry
from mnist.config import compose, report_errors
from mnist.losses import Loss
from mnist.precision import Precision
from mnist.train import Steps, build, evaluate, train_epoch

PATHS = ("in_memory", "classic", "floor")
SECTIONS = ("train", "switches", "parallel", "submit", "sweep", "search")
ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "record.json"  # the best value of each target so far: make bench ARGS=--save-record
DEBIAN_COPY = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
PEAK_NOISE = 0.05  # identical CNN runs' peaks differ by up to 4% here: "no higher" allows 5%
NOISY = 0.05  # other processes' share of the CPUs above which the report warns
QUICK_BATCHES = 20
WARM_UP_BATCHES = 10
TURN_BATCHES = 10  # training batches a path runs before the next path's turn
NEVER = 10**9  # a log_interval; train_epoch still logs batch 0, to this logger that drops it
QUIET = logging.getLogger("benchmarks.train_speed")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


def nll(model):
    """The course's loss (loss=nll) for this model, as the runs here use it."""
    return Loss({"name": "nll"}, model.output)


def classic_loader(data_cfg, train, batch_size, shuffle):
    """The course's pipeline: torchvision's dataset, ToTensor()+Normalize per sample, a DataLoader."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((data_cfg.mean,), (data_cfg.std,))])
    dataset = getattr(datasets, registry.DATASETS[data_cfg.name])(data_cfg.root, train=train, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def classic_train(model, train_loader, optimizer):
    """The course's training loop (pytorch/examples' train()), without its log lines."""
    model.train()
    device = next(model.parameters()).device
    for images, target in train_loader:
        images, target = images.to(device), target.to(device)
        optimizer.zero_grad()
        loss = nll(model)(model(images), target)
        loss.backward()
        optimizer.step()


def classic_test(model, test_loader):
    """The course's test loop (pytorch/examples' test())."""
    model.eval()
    test_loss, correct = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for images, target in test_loader:
            images, target = images.to(device), target.to(device)
            output = model(images)
            test_loss += nll(model)(output, target, reduction="sum").item()
            correct += (output.argmax(dim=1) == target).sum().item()
    return test_loss / len(test_loader.dataset), correct


class OneBatch:
    """The compute floor: the batch sizes of an epoch of `loader`, each cut from its first batch."""

    def __init__(self, loader):
        self.images, self.labels = next(iter(loader))
        self.batch_size, self.dataset_size, self.device = loader.batch_size, loader.dataset_size, loader.device
        self.rank, self.world_size = 0, 1
        self.sizes = [min(self.batch_size, self.dataset_size - start)
                      for start in range(0, self.dataset_size, self.batch_size)]

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.sizes)

    def __iter__(self):
        for size in self.sizes:
            yield self.images[:size], self.labels[:size]


class FirstBatches:
    """At most n batches per epoch of a loader (--max-batches, --quick)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return min(len(self.loader), self.n)

    def __iter__(self):
        return itertools.islice(self.loader, len(self))


class Turn:
    """The next n batches of an epoch in progress, as a loader: lets several epochs advance in turns."""

    def __init__(self, loader, batches, n):
        self.loader, self.batches, self.n = loader, batches, n

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.n

    def __iter__(self):
        return itertools.islice(self.batches, self.n)


def limit(loader, max_batches):
    return loader if max_batches is None else FirstBatches(loader, max_batches)


def samples(loader):
    """How many samples one epoch of `loader` yields: only its last batch can be short."""
    return min(len(loader) * loader.batch_size, loader.dataset_size)


def loaders(cfg, path, max_batches):
    """The (train, test) loaders of the in-memory or the classic pipeline."""
    if path == "in_memory":
        train_loader, test_loader = data.loaders(cfg.data, cfg.trainer.seed, device_of(cfg))
    else:
        train_loader = classic_loader(cfg.data, True, cfg.data.batch_size, shuffle=True)
        test_loader = classic_loader(cfg.data, False, cfg.data.test_batch_size, shuffle=False)
    return limit(train_loader, max_batches), limit(test_loader, max_batches)


def one_epoch(model, train_loader, optimizer, precision=None):
    precision = precision or Precision("fp32", next(model.parameters()).device)
    train_epoch(Steps(model, optimizer, nll(model), precision, QUIET, log_interval=NEVER), train_loader, 1)


TRAIN = {"in_memory": one_epoch, "classic": classic_train, "floor": one_epoch}
TEST = {"in_memory": lambda model, loader: evaluate(model, loader, nll(model)), "classic": classic_test}


def device_of(cfg):
    return env.pick_device(cfg.trainer.device)


def fresh(cfg):
    torch.manual_seed(cfg.trainer.seed)
    model, optimizer, _, _ = build(cfg, device_of(cfg))
    return model, optimizer


def in_turns(loaders, run, turn_batches):
    """Seconds each loader's epoch took under `run(path, part)`, the epochs advancing `turn_batches`
    batches at a time in turns, so that a burst of other work on the machine hits them all alike."""
    batches = {path: iter(loader) for path, loader in loaders.items()}
    seconds = dict.fromkeys(loaders, 0.0)
    for _ in range(0, len(next(iter(loaders.values()))), turn_batches):
        for path, loader in loaders.items():
            synchronize()
            started = time.perf_counter()
            run(path, Turn(loader, batches[path], turn_batches))
            synchronize()
            seconds[path] += time.perf_counter() - started
    return seconds


def synchronize():
    """Wait for the GPU's queued work, so that it counts to the turn that queued it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_epochs(cfg, train_loaders):
    """One training epoch per loader, each with its own fresh model and optimizer."""
    runs = {path: fresh(cfg) for path in train_loaders}
    return in_turns(train_loaders, lambda path, part: TRAIN[path](runs[path][0], part, runs[path][1]), TURN_BATCHES)


def time_evaluations(model, test_loaders):
    return in_turns(test_loaders, lambda path, part: TEST[path](model, part), 1)


def cpu_seconds():
    """(CPU seconds every process has used, from /proc/stat; this process's own), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


def others_share(before, after, seconds):
    """The share of the machine's CPUs that other processes used meanwhile: the timings' noise."""
    if before is None or after is None:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(others, 0.0) / (seconds * os.cpu_count())


def rotated(paths, turn):
    turn %= len(paths)
    return paths[turn:] + paths[:turn]


def medians(rounds, paths):
    return {path: statistics.median(seconds[path] for seconds in rounds) for path in paths}


def ratio(rounds, path, base):
    """The median over rounds of path's time over base's in the same round: machine speed that
    drifts between rounds cancels out."""
    return submit_speed.median_ratio([seconds[path] for seconds in rounds], [seconds[base] for seconds in rounds])


def seconds_of(seconds):
    return ", ".join(f"{path} {value:.2f} s" for path, value in seconds.items())


def progress(text):
    print(text, file=sys.stderr, flush=True)


def measure(cfg, args):
    name = cfg.model.name
    train_in_memory, test_in_memory = loaders(cfg, "in_memory", args.max_batches)
    train_classic, test_classic = loaders(cfg, "classic", args.max_batches)
    train = {"in_memory": train_in_memory, "classic": train_classic,
             "floor": limit(OneBatch(train_in_memory), args.max_batches)}
    test = {"in_memory": test_in_memory, "classic": test_classic}

    model, optimizer = fresh(cfg)  # warm-up: the first calls allocate and choose their kernels
    one_epoch(model, FirstBatches(train["floor"], WARM_UP_BATCHES), optimizer)
    TEST["in_memory"](model, FirstBatches(test["in_memory"], 1))

    epoch_rounds, eval_rounds = [], []
    cpu_before, started = cpu_seconds(), time.perf_counter()
    for turn in range(args.repeat):
        if turn and time.perf_counter() - started > args.budget:
            break
        epoch_rounds.append(time_epochs(cfg, {path: train[path] for path in rotated(PATHS, turn)}))
        progress(f"{name} epochs, round {turn + 1}: {seconds_of(epoch_rounds[-1])}")
    for turn in range(args.repeat):
        order = {path: test[path] for path in rotated(tuple(test), turn)}
        eval_rounds.append(time_evaluations(model, order))
        progress(f"{name} evaluations, round {turn + 1}: {seconds_of(eval_rounds[-1])}")
    busy = others_share(cpu_before, cpu_seconds(), time.perf_counter() - started)
    peak = {}
    for path in ("in_memory", "classic"):
        peak[path] = peak_memory(cfg, path, args.max_batches)
        progress(f"{name} {path} peak memory: {peak[path]} MiB")

    epoch_s, eval_s = medians(epoch_rounds, PATHS), medians(eval_rounds, test)
    n = samples(train["in_memory"])
    return {
        "rounds": len(epoch_rounds),
        "other_processes_cpu_share": busy,
        "train_samples": n,
        "test_samples": samples(test["in_memory"]),
        "epoch_s": epoch_s,
        "samples_per_s": {path: n / seconds for path, seconds in epoch_s.items()},
        "eval_s": eval_s,
        "peak_mib": peak,
        "ratios": {
            "in_memory_over_floor": ratio(epoch_rounds, "in_memory", "floor"),
            "classic_over_floor": ratio(epoch_rounds, "classic", "floor"),
            "classic_over_in_memory": ratio(epoch_rounds, "classic", "in_memory"),
            "eval_classic_over_in_memory": ratio(eval_rounds, "classic", "in_memory"),
            "peak_in_memory_over_classic": (peak["in_memory"] / peak["classic"]
                                            if None not in peak.values() else None),
        },
        "epoch_s_rounds": epoch_rounds,
        "eval_s_rounds": eval_rounds,
    }


SWITCHES = {"bf16": "trainer.precision=bf16", "fp16": "trainer.precision=fp16",
            "channels_last": "trainer.channels_last=true", "compile": "trainer.compile=true"}
SWITCH_BATCHES = {"mlp": 200, "cnn": 30}  # per round: a few seconds of the default on this CPU


def switches_for(cfg, wanted):
    """The switches wanted that apply: fp16 only on a GPU, channels-last only to a convolutional model."""
    on_gpu = device_of(cfg).type == "cuda"
    return [name for name in wanted
            if (name != "fp16" or on_gpu) and (name != "channels_last" or cfg.model.arch == "cnn")]


def measure_switches(cfg, args):
    """Each trainer.* speed switch against the default, on the run's device: training batches of the
    in-memory path in turns, after a warm-up (which, for compile, is the compilation)."""
    name = cfg.model.name
    variants = {"default": cfg} | {switch: config(args, name, [SWITCHES[switch]])
                                   for switch in switches_for(cfg, args.switches)}
    train_loader, _ = data.loaders(cfg.data, cfg.trainer.seed, device_of(cfg))
    runs, warm_up_s = {}, {}
    for switch, variant in variants.items():
        torch.manual_seed(variant.trainer.seed)
        model, optimizer, _, precision = build(variant, device_of(variant))
        step_model = torch.compile(model) if variant.trainer.compile else model
        started = time.perf_counter()
        one_epoch(step_model, FirstBatches(train_loader, WARM_UP_BATCHES), optimizer, precision)
        synchronize()
        warm_up_s[switch] = time.perf_counter() - started
        runs[switch] = (step_model, optimizer, precision)
    batches = min(args.max_batches or SWITCH_BATCHES[name], SWITCH_BATCHES[name])
    rounds = []
    for turn in range(args.repeat):
        order = {switch: FirstBatches(train_loader, batches) for switch in rotated(tuple(variants), turn)}
        rounds.append(in_turns(order, lambda switch, part: one_epoch(runs[switch][0], part, *runs[switch][1:]),
                               TURN_BATCHES))
        progress(f"{name} switches, round {turn + 1}: {seconds_of(rounds[-1])}")
    return {
        "batches": batches,
        "batch_ms": {switch: 1000 * seconds / batches for switch, seconds in medians(rounds, variants).items()},
        "speedup": {switch: ratio(rounds, "default", switch) for switch in variants},
        "warm_up_s": warm_up_s,
    }


AGREEMENTS = {"never": NEVER, "every step": 1, "every log_interval": 0}  # Steps.agree_every (0: log_interval)
PARALLEL_BATCHES = {"mlp": 200, "cnn": 20}  # per rank, per turn: about a second of the default here


def measure_parallel(cfg, args):
    """Two ranks' data-parallel steps with the stop agreement every step, every log_interval and never."""
    if device_of(cfg).type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs; this machine has {torch.cuda.device_count()}"}
    with socket.socket() as probe, tempfile.TemporaryDirectory(prefix="bench-parallel-") as out:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        torch.multiprocessing.spawn(parallel_rank, args=(cfg, args, port, out), nprocs=2)
        return json.loads(Path(out, "rank0.json").read_text())


def parallel_rank(rank, cfg, args, port, out):
    """One rank of measure_parallel: every rank takes the same turns (their all-reduces pair up); rank 0 reports."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    device = env.pick_device(cfg.trainer.device, rank)
    torch.set_num_threads(max(1, env.cpu_threads() // 2))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        train_loader, _ = data.loaders(cfg.data, cfg.trainer.seed, device, rank, 2)
        torch.manual_seed(cfg.trainer.seed)
        model, optimizer, _, precision = build(cfg, device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        steps = {name: Steps(ddp, optimizer, nll(model), precision, QUIET, cfg.trainer.log_interval, agree_every=every)
                 for name, every in AGREEMENTS.items()}
        train_epoch(steps["never"], FirstBatches(train_loader, WARM_UP_BATCHES), 1)
        batches = len(FirstBatches(train_loader, min(args.max_batches or NEVER, PARALLEL_BATCHES[cfg.model.name])))
        rounds = []
        for turn in range(args.repeat):
            order = {name: FirstBatches(train_loader, batches) for name in rotated(tuple(AGREEMENTS), turn)}
            rounds.append(in_turns(order, lambda name, part: train_epoch(steps[name], part, 1), batches))
            if rank == 0:
                progress(f"{cfg.model.name} data-parallel, round {turn + 1}: {seconds_of(rounds[-1])}")
        if rank == 0:
            Path(out, "rank0.json").write_text(json.dumps({
                "batches": batches, "log_interval": cfg.trainer.log_interval, "backend": dist.get_backend(),
                "step_ms": {name: 1000 * seconds / batches for name, seconds in medians(rounds, AGREEMENTS).items()},
                "over_baseline": {name: ratio(rounds, name, "never") for name in AGREEMENTS}}))
    finally:
        dist.destroy_process_group()


def peak_memory(cfg, path, max_batches):
    """Peak resident MiB of a fresh process that trains one epoch and evaluates once through `path`."""
    command = [sys.executable, "-m", "benchmarks.train_speed", "--peak-memory-of", path,
               "--models", cfg.model.name, "--data-root", cfg.data.root, "--device", cfg.trainer.device]
    if max_batches is not None:
        command += ["--max-batches", str(max_batches)]
    child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"The peak-memory run ({' '.join(command)}) failed:\n{child.stderr}")
    return json.loads(child.stdout.splitlines()[-1])["peak_mib"]


def peak_memory_child(cfg, path, max_batches):
    train_loader, test_loader = loaders(cfg, path, max_batches)
    model, optimizer = fresh(cfg)
    TRAIN[path](model, train_loader, optimizer)
    TEST[path](model, test_loader)
    print(json.dumps({"peak_mib": own_peak_mib()}))


def own_peak_mib():
    """VmHWM: this address space's peak resident memory (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def targets(report):
    rows = []
    for name, r in report.get("models", {}).items():
        rows.append((name, "epoch within 1.1x of the compute floor", r["ratios"]["in_memory_over_floor"], "<=", 1.1))
        if name == "cnn":
            rows.append((name, "test-set evaluation >= 1.5x faster than classic",
                         r["ratios"]["eval_classic_over_in_memory"], ">=", 1.5))
        rows.append((name, f"peak memory of a training run <= classic's (+{PEAK_NOISE:.0%} noise)",
                     r["ratios"]["peak_in_memory_over_classic"], "<=", 1 + PEAK_NOISE))
    path = report.get("submit_path")
    if path:
        rows.append(("submit", f"dry run within {path['target_ratio']}x of `import hydra`, no torch", path["ratio"],
                     "<=", path["target_ratio"]))
    start, packed = report.get("lean_start"), report.get("packed_sweep", {})
    if start:
        rows.append(("sweep", f"job start to first batch within {start['target_ratio']}x of import torch + data",
                     start["ratio"], "<=", start["target_ratio"]))
    if "ratio" in packed:
        rows.append(("sweep", f"{packed['runs']} runs packed by {packed['pack']}: wall within "
                              f"{packed['target_ratio']}x of unpacked, median of {packed['rounds']} rounds",
                     packed["ratio"], "<=",
                     packed["target_ratio"]))
    found = report.get("search", {})
    if "epochs_ratio" in found:
        rows.append(("search", f"{found['trials']} trials: at most {found['target_epochs_ratio']}x the "
                               f"{found['runs']}-run grid's epochs", found["epochs_ratio"], "<=",
                     found["target_epochs_ratio"]))
        rows.append(("search", f"{found['trials']} trials: best accuracy at most {found['target_points']} points "
                               f"behind the grid's", found["points_behind"], "<=", found["target_points"]))
    sweep = report.get("sweep", {})
    if "ratio" in sweep:
        rows.append(("sweep", f"{sweep['n']} runs: one array faster than {sweep['n']} submissions", sweep["ratio"],
                     ">=", 1.0))
    checks = [{"model": name, "target": what, "value": value, "limit": bound,
               "better": "lower" if op == "<=" else "higher",
               "met": None if value is None else (value <= bound if op == "<=" else value >= bound)}
              for name, what, value, op, bound in rows]
    for check in checks:
        if check["model"] == "submit" and path["heavy_imported"]:  # fast, but by importing torch: not met
            check["met"] = False
    return checks


def against_record(checks, record):
    """Each target's best value so far (benchmarks/record.json), and whether this run beats it."""
    for check in checks:
        best = record.get(f"{check['model']}: {check['target']}", {}).get("value")
        check["record"] = best
        check["new_record"] = check["value"] is not None and (
            best is None or (check["value"] < best if check["better"] == "lower" else check["value"] > best))


def updated_record(checks, record, commit):
    """The record with this run's new bests in it."""
    record = dict(record)
    for check in checks:
        if check["new_record"]:
            record[f"{check['model']}: {check['target']}"] = {
                "value": round(check["value"], 3), "commit": commit, "date": time.strftime("%Y-%m-%d")}
    return record


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def noisy(report):
    shares = [r["other_processes_cpu_share"] for r in report.get("models", {}).values()]
    return any(share is None or share > NOISY for share in shares)


def print_report(report):
    settings, results = report["settings"], report.get("models", {})
    if results:
        print_training(results, settings)
    if "switches" in report:
        print_switches(report["switches"], settings)
    if "parallel" in report:
        print_parallel(report["parallel"], settings)
    submission = submit_speed.table(report) + sweep_speed.table(report) + search_speed.table(report)
    if submission:
        print("\nOn the login node:\n" + "\n".join(submission))
    if report["targets"]:
        print("\nTargets:")
    for check in report["targets"]:
        verdict = {True: "met", False: "NOT met", None: "unknown"}[check["met"]]
        record = "no record yet" if check["record"] is None else f"record {check['record']:.2f}x"
        beaten = ", beaten" if check["new_record"] and check["record"] is not None else ""
        print(f"  {verdict:<8} {check['model']:<6} {check['target']:<58} {fmt(check['value'], '.2f')}x "
              f"(limit {check['limit']:g}x; {record}{beaten})")


def print_training(results, settings):
    rounds = ", ".join(f"{name} {r['rounds']}" for name, r in results.items())
    samples = next(iter(results.values()))["train_samples"]
    print(f"\n{settings['data']} on {settings['device']}, {settings['threads']} threads, {samples} training "
          f"samples per epoch. Medians of rounds: epochs {rounds}; test passes {settings['repeat']}.")
    print(f"{'model':<6} {'path':<10} {'epoch s':>8} {'samples/s':>10} {'x in-mem':>9} {'x floor':>8} "
          f"{'eval s':>7} {'peak MiB':>9}")
    for name, r in results.items():
        for path in PATHS:
            seconds = r["epoch_s_rounds"]
            print(f"{name:<6} {path.replace('_', '-'):<10} {r['epoch_s'][path]:>8.2f} "
                  f"{r['samples_per_s'][path]:>10.0f} "
                  f"{ratio(seconds, path, 'in_memory'):>9.2f} {ratio(seconds, path, 'floor'):>8.2f} "
                  f"{fmt(r['eval_s'].get(path), '.2f'):>7} {fmt(r['peak_mib'].get(path), '.0f'):>9}")
    for name, r in results.items():
        busy = r["other_processes_cpu_share"]
        if busy is not None and busy > NOISY:
            print(f"Warning: other processes used {busy:.0%} of the CPUs during the {name} timings; "
                  f"its figures are noisy. Run again on a quiet machine.")


def print_switches(switches, settings):
    print(f"\nSpeed switches on {settings['device']} (trainer.*; speedup = default's time over the switch's, "
          f"same rounds; warm-up includes compiling):")
    print(f"{'model':<6} {'switch':<14} {'ms/batch':>9} {'speedup':>8} {'warm-up s':>10}")
    for name, r in switches.items():
        for switch, ms in r["batch_ms"].items():
            print(f"{name:<6} {switch:<14} {ms:>9.2f} {r['speedup'][switch]:>8.2f} {r['warm_up_s'][switch]:>10.2f}")


def print_parallel(parallel, settings):
    print(f"\nData-parallel steps on {settings['device']}, 2 ranks; the stop agreement is an all-reduce and a wait "
          f"for it (x baseline: over never agreeing, same rounds):")
    print(f"{'model':<6} {'agreement':<28} {'ms/step':>8} {'x baseline':>11}")
    for name, r in parallel.items():
        if "skipped" in r:
            print(f"{name:<6} skipped: {r['skipped']}")
            continue
        labels = {"never": "never (baseline)", "every step": "every step (before)",
                  "every log_interval": f"every {r['log_interval']} steps (now)"}
        for agreement, label in labels.items():
            print(f"{name:<6} {label:<28} {r['step_ms'][agreement]:>8.2f} {r['over_baseline'][agreement]:>11.3f}")


def config(args, model, overrides=()):
    cfg = compose([f"model={model}", "data=fashion_mnist", f"trainer.device={args.device}", *overrides])
    if args.data_root is not None:
        cfg.data.root = os.path.abspath(os.path.expanduser(args.data_root))
    return cfg


def check_data(data_cfg):
    if datafiles.missing_files(data_cfg.root, data_cfg.name) and DEBIAN_COPY.is_dir():
        raise datafiles.DataError(
            f"Fashion-MNIST is not in {datafiles.raw_folder(data_cfg.root, data_cfg.name)}. This machine has "
            f"Debian's copy: `python -m mnist.data copy {DEBIAN_COPY} data=fashion_mnist "
            f"data.root={data_cfg.root}`, or pass --data-root DIR where the data already is."
        )
    data.ensure_dataset(data_cfg)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="the folder holding FashionMNIST/raw/ (default: data.root, "
                                            "i.e. $MNIST_DATA, else ./data)")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated conf/model names (default: mlp,cnn)")
    parser.add_argument("--out", help="JSON file to write (default: bench/train_speed.json; with --device cuda, "
                                      "bench/train_speed_cuda.json)")
    parser.add_argument("--repeat", type=int, default=3, help="most rounds of epochs, and evaluations (default: 3)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="no new round of a model's epochs after this many seconds (default: 60)")
    parser.add_argument("--max-batches", type=int, help="train and evaluate on at most N batches per epoch")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="where the models train (default: cpu; the targets are the CPU's)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated, of: %(default)s (default: all)")
    parser.add_argument("--switches", default=",".join(SWITCHES),
                        help="the speed switches to measure, of: %(default)s (default: all that apply)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke test: --max-batches {QUICK_BATCHES}")
    parser.add_argument("--submit-rounds", type=int, default=5, help="rounds of the submit-path timing (default: 5)")
    parser.add_argument("--sweep-runs", type=int, default=50, help="runs in the submitted sweep (default: 50)")
    parser.add_argument("--save-record", action="store_true",
                        help=f"write the targets this run beats into {RECORD.relative_to(ROOT)} (on a quiet machine)")
    parser.add_argument("--peak-memory-of", choices=("in_memory", "classic"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = "bench/train_speed_cuda.json" if args.device == "cuda" else "bench/train_speed.json"
    if args.quick and args.max_batches is None:
        args.max_batches = QUICK_BATCHES
    if args.repeat < 1 or (args.max_batches is not None and args.max_batches < 1):
        parser.error("--repeat and --max-batches take a positive count")
    args.sections = [section for section in args.sections.split(",") if section]
    args.switches = [switch for switch in args.switches.split(",") if switch]
    for option, given, known in (("--sections", args.sections, SECTIONS), ("--switches", args.switches, SWITCHES)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {option} {', '.join(unknown)}: choose from {', '.join(known)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    models = [name for name in args.models.split(",") if name]
    with report_errors():
        cfgs = {name: config(args, name) for name in models}
        threads = env.cpu_threads(cfgs[models[0]].trainer.threads)
        torch.set_num_threads(threads)
        if args.peak_memory_of:
            return peak_memory_child(cfgs[models[0]], args.peak_memory_of, args.max_batches)
        check_data(cfgs[models[0]].data)
        device = device_of(cfgs[models[0]])

    out = Path(args.out)
    report = {"settings": None}
    if "train" in args.sections:
        report["models"] = {name: measure(cfg, args) for name, cfg in cfgs.items()}
    if "switches" in args.sections:
        with tempfile.TemporaryDirectory(prefix="bench-compile-") as cache:  # empty: warm-ups compile afresh
            os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = cache, f"{cache}/triton"
            report["switches"] = {name: measure_switches(cfg, args) for name, cfg in cfgs.items()}
    if "parallel" in args.sections:
        report["parallel"] = {name: measure_parallel(cfg, args) for name, cfg in cfgs.items()}
    first = cfgs[models[0]]
    report["settings"] = {
        "data": first.data.name, "data_root": first.data.root, "threads": threads, "device": str(device),
        "batch_size": first.data.batch_size, "test_batch_size": first.data.test_batch_size,
        "optimizer": first.optimizer.name, "lr": first.optimizer.lr, "seed": first.trainer.seed,
        "max_batches": args.max_batches, "repeat": args.repeat, "budget_s": args.budget, "sections": args.sections,
        "statistic": "median over rounds; ratios: median of same-round ratios",
    }
    if "submit" in args.sections:
        progress("timing the submit path")
        report["submit_path"] = submit_speed.measure_submit_path(args.submit_rounds)
    if "sweep" in args.sections:
        progress(f"timing a {args.sweep_runs}-run sweep's submission")
        report["sweep"] = submit_speed.measure_sweep_submission(args.sweep_runs)
        progress("timing a job's start, and a packed sweep against an unpacked one")
        report["lean_start"] = sweep_speed.measure_start(first.data.root)
        report["packed_sweep"] = sweep_speed.measure_sweep(first.data.root)
    if "search" in args.sections:
        progress("a search against a grid over the same space")
        report["search"] = search_speed.measure_search(Path(first.data.root).resolve())
    report["targets"] = targets(report)
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    against_record(report["targets"], record)
    report["environment"] = env.record(device, threads)
    print_report(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {out}")
    if args.save_record and (args.max_batches is not None or device.type != "cpu" or noisy(report)):
        print("Not saved as records: the record is of whole epochs (no --quick, --max-batches), on the CPU "
              "(the targets' device), on a quiet machine.")
    elif args.save_record and any(check["new_record"] for check in report["targets"]):
        RECORD.write_text(json.dumps(updated_record(report["targets"], record, report["environment"]["git_commit"]),
                                     indent=2) + "\n")
        print(f"New records written to {RECORD.relative_to(ROOT)}: commit it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
