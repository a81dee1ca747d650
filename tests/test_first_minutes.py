"""A newcomer's first minutes: `make run` downloads what is missing and trains; what goes wrong
(offline, a job, the course's script from the wrong folder, a `module load` that fails) says so
where the user looks, and a dry run leaves nothing behind.

Downloads are real, from a local HTTP server that torchvision's mirrors are pointed at (by a
sitecustomize.py on PYTHONPATH, so the command run is the one a user types).
"""
import functools
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import DOWNLOADED, ROOT, run, write_dataset
from test_slurm import wait_for

from mnist import datafiles

SITECUSTOMIZE = """
import json, os
if os.environ.get("TEST_MIRROR"):
    from torchvision import datasets
    datasets.MNIST.mirrors = [os.environ["TEST_MIRROR"]]
    datasets.MNIST.resources = [tuple(r) for r in json.loads(os.environ["TEST_RESOURCES"])]
"""


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, fetches, **kwargs):
        self.fetches = fetches
        super().__init__(*args, **kwargs)

    def do_GET(self):
        if self.headers.get("Method") != "HEAD":  # torchvision first probes for redirects with this header
            self.fetches.append(self.path)
        try:
            super().do_GET()
        except ConnectionError:  # torchvision's probe hangs up without reading
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def mirrored_files(tmp_path_factory):
    """The four gzipped IDX files the mirror serves (only read, so made once)."""
    base = tmp_path_factory.mktemp("mirror")
    raw, source = write_dataset(base / "made", "MNIST"), base / "files"
    source.mkdir()
    for f in datafiles.FILES:
        with open(raw / f, "rb") as src, gzip.open(source / f"{f}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return source


@pytest.fixture
def mirror(tmp_path, mirrored_files):
    """A local MNIST mirror: (environment that points torchvision at it, the files it served)."""
    source = mirrored_files
    fetches = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(source), fetches=fetches))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield mirror_env(tmp_path, f"http://127.0.0.1:{server.server_address[1]}/", source), fetches
    server.shutdown()


def mirror_env(tmp_path, url, source):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    resources = [(f"{f}.gz", hashlib.md5((source / f"{f}.gz").read_bytes()).hexdigest()) for f in datafiles.FILES]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "SLURM_JOB_ID"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "TEST_MIRROR": url, "TEST_RESOURCES": json.dumps(resources)}


def train(tmp_path, env, *args):
    """`python -m mnist.run` with data.root=<tmp_path>/data, which starts empty."""
    return subprocess.run([sys.executable, "-m", "mnist.run", f"data.root={tmp_path / 'data'}", "trainer.epochs=1",
                           f"hydra.run.dir={tmp_path / 'run'}", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_run_without_the_data_downloads_it_then_trains(tmp_path, mirror):
    env, fetches = mirror
    result = train(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "downloading it first (data.download=false turns this off)" in result.stderr
    assert len(DOWNLOADED.findall(result.stderr)) >= 4  # torchvision's progress, file by file
    assert "Test set: Average loss" in result.stdout
    assert sorted(fetches) == sorted(f"/{f}.gz" for f in datafiles.FILES)

    verify = run(["verify", f"data.root={tmp_path / 'data'}"], tmp_path, module="mnist.data")
    assert "512 training and 256 test images, checked (sha256 sums match" in verify.stdout, verify.stderr

    again = train(tmp_path, env, f"hydra.run.dir={tmp_path / 'run2'}")  # there now: no second download
    assert again.returncode == 0 and "downloading" not in again.stderr and len(fetches) == 4


@pytest.mark.parametrize("job, args, expected", [
    ({"SLURM_JOB_ID": "4242"}, [], "Jobs never download: on the login node, fetch it with "
                                   "`python -m mnist.data download data=mnist`"),
    ({}, ["data.download=false"], "`python -m mnist.data copy SOURCE_DIR data=mnist`, or point data.root"),
])
def test_a_job_or_download_false_never_downloads(tmp_path, mirror, job, args, expected):
    env, fetches = mirror
    result = train(tmp_path, {**env, **job}, *args)
    assert result.returncode == 2 and fetches == []
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "data").exists()


def test_offline_the_run_and_the_download_name_the_fix_and_leave_no_lock(tmp_path, mirror):
    env, _ = mirror
    with socket.socket() as s:  # a port nothing listens on: like no network
        s.bind(("127.0.0.1", 0))
        env = {**env, "TEST_MIRROR": f"http://127.0.0.1:{s.getsockname()[1]}/"}
    for command in (["mnist.run", f"data.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
                    ["mnist.data", "download", f"data.root={tmp_path / 'data'}"]):
        result = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: Downloading mnist into {tmp_path / 'data'} failed (")
        assert "Connection refused" in error and "`python -m mnist.data download data=mnist`" in error
        assert "`python -m mnist.data copy SOURCE_DIR data=mnist`" in error and "Traceback" not in result.stderr
        assert list((tmp_path / "data").iterdir()) == []  # no .MNIST.lock, no staging folder


def test_a_writer_that_waited_on_a_failed_one_still_keeps_the_next_one_out(tmp_path):
    order, inside, release = [], threading.Event(), threading.Event()

    def writer(name, hold=None):
        with datafiles.writing(tmp_path, "mnist"):
            order.append(name)
            inside.set()
            if hold:
                hold.wait(10)
            order.append(f"{name} done")

    second = threading.Thread(target=writer, args=("second", release))
    with pytest.raises(RuntimeError):
        with datafiles.writing(tmp_path, "mnist"):
            second.start()
            time.sleep(0.5)  # the second writer now waits on this one's lock file
            raise RuntimeError("the download failed")
    assert inside.wait(10)
    third = threading.Thread(target=writer, args=("third",))
    third.start()
    time.sleep(0.5)  # the third writer, come after the lock file was removed, must wait for the second
    release.set()
    second.join(10), third.join(10)
    assert order == ["second", "second done", "third", "third done"]
    assert (tmp_path / ".MNIST.lock").exists()  # writers that succeed keep it


def test_a_sweeps_dry_run_leaves_no_folder(tiny_data, tmp_path):
    (tmp_path / "cwd").mkdir()
    result = run(["-m", "launcher=slurm", "dry_run=true", "trainer.seed=1,2", f"data.root={tiny_data}"],
                 tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert "#!/bin/bash" in result.stdout and "#SBATCH --array=0-1%2" in result.stdout
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.slurm
def test_the_course_script_from_another_folder_says_where_to_run_it(slurm_env, tiny_data, tmp_path):
    out = subprocess.run(["sbatch", str(ROOT / "slurm" / "mlp.sh"), f"data.root={tiny_data}"], cwd=tmp_path,
                         capture_output=True, text=True)
    job_id = re.search(r"\d+", out.stdout).group(0)
    assert wait_for(job_id) == {job_id: "FAILED"}
    assert (tmp_path / f"mlp_{job_id}.err").read_text() == (
        "error: run `sbatch slurm/mlp.sh` from the repository root (your mnist-slurm clone, the folder that "
        f"holds mnist/ and .venv/), not from {tmp_path}: cd there first.\n")


@pytest.mark.slurm
def test_the_setup_lines_print_into_the_jobs_own_logs(slurm_env, tiny_data, tmp_path):
    logs = tmp_path / "logs"
    result = run(["launcher=slurm", f"data.root={tiny_data}", f"launcher.log_dir={logs}", "resources.mem=2G",
                  "trainer.epochs=1", "launcher.setup=[echo setting up, module load cuda]"], tmp_path)
    job_id = re.search(r"Submitted job (\d+)", result.stdout).group(1)
    assert wait_for(job_id) == {job_id: "COMPLETED"}
    out, err = (logs / f"mlp_{job_id}.out").read_text(), (logs / f"mlp_{job_id}.err").read_text()
    assert out.startswith("setting up\n") and "Test set: Average loss" in out
    assert "module: command not found" in err


def test_make_install_takes_the_torch_build_for_an_older_driver_from_pytorchs_index():
    plan = subprocess.run(["make", "-n", "install", "TORCH_CUDA=cu126"], cwd=ROOT, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    pins = re.search(r"^\s*torch==(\S+)$", (ROOT / "setup.cfg").read_text(), re.M).group(1)
    assert (f"pip install --quiet torch=={pins}+cu126 torchvision==" in plan.stdout
            and "--index-url https://download.pytorch.org/whl/cu126" in plan.stdout), plan.stdout
    default = subprocess.run(["make", "-n", "install"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "download.pytorch.org" not in default  # without TORCH_CUDA: PyPI's build, as setup.cfg pins it
