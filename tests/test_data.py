import gzip
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, make_images, run, write_dataset
from omegaconf import OmegaConf
from torchvision import datasets, transforms

from mnist import data, datafiles
from mnist.config import compose
from mnist.data import InMemoryLoader, ensure_dataset, loaders
from mnist.datafiles import DataError
from mnist.idx import IdxError, read_dims, write_idx


def test_idx_files_we_write_are_read_back_by_torchvision_and_by_training_alike(tmp_path):
    images, labels = make_images(20, seed=3)
    write_dataset(tmp_path, "MNIST", n_train=20, n_test=10, seed=3)
    dataset = datasets.MNIST(tmp_path, train=True, download=False)
    assert dataset.data.shape == (20, 28, 28) and dataset.data.dtype == torch.uint8
    assert dataset.data.flatten().tolist() == list(images)
    assert dataset.targets.tolist() == list(labels)
    ours = data.load_split(OmegaConf.create({"root": str(tmp_path), "name": "mnist"}), train=True)
    assert torch.equal(ours[0], dataset.data) and torch.equal(ours[1], dataset.targets)
    assert ours[1].dtype == dataset.targets.dtype


def test_idx_header_is_checked_against_the_file_size(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, bytes(2 * 784), (2, 28, 28))
    assert read_dims(path) == (2, 28, 28)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(IdxError, match="truncated or corrupt"):
        read_dims(path)
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(IdxError, match="not an IDX file"):
        read_dims(path)


def test_a_gzipped_idx_file_is_checked_without_unpacking_it(tmp_path):
    path, gz = tmp_path / "x-idx3-ubyte", tmp_path / "x-idx3-ubyte.gz"
    write_idx(path, bytes(2 * 784), (2, 28, 28))
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_dims(gz) == (2, 28, 28)  # the header from its first bytes, the size from its gzip trailer
    with open(gz, "r+b") as f:
        f.truncate(gz.stat().st_size - 3)
    with pytest.raises(IdxError, match="truncated or corrupt"):
        read_dims(gz)
    gz.write_bytes(path.read_bytes())
    with pytest.raises(IdxError, match="not a gzip file"):
        read_dims(gz)


def test_gzipped_files_placed_by_hand_are_unpacked_and_checked(tmp_path):
    raw = write_dataset(tmp_path, "FashionMNIST", n_train=30, n_test=10)
    for f in datafiles.FILES:  # like Debian's recompressed copies: only .gz files
        with open(raw / f, "rb") as src, gzip.open(raw / f"{f}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw / f)
    assert datafiles.prepare(tmp_path, "fashion_mnist") == {"train": 30, "test": 10}
    assert datasets.FashionMNIST(tmp_path, train=False).data.shape == (10, 28, 28)


def test_missing_dataset_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # outside a job, data.download=auto is a way out
    with pytest.raises(DataError) as error:
        ensure_dataset(compose([f"data.root={tmp_path}", "data.download=false"]).data)
    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "python -m mnist.data download data=mnist" in message
    assert "data.download=auto" in message


def replace_with_gzip(path, content):
    os.remove(path)
    path.with_name(path.name + ".gz").write_bytes(content)


@pytest.mark.parametrize("damage, expected", [
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(50)), "truncated"),
    (lambda raw: (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + bytes(4)), "not unsigned bytes"),
    (lambda raw: (raw / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04" + bytes(20)), "not an IDX file"),
    (lambda raw: write_idx(raw / "train-labels-idx1-ubyte", bytes(511), (511,)), "512 images but"),
    (lambda raw: write_idx(raw / "t10k-labels-idx1-ubyte", bytes([12] * 256), (256,)), "label 12"),
    (lambda raw: replace_with_gzip(raw / "t10k-images-idx3-ubyte", b"not gzip"), "corrupt"),
])
def test_corrupt_files_are_named_with_the_fix(tmp_path, damage, expected):
    raw = write_dataset(tmp_path, "MNIST")
    damage(raw)
    with pytest.raises(DataError) as error:
        datafiles.prepare(tmp_path, "mnist")
    assert expected in str(error.value)
    assert "python -m mnist.data download" in str(error.value)


def read_only(folder):
    os.chmod(folder, 0o555)
    if os.geteuid() == 0:  # root writes through permissions, not through the immutable flag
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")


def writable(folder):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    os.chmod(folder, 0o755)


def test_unwritable_data_root_is_named(tmp_path):
    raw = write_dataset(tmp_path, "MNIST", n_train=10, n_test=10)
    for f in datafiles.FILES:
        with open(raw / f, "rb") as src, gzip.open(raw / f"{f}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw / f)
    read_only(raw)
    try:
        result = run(["verify", f"data.root={tmp_path}"], ROOT, module="mnist.data")
    finally:
        writable(raw)
    assert result.returncode == 2, result.stderr
    assert f"Cannot unpack {raw}" in result.stderr and "data.root" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(raw.glob("*-ubyte")) and not list(raw.glob(".*"))


def test_loader_batches_cover_the_split_once_normalised_as_the_courses_transforms_do():
    images = torch.arange(10 * 784, dtype=torch.int64).remainder(256).to(torch.uint8).view(10, 28, 28)
    labels = torch.arange(10)
    loader = InMemoryLoader(images, labels, batch_size=4, shuffle=True, seed=1, normalize=(0.1307, 0.3081))
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    x, y = batches[0]
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    course = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    torch.testing.assert_close(x, torch.stack([course(images[i].numpy()) for i in y]))


def test_shuffle_is_seeded_per_epoch_and_unshuffled_order_is_kept():
    images, labels = torch.zeros(100, 28, 28, dtype=torch.uint8), torch.arange(100)
    loader = InMemoryLoader(images, labels, batch_size=100, shuffle=True, seed=1)
    order = lambda epoch: (loader.set_epoch(epoch), next(iter(loader))[1].tolist())[1]  # noqa: E731
    assert order(1) == order(1) and order(1) != order(2)
    plain = InMemoryLoader(images, labels, batch_size=100)
    assert next(iter(plain))[1].tolist() == list(range(100))


def test_ranks_take_equal_steps_even_when_the_split_does_not_divide():
    images, labels = torch.zeros(11, 28, 28, dtype=torch.uint8), torch.arange(11)
    ranks = [InMemoryLoader(images, labels, 2, True, 1, shard=(r, 2)) for r in (0, 1)]
    assert [len(loader) for loader in ranks] == [3, 3]
    assert [sum(len(y) for _, y in loader) for loader in ranks] == [5, 5]


def test_ranks_read_disjoint_shards():
    images, labels = torch.zeros(10, 28, 28, dtype=torch.uint8), torch.arange(10)
    shards = [torch.cat([y for _, y in InMemoryLoader(images, labels, 3, True, 1, shard=(r, 2))])
              for r in (0, 1)]
    assert sorted(shards[0].tolist() + shards[1].tolist()) == list(range(10))


def test_loaders_read_the_configured_dataset(tiny_data):
    cfg = compose([f"data.root={tiny_data}", "data=fashion_mnist"])
    train_loader, test_loader = loaders(cfg.data, seed=1, device="cpu")
    assert (train_loader.dataset_size, test_loader.dataset_size) == (512, 256)
    assert len(train_loader) == 8 and len(test_loader) == 1
