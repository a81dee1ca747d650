"""Data on clusters: many processes against one data.root at once, checksums, damaged files.

Real processes (`python -m mnist.data`, `python -m mnist.run`) started together, and a real
download from a slow local HTTP server, so that writers really race on the lock.
"""
import functools
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import DOWNLOADED, FASHION_MNIST_DEB, ROOT, run, write_dataset

from mnist import datafiles
from mnist.config import compose
from mnist.data import ensure_dataset
from mnist.datafiles import DataError

N = 3  # processes started at once (more than this machine's 2 cores)


def gzip_only(raw):
    """Replace the four IDX files in `raw` by gzipped copies, as Debian ships them."""
    for f in datafiles.FILES:
        with open(raw / f, "rb") as src, gzip.open(raw / f"{f}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw / f)
    return raw


def gz_source(tmp_path):
    """A folder holding the four gzipped IDX files of a tiny dataset, like /usr/share/datasets/fashion-mnist."""
    raw = gzip_only(write_dataset(tmp_path / "made", "FashionMNIST", seed=7))
    source = tmp_path / "source"
    shutil.copytree(raw, source)
    return source


def start_all(commands, **kwargs):
    """Start every command at once; wait for all; return (process, stdout, stderr) of each."""
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
                 for c in commands]
    return [(p, *p.communicate(timeout=240)) for p in processes]


def assert_whole(raw, originals):
    """The four unpacked files hold `originals`' content, SHA256SUMS records them, no temporary files."""
    sums = (raw / datafiles.SUMS).read_text().splitlines()
    assert sums == [f"{hashlib.sha256((raw / f).read_bytes()).hexdigest()}  {f}" for f in datafiles.FILES]
    for f in datafiles.FILES:
        with gzip.open(originals / f"{f}.gz") as original:
            assert (raw / f).read_bytes() == original.read(), f
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        [datafiles.SUMS, *datafiles.FILES, *(f"{f}.gz" for f in datafiles.FILES)])
    assert [p.name for p in raw.parent.parent.iterdir() if p.name.startswith(".")] == [f".{raw.parent.name}.lock"]


def test_copies_started_together_leave_whole_files_and_one_sums_file(tmp_path):
    source, root = gz_source(tmp_path), tmp_path / "data"
    command = [sys.executable, "-m", "mnist.data", "copy", str(source), "data=fashion_mnist", f"data.root={root}"]
    for process, out, err in start_all([command] * N, cwd=ROOT):
        assert process.returncode == 0, err
        assert "512 training and 256 test images, checked (sha256 sums match" in out
    raw = datafiles.raw_folder(root, "fashion_mnist")
    assert_whole(raw, source)

    # Once done, a copy finds the same files there and redoes nothing; a staging folder left
    # by a killed writer is cleared.
    inodes = {p.name: p.stat().st_ino for p in raw.iterdir()}
    (root / ".FashionMNIST.staging-99999").mkdir()
    assert datafiles.copy_from(source, root, "fashion_mnist") == {"train": 512, "test": 256}
    assert {p.name: p.stat().st_ino for p in raw.iterdir()} == inodes
    assert_whole(raw, source)


def test_runs_started_together_on_gzipped_data_all_train(tmp_path):
    root = tmp_path / "data"
    raw = gzip_only(write_dataset(root, "MNIST"))  # each run finds only .gz files and unpacks them
    commands = [[sys.executable, "-m", "mnist.run", f"data.root={root}", "trainer.epochs=1", "trainer.threads=1",
                 f"hydra.run.dir={tmp_path / f'run{i}'}"] for i in range(N)]
    for process, out, err in start_all(commands, cwd=tmp_path):
        assert process.returncode == 0, err
        assert "Test set: Average loss" in out
    assert sorted(p.name for p in raw.iterdir()) == sorted([*datafiles.FILES, *(f"{f}.gz" for f in datafiles.FILES)])
    assert datafiles.prepare(root, "mnist") == {"train": 512, "test": 256}


DOWNLOAD = """
import json, pathlib, sys
from torchvision import datasets
from mnist import data

url, resources, ready = sys.argv[1], json.loads(sys.argv[2]), pathlib.Path(sys.argv[3])
datasets.MNIST.mirrors = [url]
datasets.MNIST.resources = [tuple(r) for r in resources]
ready.touch()  # torch is imported: the server may start answering
sys.exit(data.main(["download", *sys.argv[4:]]))
"""


class SlowServer(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; counts the fetches of each file; holds the first answer until every
    downloader has started, then answers slowly, so that the downloads overlap."""

    def __init__(self, *args, fetches, ready, **kwargs):
        self.fetches, self.ready = fetches, ready
        super().__init__(*args, **kwargs)

    def do_GET(self):
        if self.headers.get("Method") != "HEAD":  # torchvision first probes for redirects with this header
            self.fetches.append(self.path)
        deadline = time.monotonic() + 120
        while len(list(self.ready.iterdir())) < N:
            if time.monotonic() > deadline:
                self.fetches.append("gave up waiting for the other downloaders")
                break
            time.sleep(0.05)
        time.sleep(0.2)
        super().do_GET()

    def log_message(self, *args):
        pass


def test_downloads_started_together_fetch_each_file_once(tmp_path):
    source, root, ready = gz_source(tmp_path), tmp_path / "data", tmp_path / "ready"
    ready.mkdir()
    fetches = []
    handler = functools.partial(SlowServer, directory=str(source), fetches=fetches, ready=ready)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    resources = [(f"{f}.gz", hashlib.md5((source / f"{f}.gz").read_bytes()).hexdigest()) for f in datafiles.FILES]
    (tmp_path / "download.py").write_text(DOWNLOAD)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    commands = [[sys.executable, str(tmp_path / "download.py"), url, json.dumps(resources), str(ready / str(i)),
                 f"data.root={root}"] for i in range(N)]
    try:
        results = start_all(commands, cwd=ROOT, env=env)
    finally:
        server.shutdown()
    for process, out, err in results:
        assert process.returncode == 0, err
        assert "mnist: 512 training and 256 test images, checked (sha256 sums match" in out
    assert sorted(fetches) == sorted(f"/{f}.gz" for f in datafiles.FILES)  # once each, by one process
    shown = [err for _, _, err in results if DOWNLOADED.search(err)]  # torchvision's download progress, per file
    assert len(shown) == 1 and len(DOWNLOADED.findall(shown[0])) >= len(datafiles.FILES)
    if "100.0%" in shown[0]:  # torch's own progress line (tqdm's bar, where installed, may skip them)
        assert re.search(r"\b[1-9][0-9]?\.[0-9]%", shown[0])  # and the figures on the way
    raw = datafiles.raw_folder(root, "mnist")
    assert_whole(raw, source)


def test_verify_names_a_file_changed_after_download_and_copy_repairs_it(tmp_path):
    source, root = gz_source(tmp_path), tmp_path / "data"
    datafiles.copy_from(source, root, "fashion_mnist")
    images = datafiles.raw_folder(root, "fashion_mnist") / "train-images-idx3-ubyte"
    with open(images, "r+b") as f:  # one pixel of one image: still a well-formed IDX file
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    datafiles.check_on_login_node(root, "fashion_mnist")  # the cheap check does not hash

    result = run(["verify", "data=fashion_mnist", f"data.root={root}"], ROOT, module="mnist.data")
    assert result.returncode == 2, result.stderr
    assert f"{images} changed since" in result.stderr
    assert "python -m mnist.data download data=fashion_mnist" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1

    assert datafiles.copy_from(source, root, "fashion_mnist") == {"train": 512, "test": 256}
    assert datafiles.verify(root, "fashion_mnist") == ({"train": 512, "test": 256}, True)


def test_a_truncated_gz_is_reported_not_crashed_on(tmp_path):
    root = tmp_path / "data"
    raw = gzip_only(write_dataset(root, "MNIST"))
    gz = raw / "train-images-idx3-ubyte.gz"
    with open(gz, "r+b") as f:
        f.truncate(gz.stat().st_size // 2)

    with pytest.raises(DataError) as error:
        datafiles.check_on_login_node(root, "mnist")
    assert str(gz) in str(error.value) and "(truncated or corrupt)" in str(error.value)
    assert "make data DATA=mnist" in str(error.value)

    result = run(["verify", f"data.root={root}"], ROOT, module="mnist.data")
    assert result.returncode == 2, result.stderr
    assert f"{gz} is corrupt" in result.stderr and "python -m mnist.data download data=mnist" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in raw.iterdir() if not p.name.endswith(".gz")] == []  # no half-written file

    gz.write_bytes(gzip.compress(bytes(100))[:10] + b"\xff" * 40)  # a gzip header, then garbage
    with pytest.raises(DataError, match="is corrupt"):
        datafiles.prepare(root, "mnist")


def test_the_login_node_check_names_the_command_without_torch(tmp_path):
    root = tmp_path / "data"
    raw = write_dataset(root, "MNIST")
    check = ("import sys; from mnist import datafiles; datafiles.check_on_login_node(sys.argv[1], 'mnist'); "
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", check, str(root)], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr
    gzip_only(raw)
    datafiles.check_on_login_node(root, "mnist")

    with open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:  # a whole gzip file, of 255 labels for 256 images
        f.write(gzip.compress(b"\x00\x00\x08\x01" + (255).to_bytes(4, "big") + bytes(255)))
    with pytest.raises(DataError, match="256 images but .* holds 255 labels") as error:
        datafiles.check_on_login_node(root, "mnist")
    assert "python -m mnist.data download data=mnist" in str(error.value)

    for f in raw.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=f"not in {raw}: missing train-images-idx3-ubyte") as error:
        datafiles.check_on_login_node(root, "mnist")
    assert "Jobs never download" in str(error.value) and "make data DATA=mnist" in str(error.value)


def test_the_login_node_check_accepts_debians_gzipped_fashion_mnist(tmp_path):
    if not FASHION_MNIST_DEB.exists():
        pytest.skip(f"{FASHION_MNIST_DEB} is missing (apt-get install dataset-fashion-mnist)")
    raw = datafiles.raw_folder(tmp_path, "fashion_mnist")
    raw.mkdir(parents=True)
    for f in datafiles.FILES:
        (raw / f"{f}.gz").symlink_to(FASHION_MNIST_DEB / f"{f}.gz")
    datafiles.check_on_login_node(tmp_path, "fashion_mnist")


def test_a_slurm_job_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    with pytest.raises(DataError) as error:
        ensure_dataset(compose([f"data.root={tmp_path}", "data.download=true"]).data)
    assert "Jobs never download" in str(error.value) and "python -m mnist.data download data=mnist" in str(error.value)
    assert not (tmp_path / ".MNIST.lock").exists()  # it did not even try
