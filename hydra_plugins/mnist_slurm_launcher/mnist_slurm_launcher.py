"""A Hydra launcher that turns a `-m` sweep into ONE Slurm job array and returns at once.

Hydra finds it in the `hydra_plugins` namespace package; conf/launcher/slurm.yaml selects it.
Each sweep run gets its folder and resolved config through Hydra's own `run_job` (so the
folders look like any multirun's), then mnist.launch.slurm submits them all in one sbatch call.
Unlike hydra-submitit-launcher it does not wait for the jobs, and it honours dry_run=true.

Composing is most of a sweep's submission time (~0.1 s a run), and Hydra composes each run
twice: its basic sweeper first checks that every run composes, "as the launcher may be
performing this in a different process/machine", then the launcher composes it again.
So conf/launcher/slurm.yaml also selects the sweeper here: Hydra's basic sweeper less that
check. This launcher composes every run right here, all of them before it creates a folder or
submits, so a bad override stops the sweep at the same point with the same error; and
`compose_runs` composes conf/ once per set of config-group choices, not once per run.
"""
import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict

from mnist import private_apis

log = logging.getLogger(__name__)
BasicSweeper, BasicSweeperConf = private_apis.basic_sweeper_classes()


LAUNCHER = "hydra_plugins.mnist_slurm_launcher.mnist_slurm_launcher.MnistSlurmLauncher"


@dataclass
class MnistSlurmLauncherConf:
    _target_: str = LAUNCHER


@dataclass
class MnistSlurmSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.mnist_slurm_launcher.mnist_slurm_launcher.MnistSlurmSweeper"


ConfigStore.instance().store(group="hydra/launcher", name="mnist_slurm", node=MnistSlurmLauncherConf,
                             provider="mnist-slurm")
ConfigStore.instance().store(group="hydra/sweeper", name="mnist_slurm", node=MnistSlurmSweeperConf,
                             provider="mnist-slurm")


class MnistSlurmSweeper(BasicSweeper):
    """Every `-m` of this project (conf/config.yaml selects it): Hydra's basic sweeper (the same `a,b`, `range()`,
    `hydra.sweeper.params`, batches), or with search=optuna a search (mnist.search.sweep), whose overrides
    are a search space rather than a grid."""

    def validate_batch_is_legal(self, batch):
        if self.config.hydra.launcher.get("_target_") != LAUNCHER:
            super().validate_batch_is_legal(batch)
        # (MnistSlurmLauncher.launch composes each run of the batch first, in this process)

    def sweep(self, arguments):
        """A dry run writes nothing: Hydra's sweep, less its record of the sweep (multirun.yaml in the
        sweep folder, which it would create for it)."""
        if self.config.get("search", {}).get("name", "none") != "none":
            from mnist.search.sweep import search

            return search(self.config, arguments,
                          lambda overrides: self.hydra_context.config_loader.load_sweep_config(self.config, overrides))
        if not self.config.get("dry_run"):
            return super().sweep(arguments)
        return private_apis.sweep_without_record(self, arguments)


def compose_runs(config_loader, master, job_overrides):
    """Each run's config, exactly as Hydra's `load_sweep_config(master, overrides)` composes it, but
    composing conf/ once per set of config-group choices instead of once per run.

    Hydra composes a run in two steps: it merges conf/'s files as the defaults list (the group
    choices) picks them, then applies the overrides of values on top, in order, in struct mode.
    The runs of a sweep over values (`trainer.seed=range(50)`, `optimizer.lr=0.1,0.01`) differ only
    in the second step, so each such run is the first step's result (composed once, by Hydra, from
    the run's other overrides) with its own values applied by Hydra's own override code, plus the
    two records of a run's overrides Hydra keeps (hydra.overrides.task, hydra.job.override_dirname).
    Only plain `a.b.c=value` overrides of keys no other override of the run touches are applied
    this way (their order then does not matter); anything else stays in the first step.
    tests/test_launch.py checks that the result equals Hydra's, config and hydra node alike.
    """
    parser = OverridesParser.create(config_loader=config_loader)
    bases, runs = {}, []
    for overrides in job_overrides:
        parsed = parser.parse_overrides(list(overrides))
        values = [o for o in parsed if _is_value(o, parsed, config_loader)]
        rest = tuple(o.input_line for o in parsed if not any(o is v for v in values))
        if rest not in bases:
            bases[rest] = config_loader.load_sweep_config(master, list(rest))
        cfg = copy.deepcopy(bases[rest])
        private_apis.apply_value_overrides(values, cfg)
        task = [o for o in parsed if not o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in task]
        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = private_apis.override_dirname(
            task, list(dirname.exclude_keys), dirname.item_sep, dirname.kv_sep)
        OmegaConf.copy_cache(from_config=master, to_config=cfg)
        runs.append(cfg)
    return runs


def _is_value(override, parsed, config_loader):
    """`a.b.c=value`: a plain override of a value (no +, ~, @package, dict, or config group), of a key
    that no other override of the run sets, contains or is contained in."""
    key = override.key_or_group
    plain = (override.type == OverrideType.CHANGE and override.package is None and "." in key
             and not key.startswith("hydra.") and not isinstance(override.value(), dict)
             and not private_apis.is_config_group(config_loader, key))
    others = [o.key_or_group for o in parsed if o is not override]
    return plain and not any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in others)


def _prepare(cfg):
    """Hydra's task function for each sweep run: check and resolve its config, apply the run-folder rules a
    single run's submission applies (a run already in the folder resumes with its own config; a complete or
    busy one is left alone), and record the run's overrides as its start (mnist.rundir). Returns (config or
    None, run folder, why it is left alone); the launcher then saves the configs and submits."""
    from mnist import rundir
    from mnist.config import finalize
    from mnist.launch.slurm import folder_rules

    run_dir, overrides = HydraConfig.get().runtime.output_dir, list(HydraConfig.get().overrides.task)
    existed = (Path(run_dir) / rundir.CONFIG).is_file()
    cfg, why = folder_rules(finalize(cfg), run_dir, overrides)
    rundir.record_start(run_dir, overrides)
    return cfg, run_dir, why, existed


class MnistSlurmLauncher(Launcher):
    def setup(self, *, hydra_context, task_function, config):
        self.hydra_context = hydra_context
        self.config = config

    def launch(self, job_overrides, initial_job_idx):
        from mnist.config import report_errors
        from mnist.launch.slurm import submit_array

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        # Every run composed before any is logged or gets a folder: a bad override stops the sweep here.
        composed = compose_runs(self.hydra_context.config_loader, self.config, job_overrides)
        with report_errors():
            runs, returns = [], []
            for idx, (overrides, sweep_config) in enumerate(zip(job_overrides, composed), start=initial_job_idx):
                log.info(f"#{idx} : {' '.join(filter_overrides(overrides))}")
                with open_dict(sweep_config):
                    sweep_config.hydra.job.id = idx
                    sweep_config.hydra.job.num = idx
                if sweep_config.dry_run:  # no folders for a dry run
                    with open_dict(sweep_config):
                        del sweep_config["hydra"]
                    from mnist.config import finalize

                    runs.append((finalize(sweep_config), None))
                    continue
                result = run_job(hydra_context=self.hydra_context, task_function=_prepare, config=sweep_config,
                                 job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
                runs.append(result.return_value)  # re-raises a config error from _prepare
                returns.append(result)
            todo = _left_alone(runs, self.config)
            if todo:
                submit_array(todo)
        return returns or [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]


def _left_alone(runs, config):
    """The runs to submit, (config, run folder) each; says which runs of a sweep submitted again into its folder
    are left alone (complete, in use, or still queued or running as a job the record names) and why."""
    if all(len(run) == 2 for run in runs):  # a dry run: no folders
        return runs
    from mnist.launch.slurm import still_queued

    queued = still_queued(config.launcher.log_dir, [d for cfg, d, _, existed in runs if cfg is not None and existed])
    todo, left = [], []
    for cfg, run_dir, why, _ in runs:
        why = why or queued.get(str(Path(run_dir).resolve()), "")
        (left if why else todo).append((cfg, run_dir) if not why else (run_dir, why))
    if left:
        sweep = Path(left[0][0]).parent
        complete = sum(why == "complete" for _, why in left)
        others = [f"{Path(d).name} {why}" for d, why in left if why != "complete"]
        print(f"{sweep}: {complete} of {len(runs)} runs already complete" + (f"; left alone: {'; '.join(others)}"
                                                                              if others else "")
              + (f". Submitting the other {len(todo)}." if todo else ". Nothing to submit."))
    return todo
