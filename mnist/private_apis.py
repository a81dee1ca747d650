"""Every call this project makes into Hydra's, submitit's and torch's private code, as thin named functions.

Hydra's `hydra._internal` and submitit's underscore names may change in any release, so they are
used only here; tests/test_private_apis.py checks that each still does what we rely on, and
setup.cfg caps hydra-core and submitit at the versions those tests passed with.

Imports are inside the functions: the login node's submit path imports this module, must stay
fast and never imports torch.
"""
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import signal
    from pathlib import Path

    from hydra._internal.hydra import Hydra
    from hydra.core.utils import JobReturn
    from omegaconf import DictConfig

# -- Hydra: what hydra.main does, one step at a time (mnist/run.py's fast submit path) ------------


def create_hydra(config_dir, task_name) -> "Hydra":
    """The Hydra object hydra.main creates for conf/ (search path with plugins), made the global one."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    return Hydra.create_main_hydra2(task_name=task_name, config_search_path=create_config_search_path(config_dir))


def run_and_report(function) -> Any:
    """function(), with an exception reported as hydra.main reports it: its message, exit status 1."""
    from hydra._internal.utils import run_and_report as hydras_run_and_report

    return hydras_run_and_report(function)


def run_job(hydra, config_name, overrides, task_function) -> "JobReturn":
    """hydra.main's run mode: compose, callbacks, the run folder with .hydra/, task_function(cfg)."""
    return hydra.run(config_name=config_name, task_function=task_function, overrides=overrides)


def compose_run_config(hydra, config_name, overrides) -> "DictConfig":
    """The config, hydra node included, that run_job would give the task; makes no folder."""
    from hydra.types import RunMode

    return hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN)


# -- Hydra: a sweep's runs (hydra_plugins/mnist_slurm_launcher) ---------------------------------


def apply_value_overrides(overrides, cfg) -> None:
    """Apply parsed `a.b.c=value` overrides to a composed config in place, as Hydra's composition does."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)


def override_dirname(overrides, exclude_keys, item_sep, kv_sep) -> str:
    """hydra.job.override_dirname for these parsed overrides."""
    from hydra._internal.config_loader_impl import get_overrides_dirname

    return get_overrides_dirname(overrides=overrides, exclude_keys=exclude_keys, item_sep=item_sep, kv_sep=kv_sep)


def is_config_group(config_loader, name) -> bool:
    """Whether `name` is a config group (conf/model/, hydra/launcher), not a key of the config."""
    return config_loader.repository.group_exists(name)


def basic_sweeper_classes() -> tuple[type, type]:
    """Hydra's basic sweeper (`a,b`, `range()`, hydra.sweeper.params) and its config, to subclass."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf

    return BasicSweeper, BasicSweeperConf


def sweep_without_record(sweeper, arguments) -> list:
    """BasicSweeper.sweep's loop (Hydra 1.3) less its record of the sweep, multirun.yaml, which it would write
    into a sweep folder it creates: a dry run writes nothing. (Its check that every run composes is left out
    as MnistSlurmSweeper leaves it out.) tests/test_private_apis.py fails if Hydra's loop changes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    overrides = parser.parse_overrides(sweeper._parse_config() + list(arguments))
    sweeper.overrides = sweeper.split_arguments(overrides, sweeper.max_batch_size)
    returns, initial_job_idx = [], 0
    while not sweeper.is_done():
        batch = sweeper.get_job_batch()
        returns.append(sweeper.launcher.launch(batch, initial_job_idx=initial_job_idx))
        initial_job_idx += len(batch)
    return returns


# -- submitit: the sbatch script, for dry_run=true (mnist/launch/slurm.py) -----------------------


def submitit_command(folder) -> str:
    """The command submitit's SlurmExecutor runs in its sbatch script: unpickle and run the job."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])


def sbatch_script(folder, parameters, array_size=None) -> str:
    """The sbatch script a SlurmExecutor(folder) with these parameters submits, byte for byte
    (array_size: for a job array of that many tasks, as `executor.batch()` submits it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    extra = {"map_count": array_size} if array_size else {}
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **parameters, **extra)


# -- submitit: its requeue signal and its files (mnist/launch/job.py, slurm.py, record.py) ---------


def submitit_requeue_signal() -> "signal.Signals":
    """The signal submitit's job side takes as "checkpoint and requeue" (USR2, unless the submitting shell set
    SUBMITIT_PREEMPT_SIGNAL), and asks Slurm to send before the time limit."""
    from submitit.core.job_environment import JobEnvironment

    return JobEnvironment._usr_sig()


def submitit_requeue_handler() -> Callable[..., object] | int | None:
    """submitit's own handler of that signal in a job's process (checkpoint(), requeue, exit), installed before
    our code runs."""
    import signal

    return signal.getsignal(submitit_requeue_signal())


def result_pickle(folder, job_id) -> "Path":
    """Where submitit leaves a finished job's result ("success" or "error", then the value), in the job's folder."""
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=0).result_pickle


# -- torch: a job's start without torch._dynamo (mnist/launch/job.py) -----------------------------


def defer_dynamo() -> None:
    """Let an eager (uncompiled) process start without importing torch._dynamo, which takes about as long
    as `import torch` itself. torch.optim imports it at its first optimizer only to call
    `torch._dynamo.graph_break()` and `torch._dynamo.disable(fn)`, which do nothing outside compiled code.
    This puts in a stand-in with those two; anything else asked of it (torch.compile, a submodule)
    swaps in the real torch._dynamo and gets its answer. Call it before the first optimizer is built."""
    import importlib
    import types

    if "torch._dynamo" in sys.modules:
        return
    import torch

    class StandIn(types.ModuleType):
        def __getattr__(self, name):
            if sys.modules.get("torch._dynamo") is self:
                del sys.modules["torch._dynamo"]
                torch.__dict__.pop("_dynamo", None)
            return getattr(importlib.import_module("torch._dynamo"), name)

    stand_in = StandIn("torch._dynamo", "mnist.private_apis.defer_dynamo's stand-in for eager runs")
    stand_in.graph_break = lambda *args, **kwargs: None
    stand_in.disable = lambda fn=None, recursive=True, **kwargs: fn if fn is not None else (lambda f: f)
    sys.modules["torch._dynamo"] = stand_in
    torch._dynamo = stand_in
