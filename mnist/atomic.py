"""Writing a file whole: into a temporary name of this writer's own, then renamed into place, so a reader
(another task, a rank on another node, `mnist.report` while a run trains) never sees half a file."""
import errno
import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from mnist.errors import NoSpace
from mnist.figures import human_bytes


def write_whole(path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it to `path`; the temporary file never stays."""
    path = Path(path)  # the name is this writer's own: ranks on several nodes may write one file at once
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
        return
    except Exception as e:
        if not _disk_full(e, path.parent):
            raise
    finally:
        tmp.unlink(missing_ok=True)
    # raised here, not in the except block: the failed writer and its open file (whose space the disk gets back
    # only once it is closed) went with that block's exception
    kept = (f"; the previous {path.name} ({human_bytes(path.stat().st_size)}) is whole and kept, and a new one needs "
            f"about as much free" if path.exists() else "")
    raise NoSpace(
        f"No space left to write {path.name} in {path.parent}: {human_bytes(shutil.disk_usage(path.parent).free)} "
        f"free on its disk{kept}. Free some space there, then run the same command again: the run resumes from its "
        f"last whole checkpoint."
    )


def _disk_full(error, folder) -> bool:
    """ENOSPC or a quota; torch.save says only "file write failed", so a disk with next to nothing free counts too."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False
