"""The loss menu (loss=<name>) and the optimizer menu, used as a user uses them: sweeps of
`python -m mnist.run` on tiny generated data, then the log, metrics.csv and the checkpoint."""
import csv
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from conftest import make_images, run
from omegaconf import OmegaConf

LOSSES = ["nll", "cross_entropy", "mse", "bce", "bce_with_logits", "smooth_l1", "huber"]
N_TEST, TEST_SEED = 256, 8  # tiny_data's FashionMNIST test set: write_dataset(..., seed=7), t10k's seed is 8


def one_hot(labels):
    return F.one_hot(labels, 10).float()


# Each loss as the course's notebooks write it: criterion = nn.XLoss(); loss = criterion(output, target).
NOTEBOOK = {
    "nll": lambda output, labels: nn.NLLLoss()(output, labels),
    "cross_entropy": lambda output, labels: nn.CrossEntropyLoss()(output, labels),
    "mse": lambda output, labels: nn.MSELoss()(output, one_hot(labels)),
    "bce": lambda output, labels: nn.BCELoss()(output, one_hot(labels)),
    "bce_with_logits": lambda output, labels: nn.BCEWithLogitsLoss()(output, one_hot(labels)),
    "smooth_l1": lambda output, labels: nn.SmoothL1Loss()(output, one_hot(labels)),
    "huber": lambda output, labels: nn.HuberLoss()(output, one_hot(labels)),
}
PROBABILITIES = {"mse", "bce", "smooth_l1", "huber"}  # the losses the material applies to a softmax's output
LOGITS = {"cross_entropy", "bce_with_logits"}


@pytest.fixture(scope="module")
def loss_sweep(tmp_path_factory):
    from conftest import write_dataset

    base = tmp_path_factory.mktemp("losses")
    write_dataset(base / "data", "FashionMNIST", seed=7)
    result = run(["-m", f"loss={','.join(LOSSES)}", "data=fashion_mnist", f"data.root={base / 'data'}",
                  "trainer.epochs=1", "trainer.threads=1", f"hydra.sweep.dir={base / 'sweep'}"], cwd=base)
    assert result.returncode == 0, result.stderr
    return {loss: base / "sweep" / str(i) for i, loss in enumerate(LOSSES)}


def tiny_test_set():
    images, labels = make_images(N_TEST, TEST_SEED)
    return torch.tensor(list(images), dtype=torch.float32).view(N_TEST, 1, 28, 28) / 255, torch.tensor(list(labels))


def course_lines(run_dir):
    return [line for line in (run_dir / "train.log").read_text().splitlines()
            if line.startswith(("Train Epoch", "Test set"))]


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_trains_the_mlp_and_the_test_line_reports_that_loss(loss_sweep, loss):
    from mnist.models import build_model

    run_dir = loss_sweep[loss]
    (row,) = csv.DictReader(open(run_dir / "metrics.csv"))
    assert float(row["accuracy"]) >= 0.8, row  # one epoch of 8 batches (real data: tests/test_realdata.py)
    test_line = [line for line in course_lines(run_dir) if line.startswith("Test set")][0]
    shown = re.fullmatch(r"Test set: Average loss: (\d+\.\d{4}), Accuracy: (\d+)/256 \((\d+)%\)", test_line)
    assert shown and shown.group(1) == f"{float(row['test_loss']):.4f}", test_line

    # The trained model, and the notebook's own loss over the test set, computed here with torch alone.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["loss"]["name"] == loss
    model = build_model(OmegaConf.create(config["model"])).eval()
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    images, labels = tiny_test_set()
    with torch.no_grad():
        output = model((images - config["data"]["mean"]) / config["data"]["std"])
    sums = output.sum(dim=1)
    if loss in PROBABILITIES:
        torch.testing.assert_close(sums, torch.ones(N_TEST))
    elif loss in LOGITS:  # neither probabilities nor log-probabilities
        assert not torch.allclose(sums, torch.ones(N_TEST))
        assert not torch.allclose(output.exp().sum(1), torch.ones(N_TEST))
    expected = NOTEBOOK[loss](output, labels).item()
    assert float(row["test_loss"]) == pytest.approx(expected, rel=1e-4, abs=2e-6)
    assert int(shown.group(2)) == (output.argmax(dim=1) == labels).sum().item()  # accuracy: argmax, any loss


def test_cross_entropy_on_logits_is_the_course_nll_line_for_line(loss_sweep):
    assert course_lines(loss_sweep["cross_entropy"]) == course_lines(loss_sweep["nll"])
    assert course_lines(loss_sweep["mse"]) != course_lines(loss_sweep["nll"])


@pytest.mark.parametrize("name", LOSSES)
def test_a_half_precision_output_is_scored_in_float32_inside_autocast_or_not(name):
    """trainer.precision=bf16: training calls the loss inside autocast, evaluate() outside it (after an
    autocast forward pass); both score the bfloat16 output in float32, as the loss of its float32 copy."""
    from mnist.losses import Loss

    output_kind = "none" if name in LOGITS else "softmax" if name in PROBABILITIES else "log_softmax"
    loss = Loss({"name": name}, output_kind)
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    output = {"none": logits, "softmax": logits.softmax(1), "log_softmax": logits.log_softmax(1)}[output_kind]
    output, labels = output.bfloat16(), torch.arange(64) % 10
    expected = loss(output.float(), labels, reduction="sum")
    assert loss(output, labels, reduction="sum").dtype == torch.float32
    assert torch.equal(loss(output, labels, reduction="sum"), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(loss(output, labels, reduction="sum"), expected)


REFUSE_WITHOUT_TORCH = """
import sys
from mnist.run import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("EXIT:", e.code)
print("TORCH:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("overrides, fix", [
    (["model.output=none"], "model.output=log_softmax"),  # nll on raw logits
    (["loss=bce_with_logits", "model=mlp_sigmoid", "model.output=softmax"], "model.output=none"),
    (["loss=mse", "model=cnn", "model.output=log_softmax"], "model.output=softmax"),
    (["loss=cross_entropy", "model.output=log_softmax"], "model.output=none"),
])
def test_a_loss_that_does_not_fit_the_output_is_refused_on_the_login_node(tiny_data, tmp_path, overrides, fix):
    result = subprocess.run([sys.executable, "-c", REFUSE_WITHOUT_TORCH, "launcher=slurm", f"data.root={tiny_data}",
                             *overrides, f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert "EXIT: 2" in result.stdout and "TORCH: False" in result.stdout, result.stdout + result.stderr
    (paragraph,) = result.stderr.strip().splitlines()
    loss = next((o.split("=")[1] for o in overrides if o.startswith("loss=")), "nll")
    output = next(o.split("=")[1] for o in overrides if o.startswith("model.output="))
    assert f"loss={loss} does not fit" in paragraph and f"model.output={output}" in paragraph, paragraph
    assert f"Set {fix}" in paragraph and "Traceback" not in paragraph
    assert not (tmp_path / "run").exists()


def test_every_loss_fits_every_model_without_naming_an_output(tiny_data, tmp_path):
    from mnist.config import choices, compose

    for model in choices("model"):
        for loss in LOSSES:
            assert compose([f"model={model}", f"loss={loss}"]).loss.name == loss  # checked, not refused
    result = run(["launcher=slurm", "dry_run=true", f"data.root={tiny_data}", "model=cnn", "loss=bce_with_logits"],
                 cwd=tmp_path)
    assert result.returncode == 0 and "#SBATCH --job-name=cnn" in result.stdout, result.stderr


# -- the optimizer menu ----------------------------------------------------------------------------

def test_sgd_keeps_its_momentum_and_the_material_has_plain_sgd_too(tiny_data, tmp_path):
    result = run(["-m", "optimizer=sgd,sgd_momentum,sgd_plain", f"data.root={tiny_data}", "trainer.epochs=1",
                  "trainer.threads=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = [tmp_path / "sweep" / str(i) for i in range(3)]
    groups = [torch.load(r / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0] for r in runs]
    assert [(g["lr"], g["momentum"]) for g in groups] == [(0.01, 0.9), (0.01, 0.9), (0.01, 0)]  # the material's
    sgd, with_momentum, plain = [course_lines(r) for r in runs]
    assert sgd == with_momentum != plain  # optimizer=sgd trains as it always did: with momentum
