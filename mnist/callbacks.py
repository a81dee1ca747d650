"""Hydra callbacks (conf/config.yaml: hydra.callbacks). Hydra creates the run folder before our
code sees the config; this checks it can, so an unwritable place is one clear error, not a trace."""
import os

from hydra.experimental.callback import Callback

from mnist.config import report_errors
from mnist.errors import UserError

CREATED = set()  # run folders this process made: one that stays unused is removed again (mnist.run)


def created_here(folder) -> bool:
    return os.path.abspath(folder) in CREATED


def _can_create(folder, key):
    if not os.path.exists(folder):
        CREATED.add(os.path.abspath(folder))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"Cannot create the run folder {folder} ({e.strerror}). Point {key} at a folder you can write, "
            f"e.g. {key}=$HOME/mnist-runs/one, or run from a folder you can write."
        ) from None


class CheckRunFolder(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        with report_errors():
            _can_create(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        if config.get("dry_run"):  # a dry run creates no folder
            return
        with report_errors():
            _can_create(config.hydra.sweep.dir, "hydra.sweep.dir")
