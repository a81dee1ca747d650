"""The login-node side, without a cluster: resources -> sbatch options, the rendered script,
quoting, the course's scripts, and that submitting never imports torch."""
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, copy_project, run

from mnist.config import compose
from mnist.launch import resources, scripts
from mnist.launch.resources import ResourceError, signal_delay
from mnist.launch.slurm import parameters, render


@pytest.mark.parametrize("text, seconds", [
    ("0:5:0", 300), ("0:15:0", 900), (90, 5400), ("90", 5400), ("1:30", 90), ("1-12", 129600),
    ("1-0:30", 88200), ("2-00:00:01", 172801)])
def test_slurm_time_formats(text, seconds):
    assert resources.time_seconds(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "0", "0:0:0", "1:2:3:4", "-5", "", True])
def test_bad_times_name_the_value_and_the_fix(text):
    with pytest.raises(ResourceError, match=r"resources.time=.*resources.time=0:15:0|no time at all"):
        resources.time_seconds(text)


@pytest.mark.parametrize("text, normal", [("3G", "3G"), ("3g", "3G"), (500, "500"), ("16000M", "16000M")])
def test_memory_sizes(text, normal):
    assert resources.memory(text) == normal


@pytest.mark.parametrize("text", ["3X", "3 GB", "1.5G", "0", "lots"])
def test_bad_memory_names_the_value_and_the_fix(text):
    with pytest.raises(ResourceError, match=r"resources.mem=.*e.g. resources.mem=3G"):
        resources.memory(text)


def test_cpu_resources_are_the_course_request():
    mlp = resources.sbatch_options(compose(["model=mlp"]).resources)
    assert mlp == {"time": 5, "cpus_per_task": 1, "mem": "3G", "nodes": 1, "ntasks_per_node": 1}
    assert resources.sbatch_options(compose(["model=cnn"]).resources)["time"] == 15


def test_every_request_can_be_overridden():
    cfg = compose(["launcher=slurm", "resources.partition=long", "resources.account=proj1", "resources.qos=high",
                   "resources.constraint=v100", "resources.time=2:00:00", "resources.nodes=2",
                   "resources.tasks_per_node=4", "+resources.extra.mail-type=END", "+resources.extra.exclusive=true"])
    script = render(cfg, parameters(cfg, "mlp"))
    for line in ["--partition=long", "--account=proj1", "--qos=high", "--constraint=v100", "--time=120",
                 "--nodes=2", "--ntasks-per-node=4", "--mail-type=END", "#SBATCH --exclusive\n", "--job-name=mlp"]:
        assert line in script


def test_the_script_writes_the_course_logs_and_activates_this_environment():
    cfg = compose(["launcher=slurm", "launcher.log_dir=/shared/logs", "launcher.setup=[module load cuda]"])
    script = render(cfg, parameters(cfg, "cnn"))
    assert "--output /shared/logs/%x_%j.out --error /shared/logs/%x_%j.err" in script
    assert f"source {sys.prefix}/bin/activate\nmodule load cuda\n" in script
    array = render(cfg, parameters(cfg, "cnn", array=True), array_size=20)
    assert "#SBATCH --array=0-19%8" in array and "/shared/logs/%x_%A_%a.out" in array


def test_signal_delay_fits_the_time_limit():
    cfg = compose(["launcher=slurm", "resources.time=1"])
    assert parameters(cfg, "mlp")["signal_delay_s"] == 15  # Slurm may send it 30 s early: not at the start
    assert "#SBATCH --signal=USR2@15" in render(cfg, parameters(cfg, "mlp"))
    assert signal_delay(90, 120) == 30 and signal_delay(90, 300) == 90 and signal_delay(90, 3600) == 90


def hydra_quote(text):
    """How a user writes an arbitrary string as a Hydra override value."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_values_that_reach_the_shell_are_quoted(tmp_path):
    nasty = "a b;$(touch PWNED) 'q' \"d\""
    cfg = compose(["launcher=slurm", f"launcher.log_dir={hydra_quote(str(tmp_path / nasty))}",
                   f"+resources.extra.comment={hydra_quote(nasty)}"])
    script = render(cfg, parameters(cfg, "mlp"))
    srun = [line for line in script.splitlines() if line.startswith("srun")][0]
    words = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + srun.removeprefix("srun ")],
                           capture_output=True, text=True, cwd=tmp_path).stdout.splitlines()
    assert f"{tmp_path / nasty}/%x_%j.out" in words  # one word, unexpanded
    comment = [line for line in script.splitlines() if line.startswith("#SBATCH --comment=")][0]
    value = subprocess.run(["bash", "-c", "printf %s " + comment.removeprefix("#SBATCH --comment=")],
                           capture_output=True, text=True, cwd=tmp_path).stdout
    assert value == nasty
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("override, message", [
    ("resources.partition='a b'", "has characters no Slurm partition name has"),
    ("+resources.extra={Bad_Key: 1}", "option name"),
    ("resources.cpus_per_task=0", "resources.cpus_per_task=0 is not a whole number >= 1"),
    ("resources.gpus_per_node=-1", "resources.gpus_per_node=-1"),
])
def test_bad_requests_are_refused_before_submitting(override, message):
    cfg = compose(["launcher=slurm", override])
    with pytest.raises(ResourceError, match=message):
        parameters(cfg, "mlp")


def test_committed_course_scripts_agree_with_conf():
    assert scripts.main(["--check"]) == 0, "run `make slurm-scripts`"
    mlp = (ROOT / "slurm" / "mlp.sh").read_text()
    for line in ["#SBATCH --time=0:5:0", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=3G",
                 "#SBATCH --output=%x_%j.out", "#SBATCH --error=%x_%j.err", "source .venv/bin/activate",
                 "python -u -m mnist.run model=mlp"]:
        assert line in mlp
    assert "#SBATCH --time=0:15:0" in (ROOT / "slurm" / "cnn.sh").read_text()


def test_a_changed_conf_fails_the_script_check_until_the_scripts_are_regenerated(tmp_path):
    project = copy_project(tmp_path / "clone")  # a clone of this checkout, so its conf/ and slurm/ may change
    cpu = project / "conf" / "resources" / "cpu.yaml"
    cpu.write_text(cpu.read_text().replace("mem: 3G", "mem: 4G"))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))}

    check = run(["--check"], project, env=env, module="mnist.launch.scripts")
    assert check.returncode == 1, check.stderr
    assert check.stderr == (f"{project / 'slurm' / 'mlp.sh'}, {project / 'slurm' / 'cnn.sh'} no longer agree with "
                            "conf/: run `make slurm-scripts` and commit them.\n")
    regenerate = run([], project, env=env, module="mnist.launch.scripts")  # what `make slurm-scripts` runs
    assert regenerate.returncode == 0, regenerate.stderr
    assert "#SBATCH --mem=4G" in (project / "slurm" / "mlp.sh").read_text()
    assert run(["--check"], project, env=env, module="mnist.launch.scripts").returncode == 0


SUBMIT_WITHOUT_TORCH = """
import sys
from mnist.run import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "torchvision", "numpy") if m in sys.modules)
print("HEAVY:", ",".join(heavy) or "none")
"""


def test_the_submit_path_never_imports_torch(tiny_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SUBMIT_WITHOUT_TORCH, "launcher=slurm", "dry_run=true", f"data.root={tiny_data}",
         "model=cnn"], capture_output=True, text=True, cwd=tmp_path)
    assert "#SBATCH --job-name=cnn" in result.stdout, result.stderr
    assert "HEAVY: none" in result.stdout


# -- the fast submit paths must do exactly what Hydra's own would --------------------------------

FULL_HYDRA_MAIN = """
import sys
import mnist.run
sys.argv = [sys.argv[0], *sys.argv[1:]]
mnist.run._run()  # hydra.main itself, as every command but `launcher=slurm` with overrides only takes
"""


def slurm_down(tmp_path):
    """PATH with Slurm's commands failing as they do when slurmctld is down, at once instead of after their
    retries (a SLURM_CONF naming no file costs sinfo's 20 s timeout per submission)."""
    bin_dir = tmp_path / "slurm-down"
    bin_dir.mkdir()
    for name in ("sinfo", "sbatch", "squeue"):
        (bin_dir / name).write_text(f"#!/bin/sh\necho '{name}: error: Unable to contact slurm controller "
                                    "(connect failure)' >&2\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_submitting_one_run_does_what_hydra_main_does(tiny_data, tmp_path):
    # Slurm down: the submission stops at its sinfo check, after Hydra wrote .hydra/ into the run folder
    # (which stays, as the user made it: a folder the command made itself would be removed again).
    args = ["launcher=slurm", f"data.root={tiny_data}", "model=cnn", "trainer.seed=7"]
    (tmp_path / "fast").mkdir(), (tmp_path / "full").mkdir()
    no_slurm = slurm_down(tmp_path)
    fast = run([*args, f"hydra.run.dir={tmp_path / 'fast'}"], cwd=tmp_path, env=no_slurm)
    full = subprocess.run([sys.executable, "-c", FULL_HYDRA_MAIN, *args, f"hydra.run.dir={tmp_path / 'full'}"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **no_slurm})
    assert fast.returncode == full.returncode == 2 and "sinfo" in fast.stderr, (fast.stderr, full.stderr)
    assert fast.stderr == full.stderr
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):  # Hydra's record of the run, to the letter
        written = [(tmp_path / folder / ".hydra" / name).read_text().replace(str(tmp_path / folder), "RUN")
                   for folder in ("fast", "full")]
        assert written[0] == written[1], name


def test_a_submission_that_fails_its_checks_leaves_no_run_folder(tiny_data, tmp_path):
    result = run(["launcher=slurm", f"data.root={tiny_data}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                 env=slurm_down(tmp_path))
    assert result.returncode == 2 and "sinfo" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_a_dry_run_prints_the_script_hydra_main_prints_and_makes_no_folder(tiny_data, tmp_path):
    args = ["launcher=slurm", "dry_run=true", f"data.root={tiny_data}", "model=cnn", "trainer.seed=7",
            f"hydra.run.dir={tmp_path / 'run'}"]
    fast = run(args, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no run folder, no logs/
    full = subprocess.run([sys.executable, "-c", FULL_HYDRA_MAIN, *args], capture_output=True, text=True, cwd=tmp_path)
    assert fast.returncode == full.returncode == 0, (fast.stderr, full.stderr)
    assert fast.stdout == full.stdout and fast.stdout.startswith("#!/bin/bash")


@pytest.mark.parametrize("sweep", [
    ["launcher=slurm", "trainer.seed=range(3)"],
    ["launcher=slurm", "model=mlp,cnn", "optimizer.lr=0.5,0.1", "dry_run=true", "+resources.extra.hold=true"],
    ["launcher=slurm", "trainer.seed=1,2", "trainer={seed: 5},{seed: 6}"],  # one key set twice: composed in full
    ["launcher=slurm", "optimizer=sgd,adam", "optimizer.lr=0.1,0.01",
     "hydra.job.config.override_dirname.exclude_keys=[optimizer.lr]"],
])
def test_a_sweep_composes_each_run_as_hydra_does(sweep):
    """compose_runs composes conf/ once per set of group choices; each run's config, hydra node
    included, must equal what Hydra's load_sweep_config composes for it."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from hydra_plugins.mnist_slurm_launcher.mnist_slurm_launcher import compose_runs
    from mnist.config import CONF_DIR
    from mnist.private_apis import basic_sweeper_classes

    BasicSweeper, _ = basic_sweeper_classes()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().hydra.config_loader
        master = loader.load_configuration("config", ["hydra.mode=MULTIRUN", *sweep], RunMode.MULTIRUN)
        parsed = OverridesParser.create(loader).parse_overrides(list(master.hydra.overrides.task))
        job_overrides = BasicSweeper.split_arguments(parsed, None)[0]
        ours = compose_runs(loader, master, job_overrides)
        hydras = [loader.load_sweep_config(master, list(overrides)) for overrides in job_overrides]
    assert len(ours) == len(job_overrides) > 1
    for overrides, mine, theirs in zip(job_overrides, ours, hydras):
        assert OmegaConf.to_yaml(mine) == OmegaConf.to_yaml(theirs), overrides
        assert OmegaConf.is_struct(mine) and not OmegaConf.is_readonly(mine.hydra)


def test_a_bad_value_in_a_sweep_is_named_before_anything_is_made(tiny_data, tmp_path):
    result = run(["-m", "launcher=slurm", "dry_run=true", f"data.root={tiny_data}", "optimizer.lr=0.5,0",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert result.returncode == 2 and "optimizer.lr=0 is not a positive number" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "#!/bin/bash" not in result.stdout


# -- what no node can hold, or what ranks and GPUs cannot pair, is refused before submitting -----------------

# make cluster-up's node, as sinfo -e lists it
CLUSTER_UP = resources.parse_sinfo([["debug*", "2", "22800", "gpu:1", "1"]])


@pytest.mark.parametrize("overrides, message", [
    (["resources=gpu", "resources.tasks_per_node=4"],
     "resources.tasks_per_node=4 with resources.gpus_per_node=1: each rank trains on a GPU of its own, so ranks "
     "would share a GPU and NCCL stops with \"Duplicate GPU detected\". Set resources.tasks_per_node=1"),
    (["resources=gpu", "resources.gpus_per_node=4"], "so 3 of the GPUs would sit idle. Set resources.tasks_per_node=4"),
    (["trainer.device=cuda"], "trainer.device=cuda, but the job asks Slurm for no GPU (resources.gpus_per_node=0)"),
])
def test_ranks_and_gpus_that_do_not_pair_are_refused(overrides, message):
    cfg = compose(["launcher=slurm", *overrides])
    with pytest.raises(ResourceError, match=re.escape(message)):
        resources.check_gpus(cfg.resources, cfg.trainer.device)


def test_the_readmes_gpu_example_fits_make_cluster_ups_node_of_two_cpus():
    for example in (["model=cnn", "resources=gpu"], ["model=cnn", "resources.tasks_per_node=2"]):
        resources.check_cluster(compose(["launcher=slurm", *example]).resources, CLUSTER_UP)


@pytest.mark.parametrize("overrides, fix", [
    (["resources=gpu", "resources.cpus_per_task=4"], "e.g. resources.cpus_per_task=2,"),
    (["resources.mem=64G"], "e.g. resources.mem=22800M,"),
    (["resources.nodes=2"], "e.g. resources.nodes=1,"),
    (["resources=gpu", "resources.tasks_per_node=2", "resources.gpus_per_node=2"],
     "e.g. resources.gpus_per_node=1 resources.tasks_per_node=1,"),
])
def test_a_request_no_node_can_hold_is_refused_naming_the_largest_node_and_the_fix(overrides, fix):
    with pytest.raises(ResourceError) as refused:
        resources.check_cluster(compose(["launcher=slurm", *overrides]).resources, CLUSTER_UP)
    assert "No node of partition debug can hold this job" in str(refused.value)
    assert "the largest with 2 CPUs, 22800M of memory and 1 GPU(s)" in str(refused.value) and fix in str(refused.value)


def test_sinfo_fields_with_types_sockets_and_several_partitions():
    nodes = resources.parse_sinfo([["gpu", "64", "512000", "gpu:a100:4(S:0-1),shard:8", "3"],
                                   ["cpu*", "128", "256000", "(null)", "40"]])
    assert [(n.partition, n.cpus, n.memory_mb, n.gpus, n.count, n.default) for n in nodes] == [
        ("gpu", 64, 512000, 4, 3, False), ("cpu", 128, 256000, 0, 40, True)]
    cfg = compose(["launcher=slurm", "resources=gpu", "resources.partition=gpu", "resources.nodes=3",
                   "resources.tasks_per_node=4", "resources.gpus_per_node=4", "resources.cpus_per_task=16"])
    resources.check_cluster(cfg.resources, nodes)  # 4 x 16 CPUs and 4 GPUs on each of the 3 GPU nodes: fits


FAKE_SLURM = """#!/bin/sh
echo "$0 $*" >> {calls}
case "$0" in *sinfo) echo 'debug*|2|22800|gpu:1|1';; esac
"""


def test_a_dry_run_sweep_asks_sinfo_once_and_is_refused_as_a_submission_would_be(tiny_data, tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name in ("sinfo", "sbatch"):
        (bin_dir / name).write_text(FAKE_SLURM.format(calls=calls))
        (bin_dir / name).chmod(0o755)
    result = run(["-m", "launcher=slurm", "dry_run=true", f"data.root={tiny_data}", "model=cnn",
                  "resources.cpus_per_task=1,4", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                 cwd=tmp_path, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 2 and "#!/bin/bash" not in result.stdout, result.stdout + result.stderr
    assert "No node of partition debug can hold this job" in result.stderr and "Traceback" not in result.stderr
    assert calls.read_text().splitlines() == [f"{bin_dir / 'sinfo'} -h -e -o %P|%c|%m|%G|%D"]
