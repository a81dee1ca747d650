"""A battery of bad inputs, each run through `python -m mnist.run` as a user types it.

Every case must end with exit status 2 and ONE line on stderr (no traceback, no Hydra
"HYDRA_FULL_ERROR" hint) that names the bad value and says how to fix it; it must leave no
half-written file (`.*.tmp`) and lose nothing that was on disk before: a run folder it is
pointed at keeps config.yaml, metrics.csv, checkpoint.pt, train.log (and environment.json)
byte for byte, and the data it read is untouched.

Config and resource errors fail before torch is imported (well under a second each); data,
checkpoint and some environment cases import torch (a few seconds each).
"""
import gzip
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, copy_project, run, write_dataset

N_TRAIN, N_TEST = 128, 64
RUN_FILES = ("config.yaml", "metrics.csv", "checkpoint.pt", "train.log", "environment.json")
VENV_BIN = ROOT / ".venv" / "bin"


# -- fixtures shared by the module: good data, and run folders with a finished epoch ------------

@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    """A small, whole MNIST-format data.root; cases copy it before damaging it."""
    root = tmp_path_factory.mktemp("good") / "data"
    write_dataset(root, "MNIST", n_train=N_TRAIN, n_test=N_TEST)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, good_data):
    """{model name: run folder} after one epoch of mlp and of mlp_deep (one sweep, one process)."""
    sweep = tmp_path_factory.mktemp("trained")
    result = run(["-m", "model=mlp,mlp_deep", "trainer.epochs=1", f"data.root={good_data}",
                  f"hydra.sweep.dir={sweep}"], cwd=sweep)
    assert result.returncode == 0, result.stderr
    folders = {yaml.safe_load((folder / "config.yaml").read_text())["model"]["name"]: folder
               for folder in sweep.iterdir() if (folder / "checkpoint.pt").exists()}
    assert set(folders) == {"mlp", "mlp_deep"}, folders
    return folders


# -- making things unwritable, for root too -------------------------------------------------------

def read_only(folder):
    os.chmod(folder, 0o555)
    if os.geteuid() == 0:  # root writes through permissions, not through the immutable flag
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            os.chmod(folder, 0o755)
            pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")


def writable(folder):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    os.chmod(folder, 0o755)


# -- the context a case sets up -------------------------------------------------------------------

class Setup:
    """What a case's setup may change: the data.root, the run folder, the environment, and
    folders to make writable again afterwards."""

    def __init__(self, tmp, good_data, request):
        self.tmp, self.good_data, self.request = tmp, good_data, request
        self.data = good_data
        self.run_dir = tmp / "run"
        self.env = {}
        self.locked = []
        self.processes = []

    def damaged_data(self):
        """A copy of the good data to damage; returns its raw folder."""
        self.data = self.tmp / "data"
        shutil.copytree(self.good_data, self.data)
        return self.data / "MNIST" / "raw"

    def existing_run(self, model="mlp"):
        """A copy of a run folder holding a finished epoch of `model`; returns it."""
        shutil.copytree(self.request.getfixturevalue("trained")[model], self.run_dir)
        return self.run_dir

    def lock(self, folder):
        read_only(folder)
        self.locked.append(folder)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def patch_bytes(path, offset, new):
    data = bytearray(path.read_bytes())
    data[offset:offset + len(new)] = new
    path.write_bytes(bytes(data))


def write_labels(path, labels):
    from mnist.idx import write_idx

    write_idx(path, bytes(labels), (len(labels),))


def gzip_only(raw):
    from mnist.datafiles import FILES

    for f in FILES:
        with open(raw / f, "rb") as src, gzip.open(raw / f"{f}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw / f)


def no_data(s):
    s.data = s.tmp / "nowhere"
    s.data.mkdir()


def truncated_images(s):
    truncate(s.damaged_data() / "train-images-idx3-ubyte", 1000)


def wrong_magic(s):
    patch_bytes(s.damaged_data() / "t10k-images-idx3-ubyte", 0, b"\x12\x34")


def fewer_labels(s):
    write_labels(s.damaged_data() / "train-labels-idx1-ubyte", [1] * (N_TRAIN - 28))


def label_over_9(s):
    write_labels(s.damaged_data() / "t10k-labels-idx1-ubyte", [3] * (N_TEST - 1) + [12])


def truncated_checkpoint(s):
    path = s.existing_run() / "checkpoint.pt"
    truncate(path, path.stat().st_size // 2)


def random_checkpoint(s):
    (s.existing_run() / "checkpoint.pt").write_bytes(random.Random(0).randbytes(4096))


def checkpoint_of_another_model(s):  # mlp_deep's checkpoint copied into an mlp run folder
    shutil.copyfile(s.request.getfixturevalue("trained")["mlp_deep"] / "checkpoint.pt",
                    s.existing_run("mlp") / "checkpoint.pt")


def existing_run(s):
    s.existing_run()


def damaged_config(s):
    (s.existing_run() / "config.yaml").write_text("model: {name: mlp\ntrainer: [\n")


def config_of_no_run(s):
    (s.existing_run() / "config.yaml").write_text("- just\n- a list\n")


HOLD = ("import sys, time; from mnist import rundir\n"
        "with rundir.lock(sys.argv[1], '4242'): print('held', flush=True); time.sleep(120)")


def held_by_a_job(s):
    """Another process (Slurm job 4242, say) trains into the run folder right now."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(s.existing_run())], stdout=subprocess.PIPE, text=True)
    s.processes.append(holder)
    assert holder.stdout.readline().strip() == "held"


def no_sbatch(s):
    s.env["PATH"] = str(VENV_BIN)


def data_file_without_registry_entry(s):
    """A clone whose conf/data/ offers kmnist, which mnist/registry.py's DATASETS does not list."""
    project = copy_project(s.tmp / "clone")
    (project / "conf" / "data" / "kmnist.yaml").write_text(
        (project / "conf" / "data" / "mnist.yaml").read_text().replace("name: mnist", "name: kmnist"))
    s.env["PYTHONPATH"] = str(project)


def unwritable_data_root(s):
    raw = s.damaged_data()
    gzip_only(raw)
    s.lock(raw)


def unwritable_run_dir_parent(s):
    parent = s.tmp / "locked"
    parent.mkdir()
    s.run_dir = parent / "run"
    s.lock(parent)


# -- the cases ------------------------------------------------------------------------------------

def case(id, args, expect, setup=None, marks=()):
    """One test id. Unless `args` name data.root or a hydra.* folder, the test adds the case's
    data.root and run folder (hydra.run.dir, or hydra.sweep.dir for a -m sweep)."""
    return pytest.param(args, expect, setup, id=id, marks=marks)


SLURM_DRY = ["launcher=slurm", "dry_run=true"]

CASES = [
    # configs: types, ranges, unknown keys, unknown group options
    case("config-epochs-string", ["trainer.epochs=three"], ["trainer.epochs='three'", "trainer.epochs=3"]),
    case("config-epochs-zero", ["trainer.epochs=0"],
         ["trainer.epochs=0 is not a positive integer", "trainer.epochs=3"]),
    case("config-batch-size-negative", ["data.batch_size=-64"], ["data.batch_size=-64", "data.batch_size=64"]),
    case("config-test-batch-size-float", ["data.test_batch_size=1.5"],
         ["data.test_batch_size=1.5 is not a positive integer", "data.test_batch_size=1000"]),
    case("config-lr-zero", ["optimizer.lr=0"], ["optimizer.lr=0 is not a positive number", "optimizer.lr=1.0"]),
    case("config-lr-negative", ["optimizer=sgd", "optimizer.lr=-0.01"], ["optimizer.lr=-0.01", "optimizer.lr=0.01"]),
    case("config-unknown-key", ["trainer.epoch=3"],
         ["Unknown key `trainer.epoch`", "trainer has no key 'epoch'", "Did you mean `trainer.epochs=3`?"]),
    case("config-unknown-top-level-key", ["epochs=3"], ["Unknown key `epochs`", "trainer"]),
    case("config-unknown-model", ["model=resnet"], ["Unknown model 'resnet'", "cnn, mlp", "model=cnn"]),
    case("config-unknown-optimizer", ["optimizer=lion"], ["Unknown optimizer 'lion'", "adam", "optimizer=adadelta"]),
    case("config-unknown-data", ["data=cifar10"], ["Unknown data 'cifar10'", "fashion_mnist, mnist"]),
    case("config-unknown-model-in-sweep", ["-m", "model=mlp,vit"], ["Unknown model 'vit'", "model=cnn"]),
    case("config-bad-device", ["trainer.device=tpu"],
         ["trainer.device='tpu'", "auto, cpu, cuda", "trainer.device=cpu"]),
    case("config-bad-activation", ["model.activations=[swish]"],
         ["'swish'", "relu, sigmoid", "model.activations=[relu]"]),
    case("config-hidden-activations-mismatch", ["model.hidden=[128,64]"],
         ["model.hidden=[128, 64] has 2 layers", "names 1", "one activation per hidden layer"]),
    case("config-shuffle-not-bool", ["data.shuffle=maybe"], ["data.shuffle='maybe'", "data.shuffle=true"]),
    case("config-download-not-auto-or-bool", ["data.download=sometimes"],
         ["data.download='sometimes' is not auto, true or false", "data.download=auto", "data.download=false"]),
    case("config-bad-output", ["model.output=relu"], ["model.output='relu'", "model.output=log_softmax"]),
    case("config-data-file-without-registry-entry", ["data=kmnist"],
         ["data.name=kmnist (conf/data/kmnist.yaml) is no dataset mnist/registry.py's DATASETS lists",
          "Add a line `\"kmnist\": ", "fashion_mnist"], data_file_without_registry_entry),
    case("config-model-option-its-class-lacks", ["model=cnn", "+model.hidden=[64]"],
         ["model.hidden is no option of model.arch=cnn", "mnist.cnn.CNN takes output"]),
    case("config-moved-key-model-time", ["model.time=0:7:0"],
         ["model.time has moved", "Write `resources.time=0:7:0` instead"]),
    case("config-bad-value-into-existing-run", ["trainer.epochs=-1"], ["trainer.epochs=-1", "trainer.epochs=3"],
         existing_run),

    # resources, checked by `launcher=slurm dry_run=true` (no cluster needed)
    case("resources-time-in-words", [*SLURM_DRY, "resources.time='5 minutes'"],
         ["resources.time='5 minutes' is not a Slurm time limit", "resources.time=0:15:0"]),
    case("resources-time-zero", [*SLURM_DRY, "resources.time=0"], ["resources.time=0", "resources.time=0:15:0"]),
    case("resources-mem-unit", [*SLURM_DRY, "resources.mem=3X"], ["resources.mem='3X'", "resources.mem=3G"]),
    case("resources-gpus-negative", [*SLURM_DRY, "resources.gpus_per_node=-1"],
         ["resources.gpus_per_node=-1 is not a whole number >= 0", "resources.gpus_per_node=1"]),
    case("resources-cpus-zero", [*SLURM_DRY, "resources.cpus_per_task=0"],
         ["resources.cpus_per_task=0 is not a whole number >= 1", "resources.cpus_per_task=1"]),
    case("resources-nodes-zero", [*SLURM_DRY, "resources.nodes=0"], ["resources.nodes=0", "resources.nodes=1"]),
    case("resources-partition-with-space", [*SLURM_DRY, "resources.partition='gpu long'"],
         ["resources.partition='gpu long' has characters", "sinfo", "resources.partition=null"]),
    case("resources-extra-option-name", [*SLURM_DRY, "+resources.extra={--Mail-Type: END}"],
         ["option name '--Mail-Type'", "'+resources.extra={mail-type: END}'"]),
    case("resources-extra-without-plus", [*SLURM_DRY, "resources.extra.mail-type=END"],
         ["Unknown key `resources.extra.mail-type`", "`+resources.extra.mail-type=END`"]),

    # data
    case("data-missing", ["data.download=false"], ["The mnist dataset is not in", "missing train-images-idx3-ubyte",
                                                   "python -m mnist.data download data=mnist"], no_data),
    case("data-missing-before-submitting", SLURM_DRY, ["The mnist dataset is not in",
                                                       "python -m mnist.data download data=mnist"], no_data),
    case("data-truncated-images", [], ["train-images-idx3-ubyte is 1000 bytes", "truncated", "Delete the bad file",
                                       "python -m mnist.data download data=mnist"], truncated_images),
    case("data-wrong-magic-number", [], ["t10k-images-idx3-ubyte is not an IDX file (magic number 12340803)",
                                         "Delete the bad file"], wrong_magic),
    case("data-fewer-labels-than-images", [], [f"holds {N_TRAIN} images but", f"holds {N_TRAIN - 28} labels",
                                               "Delete the bad file"], fewer_labels),
    case("data-label-over-9", [], ["t10k-labels-idx1-ubyte holds label 12; MNIST labels are 0..9",
                                   "Delete the bad file"], label_over_9),

    # checkpoints in an existing run folder
    case("checkpoint-truncated", [], ["checkpoint.pt is not a readable checkpoint", "Move it away"],
         truncated_checkpoint),
    case("checkpoint-random-bytes-resuming-to-more-epochs", ["trainer.epochs=2"],
         ["checkpoint.pt is not a readable checkpoint", "Move it away"], random_checkpoint),
    case("checkpoint-of-another-model", [], ["holds a mlp_deep model", "model=mlp", "another run folder"],
         checkpoint_of_another_model),
    case("run-folder-config-damaged", [],
         ["config.yaml is damaged (line 2", ".hydra/config.yaml", "move the folder away"], damaged_config),
    case("run-folder-config-of-no-run", [], ["config.yaml is damaged", "no model, trainer and data"], config_of_no_run),
    case("run-folder-in-use", [], ["is in use: Slurm job 4242, process", "scancel 4242", "run this again to resume",
                                   "another folder"], held_by_a_job),
    case("run-folder-in-use-submitting", ["launcher=slurm"], ["is in use: Slurm job 4242", "scancel 4242"],
         held_by_a_job),
    case("checkpoint-rerun-as-another-model", ["model=cnn", "trainer.epochs=2"], ["'cnn'", "'mlp'", "another"],
         existing_run),

    # environment
    case("env-no-sbatch", ["launcher=slurm"], ["`sbatch`", "none on PATH", "launcher=local"], no_sbatch),
    case("env-unwritable-data-root", [], ["Cannot unpack", "Point data.root at a folder you can write",
                                          "gunzip -k"], unwritable_data_root),
    case("env-unwritable-run-dir-parent", [], ["locked/run", "hydra.run.dir"], unwritable_run_dir_parent),
]


def snapshot(*folders):
    return {p: p.read_bytes() for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("args, expect, setup", CASES)
def test_bad_input_is_one_paragraph_with_the_fix_and_loses_nothing(args, expect, setup, tmp_path, good_data,
                                                                   request):
    s = Setup(tmp_path, good_data, request)
    if setup is not None:
        setup(s)
    existed = s.run_dir.exists()
    before = snapshot(tmp_path, good_data)
    args = list(args)
    if not any(a.startswith("data.root=") for a in args):
        args.append(f"data.root={s.data}")
    if not any(a.startswith("hydra.") for a in args):
        args.append(f"hydra.sweep.dir={s.run_dir}" if "-m" in args else f"hydra.run.dir={s.run_dir}")
    try:
        result = run(args, cwd=tmp_path, env=s.env, timeout=120)
    finally:
        for folder in s.locked:
            writable(folder)
        for process in s.processes:
            process.kill()
            process.wait()

    # a non-zero exit, ours: 2
    assert result.returncode == 2, (result.returncode, result.stderr)
    # one paragraph, one line: no traceback, no Hydra hint
    message = result.stderr.strip()
    assert "Traceback" not in message and "HYDRA_FULL_ERROR" not in message, message
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error: "), message
    # names the bad value and the fix
    for phrase in expect:
        assert phrase in message, f"{phrase!r} not in: {message}"
    # no half-written file anywhere
    assert not [p for p in tmp_path.rglob(".*.tmp")], list(tmp_path.rglob(".*.tmp"))
    assert not list(good_data.rglob(".*.tmp"))
    # nothing that existed is lost or changed; Hydra's own .hydra/ record of the latest command, the
    # lock's record of its latest holder and usage.json's new attempt (the earlier ones kept) aside
    after = snapshot(tmp_path, good_data)
    for path, content in before.items():
        assert path in after, f"{path} is gone"
        if path.name == "usage.json":
            attempts = json.loads(content)["attempts"]
            assert json.loads(after[path])["attempts"][:len(attempts)] == attempts, f"{path} lost attempts"
        elif ".hydra" not in path.parts and path.name not in (".lock", ".usage.lock"):
            assert after[path] == content, f"{path} changed"
    if existed:
        for name in RUN_FILES:
            assert (s.run_dir / name).exists(), f"{name} is gone"
    else:  # a failed run leaves no checkpoint or metrics behind
        assert not (s.run_dir / "checkpoint.pt").exists() and not (s.run_dir / "metrics.csv").exists()
    # and nothing was submitted
    assert not (tmp_path / "logs" / "jobs.jsonl").exists()
