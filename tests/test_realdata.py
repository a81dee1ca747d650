"""Full-size real data: Fashion-MNIST from Debian's dataset-fashion-mnist (same format as MNIST)."""
import csv

import pytest

from conftest import run

pytestmark = pytest.mark.realdata


def test_mlp_with_the_reference_settings_learns_fashion_mnist_in_one_epoch(fashion_mnist_root, tmp_path):
    result = run(["data=fashion_mnist", f"data.root={fashion_mnist_root}", "trainer.epochs=1",
                  f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Train Epoch: 1 [640/60000 (1%)]\tLoss: " in result.stdout
    assert "Accuracy: " in result.stdout and "/10000 (" in result.stdout
    (row,) = csv.DictReader(open(tmp_path / "run" / "metrics.csv"))
    assert float(row["accuracy"]) >= 0.80  # about 0.84 here
