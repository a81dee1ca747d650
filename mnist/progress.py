"""A progress bar for interactive runs: one line on stderr, redrawn in place, with the epoch's
throughput and time left. The course's log lines are untouched: the bar steps aside for them.

On by default only when stderr is a terminal (never in a batch job's log); trainer.progress=false
turns it off, trainer.progress=true forces it.
"""
import os
import sys
import time

from mnist import figures

REDRAW_S = 0.1


def wanted(setting, stream=None) -> bool:
    stream = stream or sys.stderr
    return stream.isatty() if setting == "auto" else bool(setting)


class Progress:
    """`start(epoch, done, total, samples_per_batch)`, `update(done)` after each batch,
    `clear()` before printing a line, `close()` at the end of the epoch. Off: all do nothing."""

    def __init__(self, on, stream=None):
        self.on = on
        self.stream = stream or sys.stderr
        self.shown = False

    def start(self, epoch, done, total, samples_per_batch) -> None:
        self.epoch, self.total, self.samples_per_batch = epoch, total, samples_per_batch
        self.first, self.started, self.drawn_at = done, time.perf_counter(), 0.0

    def update(self, done) -> None:
        if not self.on:
            return
        now = time.perf_counter()
        if now - self.drawn_at < REDRAW_S and done < self.total:
            return
        self.drawn_at = now
        self.stream.write("\r" + self.line(done, now - self.started) + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def line(self, done, elapsed) -> str:
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else 0.0
        tail = (f" {done}/{self.total} {rate * self.samples_per_batch:,.0f} samples/s "
                   f"{figures.clock(elapsed)}<{figures.clock(left)}")
        head, columns = f"Epoch {self.epoch} ", self.columns()
        width = max(10, min(40, columns - len(head) - len(tail) - 3))
        filled = width * done // self.total
        return f"{head}|{'#' * filled}{'.' * (width - filled)}|{tail}"[:columns - 1]  # a wrapped line stays

    def columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # not a terminal (forced on, or a test's buffer)
            return 80

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    close = clear
