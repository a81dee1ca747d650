"""mnist/private_apis.py against the installed Hydra and submitit.

Each test holds one private call to what this project relies on it doing, mostly by comparing it
with Hydra's or submitit's public way to the same result. A failure after an upgrade says which
behaviour changed: adapt mnist/private_apis.py to it, or keep the version setup.cfg allows.
"""
import itertools
import os
import sys

import conftest
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

import mnist.run  # noqa: F401  its hydra.main sets version_base 1.3, as on the submit path
from mnist import config, private_apis
from mnist.launch import slurm

OVERRIDES = ["model=cnn", "optimizer=sgd", "trainer.seed=7", "optimizer.lr=0.5"]
CHANGED = "changed in this Hydra/submitit version; adapt mnist/private_apis.py or keep the version setup.cfg allows"


@pytest.fixture
def hydra():
    hydra = private_apis.create_hydra(str(config.CONF_DIR), task_name="run")
    yield hydra
    GlobalHydra.instance().clear()


def public_compose(overrides):
    """Hydra's public compose API: the reference the private calls are held to."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3", job_name="run"):
        return compose("config", overrides, return_hydra_config=True)


def yaml(cfg):
    return OmegaConf.to_yaml(cfg)


def parse(hydra, overrides):
    return OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(overrides)


# -- Hydra: mnist/run.py's fast submit path ------------------------------------------------------

def test_composing_through_hydras_object_gives_the_public_compose_config(hydra):
    ours = private_apis.compose_run_config(hydra, "config", OVERRIDES)
    assert yaml(ours) == yaml(public_compose(OVERRIDES)), (
        f"Hydra.compose_config (dry runs of `launcher=slurm`) no longer composes as hydra.compose does: {CHANGED}")


def test_run_job_runs_the_task_once_in_its_run_folder_with_hydras_record(hydra, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    run_dir = tmp_path / "run"
    seen = []

    def task(cfg):
        seen.append((cfg, HydraConfig.get().runtime.output_dir))
        return "submitted"

    result = private_apis.run_job(hydra, "config", [*OVERRIDES, f"hydra.run.dir={run_dir}", "hydra.mode=RUN"], task)
    expected = public_compose(OVERRIDES)
    with open_dict(expected):
        del expected["hydra"]
    message = f"Hydra.run (every `launcher=slurm` submission) {CHANGED}"
    assert result.return_value == "submitted" and len(seen) == 1, message
    task_cfg, output_dir = seen[0]
    assert yaml(task_cfg) == yaml(expected), f"the task's config: {message}"
    assert output_dir == str(run_dir), f"HydraConfig's runtime.output_dir: {message}"
    record = run_dir / ".hydra"
    assert sorted(os.listdir(record)) == ["config.yaml", "hydra.yaml", "overrides.yaml"], f".hydra/: {message}"
    assert list(OmegaConf.load(record / "overrides.yaml")) == OVERRIDES, f".hydra/overrides.yaml: {message}"


def test_run_and_report_passes_results_and_our_exit_status_and_reports_hydras_errors_without_traceback(
        capsys, monkeypatch):
    if sys.gettrace() is not None:
        pytest.skip("under a tracer (debugger, coverage) Hydra re-raises instead of reporting")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    message = f"hydra._internal.utils.run_and_report {CHANGED}"
    assert private_apis.run_and_report(lambda: 42) == 42, message

    def exit_2():
        sys.exit(2)  # config.report_errors' status for a bad input

    with pytest.raises(SystemExit) as exited:
        private_apis.run_and_report(exit_2)
    assert exited.value.code == 2, f"our exit status 2 no longer reaches the shell: {message}"

    def bad_override():
        raise ConfigCompositionException("Could not override 'trainer.epoch'.")

    with pytest.raises(SystemExit) as exited:
        private_apis.run_and_report(bad_override)
    assert exited.value.code == 1, f"a Hydra error no longer exits with status 1: {message}"
    report = capsys.readouterr().err
    assert report.startswith("Could not override 'trainer.epoch'.\n") and "Traceback" not in report, (
        f"a Hydra error's report: {message}")


# -- Hydra: the sweep plugin (hydra_plugins/mnist_slurm_launcher) --------------------------------

def test_applying_value_overrides_gives_the_config_hydra_composes_with_them(hydra):
    values = ["optimizer.lr=0.5", "trainer.seed=3", "model.activations=[tanh]", "data.root=/elsewhere"]
    cfg = public_compose(["model=mlp"])
    private_apis.apply_value_overrides(parse(hydra, values), cfg)
    composed = public_compose(["model=mlp", *values])
    for run in (cfg, composed):  # hydra.overrides, which compose_runs records itself
        with open_dict(run):
            del run["hydra"]
    assert yaml(cfg) == yaml(composed), f"ConfigLoaderImpl._apply_overrides_to_config (each run of a sweep) {CHANGED}"


def test_applying_an_override_of_a_key_the_config_lacks_fails_as_composing_does(hydra):
    cfg = public_compose([])
    with pytest.raises(ConfigCompositionException):
        public_compose(["trainer.epoch=3"])
    with pytest.raises(ConfigCompositionException):  # else a typo in a sweep would add a key silently
        private_apis.apply_value_overrides(parse(hydra, ["trainer.epoch=3"]), cfg)


def test_override_dirname_is_the_one_hydra_records(hydra):
    overrides = ["optimizer=sgd", "trainer.seed=3", "optimizer.lr=0.5"]
    recorded = public_compose([*overrides, "hydra.job.config.override_dirname.exclude_keys=[trainer.seed]",
                               "hydra.job.config.override_dirname.kv_sep=:",
                               "hydra.job.config.override_dirname.item_sep=_"]).hydra.job.override_dirname
    ours = private_apis.override_dirname(parse(hydra, overrides), ["trainer.seed"], item_sep="_", kv_sep=":")
    assert ours == recorded == "optimizer.lr:0.5_optimizer:sgd", f"get_overrides_dirname {CHANGED}"


def test_config_groups_are_told_from_keys(hydra):
    for name in ("model", "optimizer", "data", "resources", "launcher", "hydra/launcher"):
        assert private_apis.is_config_group(hydra.config_loader, name), f"{name}: repository.group_exists {CHANGED}"
    for name in ("trainer", "trainer.seed", "optimizer.lr", "model.hidden", "dry_run"):
        assert not private_apis.is_config_group(hydra.config_loader, name), f"{name}: repository.group_exists {CHANGED}"


def test_the_sweeper_hands_the_launcher_every_combination_without_composing_them_first(hydra, tmp_path, monkeypatch):
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode

    from hydra_plugins.mnist_slurm_launcher.mnist_slurm_launcher import MnistSlurmSweeper

    loader = hydra.config_loader
    master = loader.load_configuration("config", ["hydra.mode=MULTIRUN", "launcher=slurm",
                                                  f"hydra.sweep.dir={tmp_path}"], RunMode.MULTIRUN)
    context = HydraContext(config_loader=loader, callbacks=None)
    sweeper = Plugins.instance().instantiate_sweeper(hydra_context=context, task_function=None, config=master)
    assert isinstance(sweeper, MnistSlurmSweeper)

    class Recorder:
        batches = []

        def launch(self, job_overrides, initial_job_idx):
            self.batches.append((initial_job_idx, [list(o) for o in job_overrides]))
            return []

    def composing(*args, **kwargs):
        raise AssertionError(f"BasicSweeper composed the runs before launching (a sweep twice as slow): {CHANGED}")

    sweeper.launcher = Recorder()
    monkeypatch.setattr(loader, "load_sweep_config", composing)
    sweeper.sweep(["trainer.seed=1,2", "model=mlp,cnn"])
    expected = [[f"trainer.seed={seed}", f"model={model}"] for seed, model in itertools.product((1, 2), ("mlp", "cnn"))]
    assert Recorder.batches == [(0, expected)], f"BasicSweeper's split of `a,b` overrides into runs {CHANGED}"


def test_a_dry_run_sweep_loops_as_hydras_sweeper_does_less_its_record(hydra, tmp_path):
    """private_apis.sweep_without_record is BasicSweeper.sweep's loop without multirun.yaml: Hydra's loop must
    still be the one it copies, and the copy must hand the launcher the same batches."""
    import inspect

    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode

    basic_sweeper, _ = private_apis.basic_sweeper_classes()
    hydras = inspect.getsource(basic_sweeper.sweep)
    for step in ("self._parse_config()", "parse_overrides(", "self.split_arguments(", "self.max_batch_size",
                 "while not self.is_done()", "self.get_job_batch()", "initial_job_idx=initial_job_idx",
                 "multirun.yaml"):
        assert step in hydras, f"BasicSweeper.sweep no longer has `{step}`: its loop {CHANGED}"

    master = hydra.config_loader.load_configuration(
        "config", ["hydra.mode=MULTIRUN", "launcher=slurm", "dry_run=true", "hydra.sweeper.max_batch_size=3",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}"], RunMode.MULTIRUN)
    sweeper = Plugins.instance().instantiate_sweeper(
        hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=None), task_function=None,
        config=master)

    class Recorder:
        def launch(self, job_overrides, initial_job_idx):
            return (initial_job_idx, [list(o) for o in job_overrides])

    sweeper.launcher = Recorder()
    batches = sweeper.sweep(["trainer.seed=1,2", "model=mlp,cnn"])
    runs = [[f"trainer.seed={seed}", f"model={model}"] for seed, model in itertools.product((1, 2), ("mlp", "cnn"))]
    assert batches == [(0, runs[:3]), (3, runs[3:])]
    assert not (tmp_path / "sweep").exists(), "a dry run wrote the sweep's record"


def test_no_private_name_of_hydra_or_submitit_is_used_outside_private_apis():
    """No `hydra._internal` or `submitit.core._submit` import, and no `x._name` that is not the module's own,
    in mnist/ or hydra_plugins/, but in mnist/private_apis.py."""
    import ast

    root = conftest.ROOT
    found = []
    for path in sorted([*root.glob("mnist/**/*.py"), *root.glob("hydra_plugins/**/*.py")]):
        if path.name == "private_apis.py":
            continue
        tree = ast.parse(path.read_text())
        nodes = list(ast.walk(tree))
        own = {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        own |= {t.attr for n in nodes if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)}
        for n in nodes:
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__") \
                    and n.attr not in own | {"_replace", "_asdict", "_fields"}:  # (a NamedTuple's public API)
                found.append(f"{path.relative_to(root)}:{n.lineno} .{n.attr}")
            modules = ([n.module or ""] if isinstance(n, ast.ImportFrom) else
                       [a.name for a in n.names] if isinstance(n, ast.Import) else [])
            names = [a.name for a in n.names] if isinstance(n, ast.ImportFrom) else []
            for module in modules:
                parts = module.split(".")
                if parts[0] in ("hydra", "submitit") and any(p.startswith("_") for p in parts + names):
                    found.append(f"{path.relative_to(root)}:{n.lineno} import {module} {' '.join(names)}")
    assert not found, f"private names outside mnist/private_apis.py: {found}"


# -- submitit: the sbatch script a dry run prints (mnist/launch/slurm.py's render) ---------------

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`sbatch` that accepts any script as job 4242, and an `srun` for submitit to find."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": 'echo "Submitted batch job 4242"', "srun": "exit 0"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def slurm_config(tmp_path):
    return config.compose(["launcher=slurm", "model=cnn", f"launcher.log_dir={tmp_path / 'logs'}",
                           "launcher.setup=[module load cuda]", "+resources.extra={hold: true}"])


@pytest.mark.parametrize("array_size", [None, 3])
def test_the_dry_run_script_is_the_one_submitit_submits(fake_slurm, tmp_path, array_size):
    import submitit

    cfg = slurm_config(tmp_path)
    folder = slurm.submitit_folder(cfg)
    params = slurm.parameters(cfg, "cnn", array=array_size is not None)
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    if array_size is None:
        executor.submit(print, "run")
    else:
        with executor.batch():
            for i in range(array_size):
                executor.submit(print, i)
    [submitted] = [path.read_text() for path in (tmp_path / "logs" / "submitit").glob("4242/4242_submission.sh")]
    assert private_apis.sbatch_script(folder, params, array_size) == submitted, (
        f"submitit.slurm.slurm._make_sbatch_string (dry_run=true's script) no longer writes what SlurmExecutor "
        f"submits: {CHANGED}")


def test_the_sbatch_script_has_the_lines_our_jobs_rely_on(tmp_path):
    cfg = slurm_config(tmp_path)
    folder = slurm.submitit_folder(cfg)
    params = slurm.parameters(cfg, "cnn", array=True)
    lines = private_apis.sbatch_script(folder, params, array_size=20).splitlines()

    def has(line, why):
        assert line in lines, f"the sbatch script lacks `{line}` ({why}): _make_sbatch_string {CHANGED}"

    has("#SBATCH --job-name=cnn", "the job's name")
    has(f"#SBATCH --time={params['time']}", "the time limit in minutes")
    has(f"#SBATCH --signal=USR2@{params['signal_delay_s']}", "TrainJob checkpoints on USR2 before the time limit")
    has("#SBATCH --array=0-19%8", "a sweep is one array, launcher.array_parallelism tasks at once")
    has("#SBATCH --hold", "resources.extra's options")
    has("module load cuda", "launcher.setup's lines")
    srun = next((line for line in lines if line.startswith("srun ")), "")
    assert lines.index("module load cuda") < lines.index(srun), f"setup runs after srun: {CHANGED}"
    ours = srun.index(" ".join(params["srun_args"]))
    assert srun.index("--output") < ours, f"our srun --output/--error no longer come last (and win): {CHANGED}"
    assert srun.endswith(private_apis.submitit_command(folder)), f"srun's command: {CHANGED}"


def test_an_eager_process_starts_without_torch_dynamo_and_compile_still_finds_it():
    code = """
import sys, torch
from mnist import private_apis
private_apis.defer_dynamo()
model = torch.nn.Linear(3, 2)
optimizer = torch.optim.Adadelta(model.parameters())
model(torch.ones(1, 3)).sum().backward()
optimizer.step()
print(type(sys.modules["torch._dynamo"]).__name__)
import torch._dynamo.config
print(type(sys.modules["torch._dynamo"]).__name__, torch._dynamo.config.recompile_limit > 0)
"""
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["StandIn", "module", "True"], out.stderr  # else: CHANGED in this torch version


# -- submitit: its requeue signal and its result file ---------------------------------------------


def test_our_jobs_stop_on_the_signal_submitit_asks_slurm_for_and_requeues_on():
    from mnist.stopping import REQUEUE_SIGNAL

    assert private_apis.submitit_requeue_signal() == REQUEUE_SIGNAL, CHANGED


def test_a_submitit_preempt_signal_of_another_name_is_refused_before_submitting(tiny_data, tmp_path):
    result = conftest.run(["launcher=slurm", "dry_run=true", f"data.root={tiny_data}"], tmp_path,
                          env={"SUBMITIT_PREEMPT_SIGNAL": "USR1"})
    assert result.returncode == 2 and "SUBMITIT_PREEMPT_SIGNAL=USR1 is set" in result.stderr, result.stderr
    assert "Unset SUBMITIT_PREEMPT_SIGNAL" in result.stderr and "#SBATCH" not in result.stdout


def test_the_result_is_read_where_submitit_writes_it(tmp_path):
    import submitit

    executor = submitit.LocalExecutor(folder=tmp_path / "%j")
    job = executor.submit(sum, [1, 2])
    assert job.result() == 3
    assert private_apis.result_pickle(job.paths.folder, job.job_id) == job.paths.result_pickle, CHANGED
    assert private_apis.result_pickle(job.paths.folder, job.job_id).is_file(), CHANGED
