"""Training and test loops, the course's log lines, metrics, checkpoints and resume.

`train(cfg, run_dir)` is the one entry point: a local run, an sbatch script and a submitit
job all call it. It knows nothing about where it runs.
"""
import csv
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mnist import data, env
from mnist.errors import UserError
from mnist.models import build_model, build_optimizer

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
METRIC_COLUMNS = ["epoch", "train_loss", "test_loss", "accuracy", "seconds", "samples_per_s"]


def open_log(run_dir):
    """Log lines go to stdout (the terminal, or the job's %x_%j.out) and to <run_dir>/train.log."""
    log = logging.getLogger("mnist.train")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(Path(run_dir) / "train.log")):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log


def nll(output, target, model, reduction="mean"):
    """Negative log-likelihood; a softmax-output model (mlp_sigmoid) gives probabilities."""
    if model.output == "softmax":
        output = output.clamp_min(1e-12).log()
    return F.nll_loss(output, target, reduction=reduction)


def train_epoch(model, train_loader, optimizer, epoch, log_interval, log):
    model.train()
    train_loader.set_epoch(epoch)
    total_loss = torch.zeros((), device=train_loader.device)
    batches = len(train_loader)
    for batch_idx, (images, target) in enumerate(train_loader):
        optimizer.zero_grad()
        loss = nll(model(images), target, model)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(target)
        if batch_idx % log_interval == 0:
            log.info(
                f"Train Epoch: {epoch} [{batch_idx * train_loader.batch_size}/{train_loader.dataset_size} "
                f"({100.0 * batch_idx / batches:.0f}%)]\tLoss: {loss.item():.6f}"
            )
    return total_loss.item() / train_loader.dataset_size


@torch.inference_mode()
def evaluate(model, test_loader):
    model.eval()
    test_loss = torch.zeros((), device=test_loader.device)
    correct = torch.zeros((), dtype=torch.long, device=test_loader.device)
    for images, target in test_loader:
        output = model(images)
        test_loss += nll(output, target, model, reduction="sum")
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or not a torch file at all
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Move it away to start this run from scratch, or point hydra.run.dir at another run folder."
        ) from None


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


def train(cfg, run_dir):
    """Train cfg.model on cfg.data for cfg.trainer.epochs, resuming from run_dir's checkpoint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open_log(run_dir)
    device = env.pick_device(cfg.trainer.device)
    threads = env.cpu_threads(cfg.trainer.threads)
    torch.set_num_threads(threads)
    save_config(run_dir, cfg)
    env.write_record(run_dir / "environment.json", device, threads)

    torch.manual_seed(cfg.trainer.seed)
    train_loader, test_loader = data.loaders(cfg.data, cfg.trainer.seed, device)
    model = build_model(cfg.model).to(device)
    optimizer, scheduler = build_optimizer(cfg.optimizer, model.parameters())

    rows, start_epoch = [], 1
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"])
        rows, start_epoch = checkpoint["metrics"], checkpoint["epoch"] + 1
        write_metrics(run_dir, rows)  # the rows the checkpoint vouches for, no more
        log.info(f"Resuming from {run_dir / CHECKPOINT} after epoch {checkpoint['epoch']}")

    for epoch in range(start_epoch, cfg.trainer.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        train_loss = train_epoch(model, train_loader, optimizer, epoch, cfg.trainer.log_interval, log)
        seconds = time.perf_counter() - started
        test_loss, correct = evaluate(model, test_loader)
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
        save_checkpoint(run_dir, {
            "epoch": epoch,
            "model_name": cfg.model.name,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": torch.get_rng_state(),
            "metrics": rows,
        })
        write_metrics(run_dir, rows)
    return rows
