"""trainer.* switches that change how a run trains, not what: the progress bar, mixed precision,
channels-last and torch.compile. Runs on tiny generated data, in this process (train() is what
`python -m mnist.run` calls) except where a real terminal is the point."""
import io
import os
import pty
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_train import EPOCH_LINE, TEST_LINE, TRAIN_LINE, WHERE_LINE

from mnist.config import compose
from mnist.progress import Progress, wanted
from mnist.train import train


def train_here(data_root, run_dir, *overrides):
    cfg = compose([f"data.root={data_root}", "trainer.epochs=1", "trainer.threads=1", *overrides])
    rows = train(cfg, run_dir)
    return rows[-1], torch.load(run_dir / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def plain_mlp(read_only_data, tmp_path_factory):
    return train_here(read_only_data, tmp_path_factory.mktemp("plain"))


def test_bf16_trains_in_bfloat16_to_nearly_the_same_loss(tiny_data, plain_mlp, tmp_path):
    (plain, _), (mixed, checkpoint) = plain_mlp, train_here(tiny_data, tmp_path, "trainer.precision=bf16")
    assert mixed["test_loss"] != plain["test_loss"]  # it really computed in bfloat16 ...
    assert mixed["test_loss"] == pytest.approx(plain["test_loss"], rel=0.1)  # ... and learned the same
    assert mixed["accuracy"] >= plain["accuracy"] - 0.02
    assert checkpoint["model"]["layers.1.weight"].dtype == torch.float32  # the weights stay float32


def test_channels_last_keeps_the_cnn_weights_nhwc_and_its_results(tiny_data, tmp_path):
    plain, _ = train_here(tiny_data, tmp_path / "plain", "model=cnn")
    nhwc, checkpoint = train_here(tiny_data, tmp_path / "nhwc", "model=cnn", "trainer.channels_last=true")
    weight = checkpoint["model"]["conv2.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    # Dropout draws its masks in memory order, so the runs differ a little, and learn alike.
    assert nhwc["accuracy"] >= plain["accuracy"] - 0.02 and nhwc["test_loss"] < 0.05


def test_compile_trains_the_same_and_saves_a_checkpoint_an_uncompiled_run_resumes(tiny_data, plain_mlp, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, checkpoint = train_here(tiny_data, tmp_path, "trainer.compile=true")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled the model
    assert compiled["test_loss"] == pytest.approx(plain_mlp[0]["test_loss"], rel=1e-3)
    assert set(checkpoint["model"]) == set(plain_mlp[1]["model"])  # no "_orig_mod." keys
    rows = train(compose([f"data.root={tiny_data}", "trainer.epochs=2", "trainer.threads=1"]), tmp_path)
    assert [row["epoch"] for row in rows] == [1, 2]


def test_progress_is_on_only_on_a_terminal_unless_switched():
    primary, secondary = pty.openpty()
    with os.fdopen(secondary, "w") as terminal, open(os.devnull, "w") as file:
        assert wanted("auto", terminal) and not wanted("auto", file)
        assert not wanted(False, terminal) and wanted(True, file)
    os.close(primary)


def test_progress_line_shows_the_bar_throughput_and_time_left():
    progress = Progress(on=True, stream=io.StringIO())
    progress.start(epoch=2, done=0, total=10, samples_per_batch=64)
    line = progress.line(done=5, elapsed=10.0)
    assert line.startswith("Epoch 2 |") and " 5/10 " in line
    assert " 32 samples/s " in line and line.endswith("0:10<0:10")  # 5 batches of 64 in 10 s; 5 to go
    bar = line.split("|")[1]
    assert bar.count("#") == len(bar) // 2


def test_a_run_on_a_terminal_shows_a_progress_bar_and_keeps_the_log_lines(tiny_data, tmp_path):
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist.run", f"data.root={tiny_data}", "trainer.epochs=1", "trainer.log_interval=2",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=secondary, text=True)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the run ended and closed its end of the terminal
            break
        if not chunk:
            break
        shown += chunk
    out = process.communicate(timeout=120)[0]
    os.close(primary)
    assert process.returncode == 0, shown.decode()
    assert b"\rEpoch 1 |" in shown and b"samples/s" in shown and b" 8/8 " in shown
    lines = [line for line in out.splitlines() if line]
    assert WHERE_LINE.match(lines[0]), lines[0]  # where it trains, then only the course's lines
    assert all(TRAIN_LINE.match(line) or TEST_LINE.match(line) or EPOCH_LINE.match(line) for line in lines[1:])
    assert "\r" not in out and (tmp_path / "run" / "train.log").read_text() == out
