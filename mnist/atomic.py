"""Writing a file whole: into a temporary name of this writer's own, then renamed into place, so a reader
(another task, a rank on another node, `mnist.report` while a run trains) never sees half a file."""
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path


def write_whole(path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it to `path`; the temporary file never stays."""
    path = Path(path)  # the name is this writer's own: ranks on several nodes may write one file at once
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
