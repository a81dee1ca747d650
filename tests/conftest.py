"""Shared fixtures: tiny MNIST-format datasets written as real IDX files (one shared, read-only copy per
test run), and a `run` helper that calls `python -m mnist.run` the way a user does."""
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mnist.idx import write_idx

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_DEB = Path("/usr/share/datasets/fashion-mnist")
# A file's download shown as done: torch's own progress line ("100.0%"), or tqdm's bar ("100%|") where tqdm is installed
DOWNLOADED = re.compile(r"\b100(?:\.0)?%")

try:  # the real single-node Slurm the integration tests use (cluster/localslurm.py)
    from slurm_fixtures import *  # noqa: F401,F403
except ImportError:
    pass


def imported_modules(stderr):
    """The modules a process imported, from its `python -X importtime` (PYTHONPROFILEIMPORTTIME=1) stderr."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


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


def contents(root):
    """Every file and folder under root (hidden ones too: lock files, staging folders) with its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(Path(root).rglob("*"))}


def changes(before, after):
    return sorted(f"{name}: {'added' if name not in before else 'removed' if name not in after else 'changed'}"
                  for name in before.keys() | after.keys() if before.get(name) != after.get(name))


@pytest.fixture(scope="session")
def read_only_data(tmp_path_factory):
    """A data.root holding a small MNIST and Fashion-MNIST (512 train, 256 test images each, unpacked),
    written once per test run and shared: only for tests whose commands read it. Runs, submits and
    `verify` read unpacked files without writing (no unpacking, no SHA256SUMS, no lock file); a test
    that damages the data or makes the code write into data.root writes its own with write_dataset."""
    root = tmp_path_factory.mktemp("shared") / "data"
    write_dataset(root, "MNIST")
    write_dataset(root, "FashionMNIST", seed=7)
    before = contents(root)
    yield root
    assert not changes(before, contents(root)), f"a test wrote into the shared {root}: " \
                                                f"{changes(before, contents(root))}"


@pytest.fixture(scope="session")
def sixteen_batches_data(tmp_path_factory):
    """A data.root holding an MNIST of 1024 training images (16 batches of 64) and 256 test images: room
    to stop a run mid-epoch. Shared and read-only, as read_only_data."""
    root = tmp_path_factory.mktemp("sixteen") / "data"
    write_dataset(root, "MNIST", n_train=1024, n_test=256)
    before = contents(root)
    yield root
    assert not changes(before, contents(root)), f"a test wrote into the shared {root}: " \
                                                f"{changes(before, contents(root))}"


@pytest.fixture
def tiny_data(read_only_data):
    """read_only_data, checked after the test: one that wrote into it errors in its teardown, by name."""
    before = contents(read_only_data)
    yield read_only_data
    assert not changes(before, contents(read_only_data)), (
        f"this test wrote into the shared data.root {read_only_data}: {changes(before, contents(read_only_data))}; "
        f"give it its own with write_dataset(tmp_path / 'data', ...)")


def copy_project(dest):
    """A copy of this checkout's code, conf/ and course scripts at dest, to change; run it with PYTHONPATH=dest."""
    for folder in ("mnist", "conf", "hydra_plugins", "slurm"):
        shutil.copytree(ROOT / folder, Path(dest) / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return Path(dest)


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
