"""checkpoint.pt: where training is, written whole after every epoch and when a run stops early.

It holds the model, optimizer, scheduler and loss scaler states, the random states, the metrics
rows so far, the last whole epoch and, after an early stop, where in the next epoch it left off.
A data-parallel run's checkpoint also holds what each rank keeps apart (`ranks`): its random states
(its own dropout masks) and, mid-epoch, its partial loss sum; `partial["loss_sum"]` is their total.
"""
import torch
import torch.distributed as dist

from mnist import atomic, rundir
from mnist.errors import UserError

KEYS = {"epoch", "model_name", "model", "optimizer", "scheduler", "rng", "metrics"}


def state(cfg, epoch, model, optimizer, scheduler, precision, rows, partial=None) -> dict:
    """What a checkpoint holds. `epoch` is the last whole one; `partial` where the next one left off."""
    device = next(model.parameters()).device
    return {
        "epoch": epoch,
        "model_name": cfg.model.name,
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": precision.scaler.state_dict() if precision.scaler.is_enabled() else None,
        **_random_states(device),  # (rank 0's, as `ranks` holds them too: checkpoints before `ranks` had only these)
        "metrics": rows,
        "partial": partial,
    }


def save(run_dir, checkpoint) -> None:
    atomic.write_whole(rundir.checkpoint_path(run_dir), lambda tmp: torch.save(checkpoint, tmp))


def load(run_dir, model_name) -> dict | None:
    """The run folder's checkpoint (on the CPU), or None; a damaged one or another model's is a UserError."""
    path = rundir.checkpoint_path(run_dir)
    if not path.exists():
        return None
    problem = None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file at all
        problem = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    else:
        missing = KEYS - set(checkpoint) if isinstance(checkpoint, dict) else KEYS
        if missing:
            problem = f"not one of this project's checkpoints: no {', '.join(sorted(missing))}"
    if problem:
        raise UserError(
            f"{path} is not a readable checkpoint ({problem}). Move it away to start this run from scratch, "
            f"or point hydra.run.dir at another run folder."
        )
    if checkpoint["model_name"] != model_name:
        raise UserError(
            f"{path} holds a {checkpoint['model_name']} model, but this run is model={model_name}. "
            f"Resume it with model={checkpoint['model_name']}, or start {model_name} in another run folder."
        )
    return checkpoint


def restore(checkpoint, model, optimizer, scheduler, precision, run_dir) -> None:
    """Put the checkpoint's states back into a freshly built model, optimizer, scheduler and scaler (the random
    states: `restore_rng`, once each rank is seeded)."""
    path = rundir.checkpoint_path(run_dir)
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
            f"Resume it with the config it was written with ({path.parent / rundir.CONFIG}), or start afresh "
            f"in another run folder."
        ) from None


def rank_state(model, loss_sum=None) -> dict:
    """What one rank keeps apart from the others: its random states and its partial loss sum (or None)."""
    return {**_random_states(next(model.parameters()).device),
            "loss_sum": None if loss_sum is None else loss_sum.detach().cpu()}


def _random_states(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"rng": torch.get_rng_state(), "cuda_rng": cuda}


def gather(mine, world_size) -> list:
    """Every rank's `mine`, in rank order (a collective: every rank calls it)."""
    if world_size == 1:
        return [mine]
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def with_ranks(checkpoint, ranks) -> dict:
    """The checkpoint with every rank's state, and the partial loss sum reduced over the ranks."""
    checkpoint["ranks"] = ranks
    if checkpoint["partial"] is not None:
        checkpoint["partial"]["loss_sum"] = sum(rank["loss_sum"] for rank in ranks)
    return checkpoint


def ranks(checkpoint) -> int:
    """How many ranks wrote the checkpoint (older checkpoints: one)."""
    return len(checkpoint.get("ranks") or [None])


def resume_point(checkpoint, rank, world_size) -> dict | None:
    """Where this rank resumes mid-epoch: the checkpoint's `partial` with this rank's own loss sum. None after a
    whole epoch, or when the checkpoint has another number of ranks."""
    partial = checkpoint.get("partial")
    if partial is None or ranks(checkpoint) != world_size:
        return None
    return dict(partial, loss_sum=checkpoint["ranks"][rank]["loss_sum"]) if checkpoint.get("ranks") else partial


def restore_rng(checkpoint, rank, world_size, device) -> None:
    """This rank's random states as saved (dropout masks continue as if never stopped). A checkpoint of another
    number of ranks has none that fit: the per-rank seeding stays."""
    if ranks(checkpoint) != world_size:
        return
    mine = checkpoint["ranks"][rank] if checkpoint.get("ranks") else checkpoint
    torch.set_rng_state(mine["rng"])
    if device.type == "cuda" and mine.get("cuda_rng") is not None:  # dropout masks on a GPU draw from it
        torch.cuda.set_rng_state(mine["cuda_rng"], device)
