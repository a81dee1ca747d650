"""`make bench` in quick mode on tiny generated Fashion-MNIST: it runs and writes every figure.

Only the CNN, which has every target: each model costs two child processes (~5 s each here)."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mnist.idx import write_idx

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"in_memory", "classic", "floor"}


def tiny_fashion_mnist(root, n_train=256, n_test=128):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.randbytes(n * 28 * 28), (n, 28, 28))
        write_idx(raw / f"{split}-labels-idx1-ubyte", bytes(rng.randrange(10) for _ in range(n)), (n,))


@pytest.mark.slow
def test_quick_bench_writes_every_figure(tmp_path):
    tiny_fashion_mnist(tmp_path / "data")
    out = tmp_path / "bench" / "train_speed.json"
    bench = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_speed", "--data-root", str(tmp_path / "data"),
         "--models", "cnn", "--quick", "--repeat", "1", "--out", str(out),
         "--sections", "train,switches,submit", "--switches", "channels_last,fp16",  # bf16, compile: slow on a CPU
         "--submit-rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert bench.returncode == 0, bench.stderr
    assert "Targets:" in bench.stdout and "x floor" in bench.stdout

    report = json.loads(out.read_text())
    assert set(report["models"]) == {"cnn"}
    cnn = report["models"]["cnn"]
    assert (cnn["train_samples"], cnn["test_samples"]) == (256, 128)
    assert set(cnn["epoch_s"]) == set(cnn["samples_per_s"]) == PATHS
    assert set(cnn["eval_s"]) == set(cnn["peak_mib"]) == {"in_memory", "classic"}
    figures = [*cnn["epoch_s"].values(), *cnn["samples_per_s"].values(), *cnn["eval_s"].values(),
               *cnn["peak_mib"].values(), *cnn["ratios"].values()]
    assert all(value > 0 for value in figures), cnn
    assert [t["model"] for t in report["targets"]] == ["cnn", "cnn", "cnn", "submit"]

    switches = report["switches"]["cnn"]  # fp16 is for GPUs only: not measured on this CPU
    assert set(switches["batch_ms"]) == set(switches["speedup"]) == {"default", "channels_last"}
    assert switches["speedup"]["default"] == 1.0 and all(v > 0 for v in switches["batch_ms"].values())
    assert "Speed switches on cpu" in bench.stdout

    submit = report["submit_path"]
    assert submit["heavy_imported"] == [] and submit["dry_run_s"] > 0 and submit["import_hydra_s"] > 0
    assert "sweep" not in report and "On the login node:" in bench.stdout
    for target in report["targets"]:
        assert isinstance(target["met"], bool) and isinstance(target["value"], float), target


def test_the_record_keeps_each_targets_best_value_lower_or_higher():
    from benchmarks.train_speed import against_record, updated_record

    checks = [{"model": "mlp", "target": "a", "value": 1.05, "better": "lower"},
              {"model": "cnn", "target": "b", "value": 2.0, "better": "higher"},
              {"model": "cnn", "target": "c", "value": 0.5, "better": "lower"}]
    record = {"mlp: a": {"value": 1.1}, "cnn: b": {"value": 2.8}}
    against_record(checks, record)
    assert [(c["record"], c["new_record"]) for c in checks] == [(1.1, True), (2.8, False), (None, True)]
    new = updated_record(checks, record, "abc1234")
    assert new["mlp: a"]["value"] == 1.05 and new["cnn: b"] == {"value": 2.8}
    assert new["cnn: c"]["commit"] == "abc1234" and record["mlp: a"] == {"value": 1.1}  # the old one untouched


def test_the_sweep_waves_model_predicts_the_packed_wall_and_the_per_task_or_run_time_that_meets_the_target():
    from benchmarks.sweep_speed import TARGET_PACKED, waves_model

    def sweep(startup_s, run_s, unpacked_wall_s=1.5 + 10 * (1.0 + 2.5 + 1.5)):  # G = 1 s a task
        figures = {"cpus": 2, "task_startup_s": startup_s, "run_s": run_s}
        return {"runs": 20, "pack": 5, "packed": {**figures, "tasks": 4, "submit_s": 2.0},
                "unpacked": {**figures, "tasks": 20, "submit_s": 1.5, "wall_s": unpacked_wall_s}}

    model = waves_model(sweep(2.5, 1.5))
    assert model["waves"] == {"packed": 2, "unpacked": 10} and model["slurm_per_task_s"] == pytest.approx(1.0)
    assert model["predicted_ratio"] == pytest.approx((2 + 2 * (1 + 2.5 + 5 * 1.5)) / (1.5 + 10 * (1 + 2.5 + 1.5)))
    per_task = model["per_task_for_target_s"]
    at_per_task = waves_model(sweep(per_task - 1.0, 1.5, 1.5 + 10 * (per_task + 1.5)))["predicted_ratio"]
    at_r = waves_model(sweep(2.5, model["run_for_target_s"], 1.5 + 10 * (3.5 + model["run_for_target_s"])))
    assert at_per_task == pytest.approx(TARGET_PACKED) and at_r["predicted_ratio"] == pytest.approx(TARGET_PACKED)
    assert per_task < 3.5 and model["run_for_target_s"] > 1.5  # these figures are under 0.5x: both have room
    assert waves_model(sweep(2.5, 1.5, unpacked_wall_s=30.0))["slurm_per_task_s"] == 0.0  # never below nothing


@pytest.mark.slow
def test_the_parallel_section_times_the_stop_agreement_against_a_baseline(tmp_path):
    tiny_fashion_mnist(tmp_path / "data")
    out = tmp_path / "parallel.json"
    bench = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_speed", "--data-root", str(tmp_path / "data"), "--models", "mlp",
         "--quick", "--repeat", "1", "--sections", "parallel", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    assert "every step (before)" in bench.stdout and "every 10 steps (now)" in bench.stdout
    mlp = json.loads(out.read_text())["parallel"]["mlp"]
    assert mlp["backend"] == "gloo" and mlp["batches"] == 2  # 256 images, 2 ranks of 64: 2 batches each
    assert set(mlp["step_ms"]) == set(mlp["over_baseline"]) == {"never", "every step", "every log_interval"}
    assert mlp["over_baseline"]["never"] == 1.0 and all(ms > 0 for ms in mlp["step_ms"].values())


def test_the_search_section_holds_the_search_to_the_grids_accuracy_and_a_share_of_its_epochs():
    from benchmarks.search_speed import table
    from benchmarks.train_speed import targets

    each = [{"seed": 0, "wall_s": 110.8, "epochs": 84, "best_accuracy": 0.8907},
            {"seed": 1, "wall_s": 80.2, "epochs": 54, "best_accuracy": 0.8897}]
    found = {"runs": 24, "trials": 24, "epochs": 5, "workers": 2, "pruner": "median",
             "grid": {"wall_s": 126.2, "epochs": 120, "best_accuracy": 0.889},
             "search": {"wall_s": 95.5, "epochs": 69.0, "best_accuracy": 0.8902}, "each": each, "met_by": 1,
             "epochs_ratio": 0.575, "points_behind": -0.02, "target_epochs_ratio": 0.6, "target_points": 0.3}
    checks = {c["target"]: c["met"] for c in targets({"search": found}) if c["model"] == "search"}
    assert checks == {"24 trials: at most 0.6x the 24-run grid's epochs": True,
                      "24 trials: best accuracy at most 0.3 points behind the grid's": True}
    assert not [c for c in targets({"search": {**found, "epochs_ratio": 0.7}}) if c["model"] == "search"][0]["met"]
    lines = table({"search": found})
    assert lines[1].startswith("search   95.5 s to result,  69.0 epochs trained, best accuracy 89.02%  (the mean of "
                               "2 searches"), lines
    assert lines[3] == "  seed 1:   80.2 s,  54 epochs (0.45x), best accuracy 88.97%", lines
    assert lines[-1].endswith("both targets met by 1 of 2 searches"), lines
    assert table({"search": {"skipped": "no Slurm"}}) == ["search: skipped: no Slurm"]
