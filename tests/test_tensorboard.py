"""logger=tensorboard: the event files a run leaves, read back with TensorBoard's own event reader and
compared with the run's log and metrics.csv, across a stop and resume too."""
import csv
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import run

N_TRAIN, BATCHES, EPOCHS = 1024, 16, 2
EPOCH_TAGS = {"train/epoch_loss": "train_loss", "test/loss": "test_loss", "test/accuracy": "accuracy",
              "samples_per_s": "samples_per_s"}


@pytest.fixture(scope="session")
def data(sixteen_batches_data):
    return sixteen_batches_data


def args(data, run_dir, *more):
    return [f"data.root={data}", "logger=tensorboard", f"trainer.epochs={EPOCHS}", "trainer.log_interval=3",
            "trainer.threads=1", f"hydra.run.dir={run_dir}", *more]


def events(run_dir):
    """{tag: [(step, value), ...]} of every scalar in the run's event files, through TensorBoard's reader;
    and the hparams plugin's record of the config. Fails if any tag has a step twice."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    scalars, hparams = {}, []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        hparams.append(data.session_start_info.hparams)
                elif value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    for tag, points in scalars.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag} has steps written twice: {sorted(steps)}"
    return {tag: sorted(points) for tag, points in scalars.items()}, hparams


def logged_losses(run_dir):
    """The `Loss:` of every Train Epoch line, at its global step (optimizer steps taken with it); train.log
    keeps every attempt's lines, so a step trained again has the later line's."""
    found = []
    for line in (run_dir / "train.log").read_text().splitlines():
        if line.startswith("Train Epoch"):
            epoch, seen = int(line.split()[2]), int(line.split("[")[1].split("/")[0])
            found.append(((epoch - 1) * BATCHES + seen // 64 + 1, float(line.split("Loss: ")[1])))
    return sorted(dict(found).items())


def check_against_the_run(run_dir):
    scalars, hparams = events(run_dir)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == EPOCHS
    for tag, column in EPOCH_TAGS.items():
        assert [step for step, _ in scalars[tag]] == [BATCHES * e for e in range(1, EPOCHS + 1)], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[column]) for r in rows], rel=1e-6), tag
    assert [v for _, v in scalars["lr"]] == pytest.approx([1.0, 0.7])  # Adadelta's, StepLR(1, 0.7)
    logged = logged_losses(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in logged] == [1, 4, 7, 10, 13, 16, 17, 20, 23, 26,
                                                                              29, 32]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in logged], abs=5e-7)
    return scalars, hparams


def test_a_run_writes_its_curves_and_config_for_tensorboard(data, tmp_path):
    run_dir = tmp_path / "run"
    result = run(args(data, run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, hparams = check_against_the_run(run_dir)
    (config,) = hparams  # once
    assert config["loss.name"].string_value == "nll" and config["model.name"].string_value == "mlp"
    assert config["optimizer.lr"].number_value == 1.0 and config["trainer.epochs"].number_value == EPOCHS
    assert config["model.hidden"].string_value == "[128]"


OFF = """
import atexit, sys
from mnist.run import main
atexit.register(lambda: print("TENSORBOARD:", sorted(m for m in sys.modules if "tensorboard" in m)))
main(sys.argv[1:])
"""


def test_without_the_logger_nothing_of_tensorboard_is_imported_or_written(data, tmp_path):
    result = subprocess.run([sys.executable, "-c", OFF, f"data.root={data}", "trainer.epochs=1",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "TENSORBOARD: []" in result.stdout
    assert (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "tensorboard").exists()


def stop_when(line_start, command, cwd):
    """Start a run, Ctrl-C it when it prints a line starting with `line_start`; returns its exit status."""
    process = subprocess.Popen([sys.executable, "-m", "mnist.run", *command], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in process.stdout:
        if line.startswith(line_start):
            process.send_signal(signal.SIGINT)
            break
    process.communicate(timeout=120)
    return process.returncode


def test_a_run_stopped_mid_epoch_and_resumed_has_each_step_once(data, tmp_path):
    straight = tmp_path / "straight"
    assert run(args(data, straight), cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "run"
    assert stop_when("Train Epoch: 2 [384/", args(data, run_dir), tmp_path) == 130  # batch 7 of 16
    resumed = run(args(data, run_dir), cwd=tmp_path)
    assert resumed.returncode == 0 and "at epoch 2, batch" in resumed.stdout, resumed.stderr
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per attempt
    scalars, hparams = check_against_the_run(run_dir)
    timeless = lambda scalars: {t: p for t, p in scalars.items() if t != "samples_per_s"}  # noqa: E731
    assert timeless(scalars) == timeless(events(straight)[0])  # training resumes exactly, and so do its curves
    assert len(hparams) == 1


def test_events_a_killed_attempt_wrote_past_its_checkpoint_are_dropped_on_resume(data, tmp_path):
    """A job killed after its events reached the disk but before its checkpoint did resumes from the
    older checkpoint and trains those steps again: they must not be there twice."""
    run_dir = tmp_path / "run"
    assert run(args(data, run_dir, "trainer.epochs=1"), cwd=tmp_path).returncode == 0
    shutil.copy(run_dir / "checkpoint.pt", tmp_path / "after_epoch_1.pt")
    assert run(args(data, run_dir), cwd=tmp_path).returncode == 0  # epoch 2, its events and checkpoint
    assert [s for s, _ in events(run_dir)[0]["test/loss"]] == [BATCHES, 2 * BATCHES]
    shutil.copy(tmp_path / "after_epoch_1.pt", run_dir / "checkpoint.pt")  # as if killed before that checkpoint
    resumed = run(args(data, run_dir), cwd=tmp_path)
    assert resumed.returncode == 0 and "after epoch 1" in resumed.stdout, resumed.stderr
    check_against_the_run(run_dir)


@pytest.mark.slurm
def test_a_data_parallel_job_writes_its_events_from_rank_zero_once(slurm_env, data, tmp_path):
    run_dir = tmp_path / "run"
    result = run(["launcher=slurm", "resources.tasks_per_node=2", "resources.mem=3G",
                  f"launcher.log_dir={tmp_path / 'logs'}", *args(data, run_dir)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from test_slurm import submitted_id, wait_for

    job_id = submitted_id(result)
    assert wait_for(job_id) == {job_id: "COMPLETED"}
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's
    scalars, _ = events(run_dir)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    steps = N_TRAIN // 64 // 2  # each rank takes half of the batches
    assert [s for s, _ in scalars["test/accuracy"]] == [steps, 2 * steps]
    assert [v for _, v in scalars["test/accuracy"]] == pytest.approx([float(r["accuracy"]) for r in rows])
