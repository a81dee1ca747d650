"""The one door to Slurm's commands: squeue, sacct, sinfo, scontrol and scancel are called here, and only here
(sbatch is submitit's, called through mnist.launch.slurm). One timeout for all of them, one rule for when Slurm
cannot be reached, and one way to say so.

    out, problem = gateway.call(["squeue", "-h", ...])   # problem: "" when Slurm answered, else why it did not

Tests can point it at a fake Slurm by replacing `gateway.run` (called as subprocess.run is). Standard library only:
the login node's commands import no torch through here.
"""
import os
import subprocess
from pathlib import Path

from mnist import env

TIMEOUT_S = 30  # a busy controller answers within seconds; one that does not is down
DEFAULT_CONF = "/etc/slurm/slurm.conf"
run = subprocess.run


def missing_conf() -> str:
    """Why Slurm's commands would retry for a minute before failing: SLURM_CONF names no file; else ""."""
    conf = env.slurm_conf()
    return f"SLURM_CONF={conf} is not a file" if conf and not os.path.isfile(conf) else ""


def call(command) -> tuple[str, str]:
    """(its stdout, "") or ("", why Slurm could not be asked: no config, the command missing, no answer within
    TIMEOUT_S, or the last line of what it said when it failed)."""
    if missing_conf():
        return "", missing_conf()
    try:
        out = run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        return "", f"{command[0]} is not installed here (not on PATH)"
    except OSError as e:
        return "", f"{command[0]} could not be run ({e.strerror or e})"
    except subprocess.TimeoutExpired:
        return "", f"{command[0]} gave no answer within {TIMEOUT_S} s"
    if out.returncode != 0:
        said = [line.strip() for line in out.stderr.splitlines() if line.strip()]
        problem = said[-1] if said else f"{command[0]} failed (exit status {out.returncode})"
        if "configuration" in problem and not env.slurm_conf() and not Path(DEFAULT_CONF).exists():
            problem += f" (SLURM_CONF is not set and there is no {DEFAULT_CONF})"
        return "", problem
    return out.stdout, ""


def unreachable(problem, what_then) -> str:
    """The one paragraph for a command that needs Slurm's answer and did not get it."""
    return (f"Slurm cannot be reached ({problem}), so {what_then}. Check that `squeue` answers (SLURM_CONF, the "
            f"controller: `make cluster-up` prints the line to export for the local one), then try again.")
