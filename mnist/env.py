"""Where this process runs: CPU threads, the device, and a record of the environment.

The one place that reads scheduler variables on the training side (SLURM_CPUS_PER_TASK for
threads, SLURM_* ids for the record); the training loop itself knows nothing of Slurm.
"""
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from mnist.errors import UserError

RECORDED_SLURM_VARS = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION",
    "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_CPUS_PER_TASK", "SLURM_RESTART_COUNT",
)


def cpu_threads(setting="auto"):
    """Threads for torch: the setting, else Slurm's CPUs per task, else the CPUs we may use."""
    if setting != "auto":
        return int(setting)
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return len(os.sched_getaffinity(0))


def job_id():
    """This process's Slurm job: `123` or, for a task of an array, `120_3`; None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def distributed():
    """(rank, local rank, world size) from torch's env:// variables (set by torchrun, or by the
    Slurm job side from submitit); (0, 0, 1) for an ordinary single-process run."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def pick_device(setting, local_rank=0):
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "trainer.device=cuda, but torch sees no GPU on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). "
            "Use trainer.device=cpu (or auto), or run on a GPU node (launcher=slurm resources=gpu)."
        )
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(setting)


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit():
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def record(device, threads, world_size=1):
    """What a user needs to reproduce or debug a run: versions, commit, host, CPUs, GPU, job ids."""
    import torch

    return {
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in ("torch", "torchvision", "hydra-core", "omegaconf", "submitit", "numpy")},
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_threads": threads,
        "world_size": world_size,
        "cpus_available": len(os.sched_getaffinity(0)),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm": {k: os.environ[k] for k in RECORDED_SLURM_VARS if k in os.environ},
    }


def write_record(path, device, threads, world_size=1):
    Path(path).write_text(json.dumps(record(device, threads, world_size), indent=2) + "\n")
