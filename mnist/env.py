"""Where this process runs: CPU threads, the device, and a record of the environment.

The one place that reads Slurm's variables (SLURM_CPUS_PER_TASK for threads, SLURM_* ids for the
record, whether this is a job at all); the training loop itself knows nothing of Slurm. Torch is
imported only inside the functions that need it: the login node's data checks use this module too.
"""
import json
import os
import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from mnist.errors import UserError

if TYPE_CHECKING:
    import torch

RECORDED_SLURM_VARS = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION",
    "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_CPUS_PER_TASK", "SLURM_RESTART_COUNT",
)


def cpu_threads(setting="auto") -> int:
    """Threads for torch: the setting, else the CPUs this process may use, or Slurm's CPUs per task
    if fewer (a job step's affinity can be smaller than what the job was given, or larger without cgroups)."""
    if setting != "auto":
        return int(setting)
    usable = len(os.sched_getaffinity(0))
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, min(int(os.environ["SLURM_CPUS_PER_TASK"]), usable))
    return usable


def job_id() -> str | None:
    """This process's Slurm job: `123` or, for a task of an array, `120_3`; None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def in_slurm_job() -> bool:
    """Whether this process runs inside a Slurm job (a compute node, where runs never download)."""
    return "SLURM_JOB_ID" in os.environ


def node_name() -> str:
    """The node this process runs on: Slurm's name for it in a job (SLURMD_NODENAME), else the host's name.
    (They differ where one host runs several slurmd, as the local multi-node cluster does.)"""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def slurm_conf() -> str | None:
    """The Slurm configuration file SLURM_CONF names for Slurm's commands, if it is set."""
    return os.environ.get("SLURM_CONF")


def restarts() -> int:
    """How many times Slurm has requeued this job so far (0 outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torch's env:// variables (set by torchrun, or by the
    Slurm job side from submitit); (0, 0, 1) for an ordinary single-process run, and for a Slurm job of one
    task, whatever the submitting shell had set (sbatch passes its environment on)."""
    if _slurm_task() and os.environ.get("SLURM_NTASKS", "1") == "1":
        return 0, 0, 1
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def _slurm_task():
    """Whether this process is a task of a Slurm job, not one torchrun started (whose RANK is its own)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and not os.environ.get("TORCHELASTIC_RUN_ID")


def rank() -> tuple[int, int]:
    """This process's (rank, local rank): Slurm's task ids in a Slurm job (what submitit exports as RANK and
    LOCAL_RANK for torch, known before it does), torch's env:// variables elsewhere; (0, 0) for one process."""
    if _slurm_task():
        return int(os.environ.get("SLURM_PROCID") or 0), int(os.environ.get("SLURM_LOCALID") or 0)
    return int(os.environ.get("RANK") or 0), int(os.environ.get("LOCAL_RANK") or 0)


def cpus_given() -> int:
    """The CPUs this process may use: Slurm's CPUs per task, else its affinity."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() else len(os.sched_getaffinity(0))


def cuda_index(local_rank, device_count) -> int:
    """The GPU a rank trains on: one per rank on its node, in turn."""
    return local_rank % device_count


# The oldest NVIDIA driver (Linux) each CUDA major version runs on, minor-version compatibility included
# (NVIDIA's "CUDA Compatibility" guide).
DRIVER_FOR_CUDA = {11: "450.80", 12: "525.60", 13: "580.65"}
GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")


def slurm_gpus() -> str | None:
    """The GPUs Slurm gave this job (`0,1`), as Slurm names them; '' in a job given none; None outside Slurm."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    given = [os.environ.get(v, "") for v in GPU_VARIABLES]
    return next((g for g in given if g and g != "NoDevFiles"), "")


def pick_device(setting, local_rank=0) -> "torch.device":
    """trainer.device as a torch device. In a Slurm job the GPUs it was given decide: auto is the CPU
    in a job without GPUs, and a job with GPUs that torch cannot see stops at once (see `no_gpu`)."""
    import torch

    given = slurm_gpus()
    if given == "" and setting == "cuda":
        raise UserError("trainer.device=cuda, but this Slurm job asked for no GPU. Submit it with resources=gpu, "
                        "or train on the CPU with trainer.device=cpu (or auto).")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() and given != "" else "cpu"
        if given and not torch.cuda.is_available():
            raise UserError(no_gpu(f"Slurm gave this job {_gpus(given)} and trainer.device=auto"))
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError(no_gpu(f"Slurm gave this job {_gpus(given)}" if given else "trainer.device=cuda"))
    if setting == "cuda":
        return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
    return torch.device(setting)


def _gpus(given):
    return f"GPU{'s' if ',' in given else ''} {given}"


def driver_version() -> str | None:
    """The NVIDIA kernel driver loaded on this machine (`535.104.05`), or None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for [\w]+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def no_gpu(why) -> str:
    """Why torch sees no GPU here and what to do, naming the build's CUDA and the driver it needs."""
    import torch

    cuda = torch.version.cuda
    if cuda is None:
        build = f"torch {torch.__version__} is a CPU-only build"
    else:
        needs = DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]), "a recent one")
        build = f"torch {torch.__version__} is built for CUDA {cuda}, which needs an NVIDIA driver >= {needs}"
    found = driver_version()
    driver = f"this node's driver is {found}" if found else "this node shows no NVIDIA driver (/proc/driver/nvidia)"
    cpu = "trainer.device=cpu and resources=cpu" if os.environ.get("SLURM_JOB_ID") else "trainer.device=cpu"
    return (f"{why}, but torch sees no GPU: {build}, and {driver}. Install a torch build for the node's driver "
            f"(`nvidia-smi` names the CUDA version it supports): `make install TORCH_CUDA=cu126` for drivers "
            f">= {DRIVER_FOR_CUDA[12]} and GPUs such as the V100 (see the README's GPU section); or train on the CPU "
            f"with {cpu}.")


def where(device, threads, world_size=1) -> str:
    """The run's first log line: `Training on cuda:0 (NVIDIA H200), 4 CPU threads per rank, 2 ranks (nccl)`."""
    import torch

    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    cpus = f"{threads} CPU thread{'s' if threads != 1 else ''}{' per rank' if world_size > 1 else ''}"
    ranks = f"{world_size} ranks ({'nccl' if device.type == 'cuda' else 'gloo'})" if world_size > 1 else "1 process"
    return f"Training on {device}{name}, {cpus}, {ranks}"


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


def record(device, threads, world_size=1) -> dict:
    """What a user needs to reproduce or debug a run: versions, commit, host, CPUs, GPU, job ids."""
    import torch

    return {
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in ("torch", "torchvision", "hydra-core", "omegaconf", "submitit", "numpy")},
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        "node": node_name(),
        "platform": platform.platform(),
        "cpu_threads": threads,
        "world_size": world_size,
        "cpus_available": len(os.sched_getaffinity(0)),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm": {k: os.environ[k] for k in RECORDED_SLURM_VARS if k in os.environ},
    }


def write_record(path, device, threads, world_size=1) -> None:
    Path(path).write_text(json.dumps(record(device, threads, world_size), indent=2) + "\n")
