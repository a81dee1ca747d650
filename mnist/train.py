"""Training and test loops, the course's log lines, metrics, checkpoints and resume.

`train(cfg, run_dir)` is the one entry point: a local run, an sbatch script and a submitit
job all call it. It knows nothing about where it runs. Started as several processes with
torch's env:// variables (RANK, WORLD_SIZE, ...), it trains data-parallel (DistributedDataParallel,
gloo on CPU, NCCL on GPU): each rank takes its own shard, only rank 0 prints and writes files.
"""
import csv
import itertools
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from omegaconf import OmegaConf

from mnist import data, env
from mnist.errors import UserError
from mnist.models import build_model, build_optimizer
from mnist.precision import Precision
from mnist.progress import Progress, wanted

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
CHECKPOINT_KEYS = {"epoch", "model_name", "model", "optimizer", "scheduler", "rng", "metrics"}
METRIC_COLUMNS = ["epoch", "train_loss", "test_loss", "accuracy", "seconds", "samples_per_s"]
COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}  # torch.compile's (GPU: Triton's)
USER_COMPILE_CACHES = {variable: os.environ.get(variable) for variable in COMPILE_CACHES}  # else in the run folder


def open_log(run_dir, main=True):
    """Log lines go to stdout (the terminal, or the job's %x_%j.out) and to <run_dir>/train.log;
    in a data-parallel run only rank 0 (`main`) says anything."""
    log = logging.getLogger("mnist.train")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handlers = (logging.StreamHandler(sys.stdout), logging.FileHandler(Path(run_dir) / "train.log")) if main else ()
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log


def nll(output, target, model, reduction="mean"):
    """Negative log-likelihood; a softmax-output model (mlp_sigmoid) gives probabilities."""
    if getattr(model, "module", model).output == "softmax":
        output = output.clamp_min(1e-12).log()
    return F.nll_loss(output, target, reduction=reduction)


class StopFlag:
    """Set `requested` (from a signal handler, say) to make training checkpoint and stop."""

    requested = False


class StopRequested(Exception):
    """Training stopped on request after writing a checkpoint; running again resumes it."""


def stop_agreed(stop, world_size, device):
    """Whether to stop now; in a data-parallel run every rank must stop at the same step."""
    if world_size == 1:
        return stop.requested
    flag = torch.tensor([int(stop.requested)], device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_epoch(model, train_loader, optimizer, epoch, log_interval, log, stop, resume=None, precision=None,
                progress=None):
    """One epoch, or what is left of it after `resume` = {"batches": done, "loss_sum": tensor}.

    Returns (summed loss, batches done); fewer batches than the epoch has means `stop` was set.
    """
    model.train()
    train_loader.set_epoch(epoch)
    precision = precision or Precision("fp32", torch.device(train_loader.device))
    progress = progress or Progress(on=False)
    done = resume["batches"] if resume else 0
    total_loss = resume["loss_sum"].to(train_loader.device) if resume else torch.zeros((), device=train_loader.device)
    batches = len(train_loader)
    world_size = train_loader.world_size
    progress.start(epoch, done, batches, train_loader.batch_size * world_size)
    # The epoch's order is seeded, so skipping the batches already done continues it exactly.
    for batch_idx, (images, target) in itertools.islice(enumerate(train_loader), done, None):
        optimizer.zero_grad()
        with precision.autocast():
            loss = nll(model(images), target, model)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        total_loss += loss.detach() * len(target)
        if batch_idx % log_interval == 0:
            progress.clear()
            log.info(
                f"Train Epoch: {epoch} [{batch_idx * train_loader.batch_size * world_size}/{train_loader.dataset_size} "
                f"({100.0 * batch_idx / batches:.0f}%)]\tLoss: {loss.item():.6f}"
            )
        progress.update(batch_idx + 1)
        if batch_idx + 1 < batches and stop_agreed(stop, world_size, train_loader.device):
            progress.close()
            return total_loss, batch_idx + 1
    progress.close()
    return total_loss, batches


# On a CPU a forward pass over 1000 images at once runs out of cache: the CNN evaluates the test
# set ~3x faster in pieces of 64 (measured here). The sums are the same; a GPU takes whole batches.
CPU_EVAL_PIECE = 64


@torch.inference_mode()
def evaluate(model, test_loader, precision=None):
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
            test_loss += nll(output.float(), target, model, reduction="sum")
            correct += (output.argmax(dim=1) == target).sum()
    return test_loss.item() / test_loader.dataset_size, int(correct.item())


def save_checkpoint(run_dir, state):
    """Write to a temporary file, then rename: a checkpoint on disk is always a whole one."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(run_dir):
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    problem = None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file at all
        problem = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    else:
        missing = CHECKPOINT_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
        if missing:
            problem = f"not one of this project's checkpoints: no {', '.join(sorted(missing))}"
    if problem:
        raise UserError(
            f"{path} is not a readable checkpoint ({problem}). Move it away to start this run from scratch, "
            f"or point hydra.run.dir at another run folder."
        )
    return checkpoint


def write_metrics(run_dir, rows):
    path = Path(run_dir) / METRICS
    tmp = path.with_name(f".{METRICS}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def save_config(run_dir, cfg):
    path = Path(run_dir) / "config.yaml"
    tmp = path.with_name(".config.yaml.tmp")
    OmegaConf.save(cfg, tmp, resolve=True)
    os.replace(tmp, path)


def _state(cfg, epoch, model, optimizer, scheduler, precision, rows, partial=None):
    return {
        "epoch": epoch,  # the last whole epoch
        "model_name": cfg.model.name,
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": precision.scaler.state_dict() if precision.scaler.is_enabled() else None,
        "rng": torch.get_rng_state(),
        "cuda_rng": _cuda_rng_state(model),
        "metrics": rows,
        "partial": partial,  # where in the next epoch a stop left off, or None
    }


def _device(model):
    return next(model.parameters()).device


def _cuda_rng_state(model):
    device = _device(model)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _check_model(checkpoint, cfg, path):
    if checkpoint["model_name"] != cfg.model.name:
        raise UserError(
            f"{path} holds a {checkpoint['model_name']} model, but this run is model={cfg.model.name}. "
            f"Resume it with model={checkpoint['model_name']}, or start {cfg.model.name} in another run folder."
        )


def _restore(checkpoint, model, optimizer, scheduler, precision, path):
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        if precision.scaler.is_enabled() and checkpoint.get("scaler"):  # a run may switch precision on resume
            precision.scaler.load_state_dict(checkpoint["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(
            f"{path} does not fit this run's model or optimizer ({str(e).splitlines()[0][:200]}). "
            f"Resume it with the config it was written with ({path.parent / 'config.yaml'}), or start afresh "
            f"in another run folder."
        ) from None
    torch.set_rng_state(checkpoint["rng"])
    device = _device(model)
    if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:  # dropout masks on a GPU draw from it
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)


def build(cfg, device):
    """The model (on `device`, NHWC with trainer.channels_last), its optimizer and scheduler, and
    trainer.precision's autocast and loss scaler."""
    model = build_model(cfg.model).to(device)
    if cfg.trainer.channels_last:  # NHWC weights; convolutions then keep their outputs NHWC too
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg.optimizer, model.parameters())
    return model, optimizer, scheduler, Precision(cfg.trainer.precision, device)


def train(cfg, run_dir, stop=None):
    """Train cfg.model on cfg.data for cfg.trainer.epochs, resuming from run_dir's checkpoint.

    If `stop.requested` becomes true, write a checkpoint where training is and raise StopRequested.
    """
    stop = stop or StopFlag()
    rank, local_rank, world_size = env.distributed()
    main = rank == 0
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open_log(run_dir, main)
    device = env.pick_device(cfg.trainer.device, local_rank)
    threads = env.cpu_threads(cfg.trainer.threads)
    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(run_dir)  # before writing anything: a bad one changes nothing
    if checkpoint is not None:
        _check_model(checkpoint, cfg, run_dir / CHECKPOINT)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank
    train_loader, test_loader = data.loaders(cfg.data, cfg.trainer.seed, device, rank, world_size)
    model, optimizer, scheduler, precision = build(cfg, device)
    rows, start_epoch, partial = [], 1, None
    if checkpoint is not None:
        _restore(checkpoint, model, optimizer, scheduler, precision, run_dir / CHECKPOINT)
        rows, start_epoch, partial = checkpoint["metrics"], checkpoint["epoch"] + 1, checkpoint.get("partial")
        where = f"epoch {partial['epoch']}, batch {partial['batches']}" if partial else f"after epoch {checkpoint['epoch']}"
        log.info(f"Resuming from {run_dir / CHECKPOINT} at {where}")
    if world_size > 1:
        torch.manual_seed(cfg.trainer.seed + rank)  # each rank its own dropout masks
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = model
    if cfg.trainer.compile:  # compiles on the first batch; the compiler's caches stay in the run folder
        for variable, folder in COMPILE_CACHES.items():
            os.environ[variable] = USER_COMPILE_CACHES[variable] or str(run_dir / ".compile_cache" / folder)
        step_model = torch.compile(model)
    progress = Progress(on=main and wanted(cfg.trainer.progress))
    if main:
        save_config(run_dir, cfg)
        env.write_record(run_dir / "environment.json", device, threads, world_size)
        write_metrics(run_dir, rows)  # the rows the checkpoint vouches for, no more

    try:
        for epoch in range(start_epoch, cfg.trainer.epochs + 1):
            _train_one(cfg, epoch, step_model, model, optimizer, scheduler, precision, train_loader, test_loader,
                       rows, log, progress, stop, run_dir, main, resume=partial if epoch == start_epoch else None)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    return rows


def _train_one(cfg, epoch, step_model, model, optimizer, scheduler, precision, train_loader, test_loader, rows, log,
               progress, stop, run_dir, main, resume):
    """One epoch: train, test, log, step the scheduler, checkpoint; or checkpoint and stop.

    `step_model` takes the training steps (compiled or not); `model` is the same weights, uncompiled.
    """
    lr = optimizer.param_groups[0]["lr"]
    started = time.perf_counter() - (resume["seconds"] if resume else 0.0)
    loss_sum, done = train_epoch(step_model, train_loader, optimizer, epoch, cfg.trainer.log_interval, log, stop,
                                 resume, precision, progress)
    seconds = time.perf_counter() - started
    if done < len(train_loader):
        left_off = {"epoch": epoch, "batches": done, "loss_sum": loss_sum.cpu(), "seconds": seconds}
        if main:
            save_checkpoint(run_dir, _state(cfg, epoch - 1, model, optimizer, scheduler, precision, rows, left_off))
        log.info(f"Stopped in epoch {epoch} after batch {done}; checkpoint written")
        raise StopRequested(run_dir)
    if train_loader.world_size > 1:
        dist.all_reduce(loss_sum)
    train_loss = loss_sum.item() / (len(train_loader.indices()) * train_loader.world_size)
    test_loss, correct = evaluate(getattr(model, "module", model), test_loader, precision)  # each rank, no collectives
    n_test = test_loader.dataset_size
    log.info(
        f"\nTest set: Average loss: {test_loss:.4f}, "
        f"Accuracy: {correct}/{n_test} ({100.0 * correct / n_test:.0f}%)\n"
    )
    samples_per_s = train_loader.dataset_size / seconds
    log.info(f"Epoch {epoch}: {seconds:.2f} s, {samples_per_s:.0f} samples/s, lr {lr:.6g}")
    if scheduler is not None:
        scheduler.step()
    rows.append({
        "epoch": epoch, "train_loss": round(train_loss, 6), "test_loss": round(test_loss, 6),
        "accuracy": round(correct / n_test, 6), "seconds": round(seconds, 3),
        "samples_per_s": round(samples_per_s, 1),
    })
    if main:
        save_checkpoint(run_dir, _state(cfg, epoch, model, optimizer, scheduler, precision, rows))
        write_metrics(run_dir, rows)
    if epoch < cfg.trainer.epochs and stop_agreed(stop, train_loader.world_size, train_loader.device):
        raise StopRequested(run_dir)
