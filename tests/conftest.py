"""Shared fixtures: tiny MNIST-format datasets written as real IDX files, and a `run` helper
that calls `python -m mnist.run` the way a user does."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mnist.idx import write_idx

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_DEB = Path("/usr/share/datasets/fashion-mnist")

try:  # the real single-node Slurm the integration tests use (cluster/localslurm.py)
    from slurm_fixtures import *  # noqa: F401,F403
except ImportError:
    pass


def make_images(n, seed):
    """n 28x28 images whose label is readable: a bright 7x7 block at one of ten places, plus noise."""
    rng = random.Random(seed)
    labels = bytes(rng.randrange(10) for _ in range(n))
    images = bytearray(rng.randrange(40) for _ in range(n * 784))
    for i, label in enumerate(labels):
        top, left = 7 * (label // 4), 7 * (label % 4)
        for row in range(top, top + 7):
            start = i * 784 + row * 28 + left
            images[start:start + 7] = bytes([200 + rng.randrange(56) for _ in range(7)])
    return bytes(images), labels


def write_dataset(root, folder="MNIST", n_train=512, n_test=256, seed=0):
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = make_images(n, seed + (prefix == "t10k"))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, (n, 28, 28))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, (n,))
    return raw


@pytest.fixture
def tiny_data(tmp_path):
    """A data.root holding a small MNIST and Fashion-MNIST (512 train, 256 test images each)."""
    root = tmp_path / "data"
    write_dataset(root, "MNIST")
    write_dataset(root, "FashionMNIST", seed=7)
    return root


def run(args, cwd, env=None, timeout=300, module="mnist.run"):
    """`python -m mnist.run ARGS` in `cwd`, as a user types it; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory):
    """Full-size Fashion-MNIST from Debian's dataset-fashion-mnist, prepared in a data.root."""
    if not FASHION_MNIST_DEB.exists():
        if os.environ.get("REQUIRE_REALDATA") == "1":
            pytest.fail(f"{FASHION_MNIST_DEB} is missing: apt-get install dataset-fashion-mnist")
        pytest.skip(f"{FASHION_MNIST_DEB} is missing (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("fashion")
    result = run(["copy", str(FASHION_MNIST_DEB), "data=fashion_mnist", f"data.root={root}"], ROOT, module="mnist.data")
    assert result.returncode == 0, result.stderr
    return root
