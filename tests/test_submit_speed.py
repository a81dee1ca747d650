"""benchmarks/submit_speed.py: its pure parts, and a 3-run sweep timed on the tests' real Slurm."""
import subprocess

import pytest

from benchmarks import submit_speed
from mnist import datafiles


def test_without_slurm_the_sweep_benchmark_is_skipped_with_how_to_start_one(monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    result = submit_speed.measure_sweep_submission(n=3)
    assert set(result) == {"skipped"}
    assert "SLURM_CONF" in result["skipped"] and "make cluster-up" in result["skipped"]
    assert submit_speed.table({"sweep": result}) == [f"sweep submission: skipped: {result['skipped']}"]


def test_the_table_reports_ratios_and_whether_the_target_is_met():
    path = {"rounds": 5, "import_hydra_s": 0.2, "dry_run_s": 0.5, "ratio": 2.5, "target_ratio": 1.3,
            "heavy_imported": [], "torch_imported": False}
    sweep = {"n": 50, "rounds": 3, "array_s": 4.0, "separate_s": 30.0, "separate_median_each_s": 0.6, "ratio": 7.5}
    lines = submit_speed.table({"submit_path": path, "sweep": sweep})
    assert "2.50x" in lines[0] and "NOT met" in lines[0] and "0.200 s" in lines[0] and "0.500 s" in lines[0]
    assert lines[1].endswith(": none")
    assert "one array 4.00 s" in lines[2] and "50 separate 30.00 s" in lines[2] and "7.5x faster" in lines[2]
    assert "(target <= 1.3x: met)" in submit_speed.table({"submit_path": dict(path, ratio=1.2)})[0]


def test_ratios_are_medians_of_the_rounds_ratios():
    assert submit_speed.median_ratio([1.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0
    assert submit_speed.median_ratio([2.0, 2.0], [1.0, 4.0]) == 1.25


def test_job_ids_are_read_from_what_the_launcher_prints():
    assert submit_speed.submitted_job("Submitted job 123 (mlp)\n  run folder: x") == "123"
    assert submit_speed.submitted_job("Submitted job array 456 (mlp): 50 runs, at most 8 at once") == "456"


def test_the_benchmark_data_passes_the_login_node_check(tmp_path):
    root = submit_speed.write_tiny_data(tmp_path / "data")
    datafiles.check_on_login_node(root, "mnist")  # raises DataError if the submit path would refuse it
    assert sorted(p.name for p in datafiles.raw_folder(root, "mnist").iterdir()) == sorted(datafiles.FILES)


@pytest.mark.slurm
def test_a_small_sweep_is_timed_as_one_array_and_one_by_one_and_leaves_no_job(slurm_env):
    result = submit_speed.measure_sweep_submission(n=3, rounds=1)
    assert (result["n"], result["rounds"]) == (3, 1), result
    assert result["array_s"] > 0 and result["separate_s"] > 0 and result["ratio"] > 0
    queue = subprocess.run(["squeue", "-h", "-o", "%i %r"], capture_output=True, text=True, check=True)
    assert "JobHeldUser" not in queue.stdout  # every job it submitted (held) is cancelled
