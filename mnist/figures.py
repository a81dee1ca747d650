"""Durations, memory sizes and job states as Slurm writes them: the one reader and writer of each.

Slurm's tools print them (sacct's TotalCPU `01:02.345`, MaxRSS `806660K`, State `CANCELLED by 0`), users
write them (resources.time=0:15:0, resources.mem=3G), and the job tables, the hints and the progress bar
show them. Standard library only; mnist/launch/resources.py checks a user's values with these.
"""
import math
import re

TIME = re.compile(r"(?:(\d+)-)?(\d+(?::\d+){0,2})(?:\.(\d+))?")
MEMORY = re.compile(r"(\d+(?:\.\d+)?)([KMGTP]?)[nc]?", re.IGNORECASE)  # sacct may end one in n or c
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
MEMORY_STEP = 256 * 2**20  # what a memory request is rounded up to


def duration_s(text) -> float | None:
    """Seconds in a Slurm time: minutes (90), M:S, H:M:S, D-H, D-H:M or D-H:M:S, with sacct's fraction
    (.345); None if it is not one (UNLIMITED, N/A, "")."""
    match = TIME.fullmatch(str(text).strip())
    if isinstance(text, bool) or not match:
        return None
    days, parts = match.group(1), [int(p) for p in match.group(2).split(":")]
    units = (3600, 60, 1) if days else {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
    seconds = sum(p * u for p, u in zip(parts, units)) + 86400 * int(days or 0)
    return seconds + float(f"0.{match.group(3)}") if match.group(3) else seconds


def clock(seconds) -> str:
    """Seconds as squeue shows a duration: M:SS, H:MM:SS or D-HH:MM:SS."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def limit_text(seconds) -> str:
    """A time limit as resources.time takes it, H:MM:SS or D-HH:MM:SS, rounded up to the second."""
    days, rest = divmod(math.ceil(seconds), 86400)
    hours = f"{days}-{rest // 3600:02d}" if days else f"{rest // 3600}"
    return f"{hours}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def memory_bytes(text, default_unit="") -> int | None:
    """Bytes in a Slurm memory figure (806660K, 2G, 100M, 0); `default_unit` for a bare number (sbatch's is M);
    None if it is not one."""
    match = MEMORY.fullmatch(str(text).strip())
    if not match:
        return None
    return int(float(match.group(1)) * UNITS[(match.group(2) or default_unit).upper()])


def memory_text(n, at_most=False) -> str | None:
    """Bytes as a resources.mem: rounded up to 256M (at_most: down to a whole M, for a cap), written in G when
    a whole number of G; None for none."""
    if not n:
        return None
    mib = int(n // 2**20) if at_most else math.ceil(n / MEMORY_STEP) * MEMORY_STEP // 2**20
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def human_bytes(n) -> str:
    """Bytes for a reader: 698M, 1.5G, 12G; "?" for unknown."""
    if n is None:
        return "?"
    for unit, size in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 10 * size else f"{n / size:.0f}{unit}"
    return f"{n}B"


def state(text) -> str:
    """A job's state as squeue and sacct write it, without what follows ("CANCELLED by 1000": CANCELLED)."""
    return str(text).split()[0] if str(text).strip() else ""
