"""Sweeps that finish sooner and ask for what they need: a lean job start, packing several runs into one
array task, and requests sized from what past runs used."""
import sys

import submitit
from omegaconf import OmegaConf

from mnist.config import compose
from mnist.launch.job import TrainJob

NOT_FOR_TRAINING = {"torchvision", "torch._dynamo", "torch._inductor", "sympy", "PIL", "hydra", "matplotlib"}


def test_a_job_imports_torch_and_nothing_training_does_not_need(tiny_data, tmp_path):
    cfg = compose([f"data.root={tiny_data}", "trainer.epochs=1", "launcher=slurm"])
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit", python=f"{sys.executable} -X importtime")
    job = executor.submit(TrainJob(OmegaConf.to_container(cfg, resolve=True), tmp_path / "run", 0))
    assert [row["epoch"] for row in job.result()] == [1]
    imported = {line.rsplit("|", 1)[-1].strip() for line in job.stderr().splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "mnist.train" in imported
    assert sorted(NOT_FOR_TRAINING & imported) == []
