"""Training and test loops and the course's log lines.

`train(cfg, run_dir)` is the one entry point: a local run, an sbatch script and a submitit
job all call it. It knows nothing about where it runs. Started as several processes with
torch's env:// variables (RANK, WORLD_SIZE, ...), it trains data-parallel (DistributedDataParallel,
gloo on CPU, NCCL on GPU): each rank takes its own shard, only rank 0 prints and writes files.
What it writes into the run folder is mnist.rundir's to name; checkpoints are mnist.checkpoint's.
"""
import contextlib
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mnist import checkpoint, data, env, rundir
from mnist.board import Off, open_board
from mnist.losses import Loss
from mnist.models import build_model
from mnist.optimizers import build_optimizer
from mnist.precision import Precision
from mnist.progress import Progress, wanted
from mnist.stopping import StopFlag, StopRequested

# torch.compile's caches (on a GPU: Triton's too)
COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
USER_COMPILE_CACHES = {variable: os.environ.get(variable) for variable in COMPILE_CACHES}  # else in the run folder


def open_log(run_dir, main=True) -> logging.Logger:
    """Log lines go to stdout (the terminal, or the job's %x_%j.out) and to the run folder's train.log;
    in a data-parallel run only rank 0 (`main`) says anything."""
    log = logging.getLogger("mnist.train")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handlers = (logging.StreamHandler(sys.stdout), logging.FileHandler(Path(run_dir) / rundir.LOG)) if main else ()
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log


@dataclass
class Steps:
    """How a run takes its training steps: the same for every epoch."""

    model: torch.nn.Module  # the model that takes the steps (compiled or data-parallel, perhaps)
    optimizer: torch.optim.Optimizer
    loss: Loss  # cfg.loss (mnist/losses.py)
    precision: Precision
    log: logging.Logger
    log_interval: int = 10
    stop: StopFlag = field(default_factory=StopFlag)
    progress: Progress = field(default_factory=lambda: Progress(on=False))
    board: Off = field(default_factory=Off)  # logger=tensorboard: rank 0's event files
    agree_every: int = 0  # data-parallel: steps between agreeing on a stop (0: log_interval, the steps that log)


def stop_agreed(stop, world_size, device) -> bool:
    """Whether to stop now; in a data-parallel run every rank must stop at the same step."""
    if world_size == 1:
        return stop.requested
    flag = torch.tensor([int(stop.requested)], device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stop_here(steps, batch_idx, world_size, device) -> bool:
    """Whether to stop after this batch. One process looks at its flag every step; the ranks of a data-parallel
    run agree (an all-reduce, and a wait for the GPU) only every `agree_every` steps."""
    if world_size > 1 and batch_idx % (steps.agree_every or steps.log_interval):
        return False
    return stop_agreed(steps.stop, world_size, device)


def train_epoch(steps, train_loader, epoch, resume=None) -> tuple[torch.Tensor, int]:
    """One epoch, or what is left of it after `resume` = {"batches": done, "loss_sum": tensor}.

    Returns (summed loss, batches done); fewer batches than the epoch has means `steps.stop` was set.
    """
    model, optimizer, precision, progress = steps.model, steps.optimizer, steps.precision, steps.progress
    model.train()
    train_loader.set_epoch(epoch)
    done = resume["batches"] if resume else 0
    total_loss = resume["loss_sum"].to(train_loader.device) if resume else torch.zeros((), device=train_loader.device)
    batches = len(train_loader)
    world_size = train_loader.world_size
    progress.start(epoch, done, batches, train_loader.batch_size * world_size)
    # The epoch's order is seeded, so skipping the batches already done continues it exactly.
    for batch_idx, (images, target) in itertools.islice(enumerate(train_loader), done, None):
        optimizer.zero_grad()
        with precision.autocast():
            loss = steps.loss(model(images), target)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        total_loss.add_(loss.detach(), alpha=len(target))
        if batch_idx % steps.log_interval == 0:
            progress.clear()
            value = loss.item()
            steps.log.info(
                f"Train Epoch: {epoch} [{batch_idx * train_loader.batch_size * world_size}/{train_loader.dataset_size} "
                f"({100.0 * batch_idx / batches:.0f}%)]\tLoss: {value:.6f}"
            )
            steps.board.batch((epoch - 1) * batches + batch_idx + 1, value)
        progress.update(batch_idx + 1)
        if batch_idx + 1 < batches and stop_here(steps, batch_idx, world_size, train_loader.device):
            progress.close()
            steps.board.flush()  # before the checkpoint: a resume then rewrites nothing
            return total_loss, batch_idx + 1
    progress.close()
    return total_loss, batches


# On a CPU a forward pass over 1000 images at once runs out of cache: the CNN evaluates the test
# set ~3x faster in pieces of 64 (measured here). The sums are the same; a GPU takes whole batches.
CPU_EVAL_PIECE = 64


@torch.inference_mode()
def evaluate(model, test_loader, loss, precision=None) -> tuple[float, int]:
    model.eval()
    precision = precision or Precision("fp32", torch.device(test_loader.device))
    test_loss = torch.zeros((), device=test_loader.device)
    correct = torch.zeros((), dtype=torch.long, device=test_loader.device)
    on_cpu = torch.device(test_loader.device).type == "cpu"
    for batch_images, batch_target in test_loader:
        piece = CPU_EVAL_PIECE if on_cpu else len(batch_target)
        for images, target in zip(batch_images.split(piece), batch_target.split(piece)):
            with precision.autocast():
                output = model(images)
            test_loss += loss(output, target, reduction="sum")
            correct += (output.argmax(dim=1) == target).sum()
    return test_loss.item() / test_loader.dataset_size, int(correct.item())


def build(cfg, device) -> tuple[torch.nn.Module, Optimizer, LRScheduler | None, Precision]:
    """The model (on `device`, NHWC with trainer.channels_last), its optimizer and scheduler, and
    trainer.precision's autocast and loss scaler."""
    if device.type == "cuda":
        # cuDNN's default convolution algorithms may add up the gradients in another order each run; a resumed
        # run must end bit for bit where an uninterrupted one does (seen on an H200: the CNN's conv1 differed)
        torch.backends.cudnn.deterministic = True
    model = build_model(cfg.model).to(device)
    if cfg.trainer.channels_last:  # NHWC weights; convolutions then keep their outputs NHWC too
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg.optimizer, model.parameters())
    return model, optimizer, scheduler, Precision(cfg.trainer.precision, device)


@dataclass
class Run:
    """One run's training state, shared by its epochs."""

    cfg: object
    run_dir: Path
    main: bool  # rank 0: the one process that logs and writes files
    steps: Steps
    model: torch.nn.Module  # the weights steps.model trains, unwrapped and uncompiled: evaluation and checkpoints
    scheduler: object
    train_loader: data.InMemoryLoader
    test_loader: data.InMemoryLoader
    rows: list  # metrics.csv's rows so far


def train(cfg, run_dir, stop=None, epoch_end=None) -> list[dict]:
    """Train cfg.model on cfg.data for cfg.trainer.epochs, resuming from run_dir's checkpoint.

    If `stop.requested` becomes true, write a checkpoint where training is and raise StopRequested.
    `epoch_end(rows)`, if given, is called once an epoch is written (checkpoint, metrics.csv), and on resuming with
    the rows so far; if it returns true the run ends there (a search's pruned trial). Returns metrics.csv's rows.
    """
    rank, local_rank, world_size = env.distributed()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = env.pick_device(cfg.trainer.device, local_rank)
    threads = env.cpu_threads(cfg.trainer.threads)
    torch.set_num_threads(threads)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with _holding(run_dir, rank, world_size, device):
            return _train(cfg, run_dir, stop or StopFlag(), device, threads, rank, world_size, epoch_end)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


@contextlib.contextmanager
def _holding(run_dir, rank, world_size, device):
    """Rank 0 holds the run folder's lock; the ranks of a data-parallel run learn together whether it got it."""
    with contextlib.ExitStack() as held:
        refused = None
        if rank == 0:
            try:
                held.enter_context(rundir.lock(run_dir, env.job_id()))
            except rundir.RunFolderError as e:
                refused = e
        if world_size > 1:
            flag = torch.tensor([int(refused is not None)], device=device)
            dist.broadcast(flag, src=0)
            if flag.item() and rank != 0:
                raise rundir.RunFolderError(f"{run_dir} is in use by another run (rank 0 says which); rank {rank} "
                                            f"stops too.")
        if refused is not None:
            raise refused
        yield


def _train(cfg, run_dir, stop, device, threads, rank, world_size, epoch_end):
    main = rank == 0
    log = open_log(run_dir, main)
    saved = checkpoint.load(run_dir, cfg.model.name)  # before writing anything: a bad one changes nothing
    if saved is not None and saved.get("partial") is None and saved["epoch"] >= cfg.trainer.epochs:
        log.info(rundir.nothing_left(run_dir, saved["epoch"], cfg.trainer.epochs))
        if main:  # (a run stopped between its last checkpoint and metrics.csv: the checkpoint vouches for them)
            rundir.write_metrics(run_dir, saved["metrics"])
        return saved["metrics"]
    torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank
    train_loader, test_loader = data.loaders(cfg.data, cfg.trainer.seed, device, rank, world_size)
    log.info(env.where(device, threads, world_size))  # (once the data is there: a run that stops before leaves no log)
    model, optimizer, scheduler, precision = build(cfg, device)
    rows, start_epoch, partial = [], 1, None
    if saved is not None:
        checkpoint.restore(saved, model, optimizer, scheduler, precision, run_dir)
        rows, start_epoch, partial = saved["metrics"], saved["epoch"] + 1, saved.get("partial")
        where = (f"at epoch {partial['epoch']}, batch {partial['batches']}" if partial
                 else f"after epoch {saved['epoch']}")
        log.info(f"Resuming from {rundir.checkpoint_path(run_dir)} {where}")
        partial = _resume_point(saved, rank, world_size, log)
    done = (start_epoch - 1) * len(train_loader) + (partial["batches"] if partial else 0)  # optimizer steps taken
    steps = Steps(_stepping_model(cfg, model, device, rank, world_size, run_dir), optimizer,
                  Loss(cfg.loss, model.output), precision, log, cfg.trainer.log_interval, stop,
                  Progress(on=main and wanted(cfg.trainer.progress)), open_board(cfg, run_dir, done, main))
    if saved is not None:
        checkpoint.restore_rng(saved, rank, world_size, device)  # after the per-rank seeding: it replaces it
    run = Run(cfg, run_dir, main, steps, model, scheduler, train_loader, test_loader, rows)
    if main:
        rundir.write_config(run_dir, OmegaConf.to_container(cfg, resolve=True))
        env.write_record(run_dir / rundir.ENVIRONMENT, device, threads, world_size)
        rundir.write_metrics(run_dir, rows)  # the rows the checkpoint vouches for, no more
    ended = epoch_end is not None and rows and epoch_end(rows)
    for epoch in range(start_epoch, cfg.trainer.epochs + 1):
        if ended:
            break
        run_epoch(run, epoch, resume=partial if epoch == start_epoch else None)
        ended = epoch_end is not None and epoch_end(rows)
    steps.board.close()
    return rows


def _resume_point(saved, rank, world_size, log):
    """Where this rank resumes mid-epoch (None: at an epoch's start). A checkpoint of another number of ranks
    took its batches from another sharding: the interrupted epoch restarts."""
    partial = checkpoint.resume_point(saved, rank, world_size)
    if saved.get("partial") and partial is None:
        epoch, ranks = saved["partial"]["epoch"], checkpoint.ranks(saved)
        log.info(f"Epoch {epoch} was interrupted in a run of {ranks} rank{'s' * (ranks > 1)} and this one has "
                 f"{world_size}: epoch {epoch} restarts from its first batch (the weights keep what its first "
                 f"{saved['partial']['batches']} batches taught them)")
    return partial


def _stepping_model(cfg, model, device, rank, world_size, run_dir):
    """The model that takes the training steps: data-parallel across ranks, compiled if asked."""
    if world_size > 1:
        torch.manual_seed(cfg.trainer.seed + rank)  # each rank its own dropout masks
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:  # compiles on the first batch; the compiler's caches stay in the run folder
        for variable, folder in COMPILE_CACHES.items():
            os.environ[variable] = USER_COMPILE_CACHES[variable] or str(run_dir / ".compile_cache" / folder)
        model = torch.compile(model)
    return model


def run_epoch(run, epoch, resume=None) -> None:
    """One epoch: train, test, log, step the scheduler, checkpoint; or checkpoint and stop."""
    loader, log = run.train_loader, run.steps.log
    lr = run.steps.optimizer.param_groups[0]["lr"]
    started = time.perf_counter() - (resume["seconds"] if resume else 0.0)
    loss_sum, done = train_epoch(run.steps, loader, epoch, resume)
    seconds = time.perf_counter() - started
    if done < len(loader):
        _save(run, epoch - 1, partial={"epoch": epoch, "batches": done, "seconds": seconds}, loss_sum=loss_sum)
        log.info(f"Stopped in epoch {epoch} after batch {done}; checkpoint written")
        raise StopRequested(run.run_dir)
    if loader.world_size > 1:
        dist.all_reduce(loss_sum)
    train_loss = loss_sum.item() / (len(loader.indices()) * loader.world_size)
    test_loss, correct = evaluate(run.model, run.test_loader, run.steps.loss, run.steps.precision)  # each rank alone
    n_test = run.test_loader.dataset_size
    log.info(
        f"\nTest set: Average loss: {test_loss:.4f}, "
        f"Accuracy: {correct}/{n_test} ({100.0 * correct / n_test:.0f}%)\n"
    )
    samples_per_s = loader.dataset_size / seconds
    log.info(f"Epoch {epoch}: {seconds:.2f} s, {samples_per_s:.0f} samples/s, lr {lr:.6g}")
    if run.scheduler is not None:
        run.scheduler.step()
    run.rows.append({
        "epoch": epoch, "train_loss": round(train_loss, 6), "test_loss": round(test_loss, 6),
        "accuracy": round(correct / n_test, 6), "seconds": round(seconds, 3),
        "samples_per_s": round(samples_per_s, 1),
    })
    run.steps.board.epoch(epoch * len(loader), run.rows[-1], lr)  # and flushes, before the checkpoint
    _save(run, epoch)
    if run.main:
        rundir.write_metrics(run.run_dir, run.rows)
    if epoch < run.cfg.trainer.epochs and stop_agreed(run.steps.stop, loader.world_size, loader.device):
        raise StopRequested(run.run_dir)


def _save(run, epoch, partial=None, loss_sum=None):
    """Every rank hands rank 0 its random states (and, mid-epoch, its partial loss sum); rank 0 writes them."""
    ranks = checkpoint.gather(checkpoint.rank_state(run.model, loss_sum), run.train_loader.world_size)
    if run.main:
        steps = run.steps
        state = checkpoint.state(run.cfg, epoch, run.model, steps.optimizer, run.scheduler, steps.precision,
                                 run.rows, partial)
        checkpoint.save(run.run_dir, checkpoint.with_ranks(state, ranks))
