"""TensorBoard event files, with logger=tensorboard: rank 0 writes them into <run folder>/tensorboard/.

    train/loss                               the training loss at each logged batch (trainer.log_interval)
    train/epoch_loss, test/loss, test/accuracy,
    lr, samples_per_s                        once per epoch, as in metrics.csv
    hparams                                  the run's config, once, when the run starts

Every value is written at the run's global step, the optimizer steps taken so far (an epoch's values
at its last step), so the curves of a run line up. A run resumes from its checkpoint, which may be
older than what a killed attempt wrote here: on resuming, events past the checkpoint are removed from
the files, so no step is written twice. Events are flushed before each checkpoint.

Nothing of TensorBoard is imported unless the logger is on.
"""
from pathlib import Path

from mnist import atomic, rundir


class Off:
    """No logger: the calls training makes, doing nothing."""

    def batch(self, step, loss) -> None:
        pass

    def epoch(self, step, row, lr) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_board(cfg, run_dir, steps_done, main) -> Off:
    """The event writer for rank 0 (`main`) of a run with logger=tensorboard that has taken `steps_done`
    optimizer steps; Off() otherwise."""
    if not main or cfg.logger.name != "tensorboard":
        return Off()
    return Board(Path(run_dir) / rundir.TENSORBOARD, steps_done, _hparams(cfg))


class Board(Off):
    def __init__(self, folder, steps_done, hparams):
        from torch.utils.tensorboard import SummaryWriter

        kept = keep_steps_up_to(folder, steps_done)
        self.writer = SummaryWriter(str(folder))
        if not kept:
            from torch.utils.tensorboard.summary import hparams as hparams_summaries

            for summary in hparams_summaries(hparams, {"test/accuracy": None, "test/loss": None}):
                self.writer.file_writer.add_summary(summary)  # into this run, not the subfolder add_hparams makes
            self.writer.flush()

    def batch(self, step, loss) -> None:
        self.writer.add_scalar("train/loss", loss, step)

    def epoch(self, step, row, lr) -> None:
        for tag, value in (("train/epoch_loss", row["train_loss"]), ("test/loss", row["test_loss"]),
                           ("test/accuracy", row["accuracy"]), ("lr", lr), ("samples_per_s", row["samples_per_s"])):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _hparams(cfg):
    """The run's config as {dotted key: number, string or bool}; lists as their text."""
    from omegaconf import OmegaConf

    leaves = rundir.leaves(OmegaConf.to_container(cfg, resolve=True))
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in leaves.items() if value is not None}


def keep_steps_up_to(folder, steps_done) -> bool:
    """Remove what the checkpoint does not vouch for: every event file when no step was taken, else the
    events past `steps_done` (rewriting the files that have any). Returns whether any event file is kept."""
    files = sorted(Path(folder).glob("events.out.tfevents.*"))
    if steps_done == 0:
        for path in files:
            path.unlink()
        return False
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in files:
        records = list(RawEventFileLoader(str(path)).Load())  # up to a record a killed writer left half-written
        kept = [r for r in records if Event.FromString(r).step <= steps_done]
        if len(kept) < len(records) or path.stat().st_size != _size(records):
            def write(tmp, kept=kept):
                with open(tmp, "wb") as f:
                    writer = RecordWriter(f)
                    for record in kept:
                        writer.write(record)

            atomic.write_whole(path, write)
    return bool(files)


def _size(records):
    """The bytes these records take in a file: TFRecord's 8-byte length, 4-byte CRC, data, 4-byte CRC."""
    return sum(16 + len(r) for r in records)
