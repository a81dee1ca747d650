"""A Hydra launcher that turns a `-m` sweep into ONE Slurm job array and returns at once.

Hydra finds it in the `hydra_plugins` namespace package; conf/launcher/slurm.yaml selects it.
Each sweep run gets its folder and resolved config through Hydra's own `run_job` (so the
folders look like any multirun's), then mnist.launch.slurm submits them all in one sbatch call.
Unlike hydra-submitit-launcher it does not wait for the jobs, and it honours dry_run=true.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import open_dict

log = logging.getLogger(__name__)


@dataclass
class MnistSlurmLauncherConf:
    _target_: str = "hydra_plugins.mnist_slurm_launcher.mnist_slurm_launcher.MnistSlurmLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="mnist_slurm", node=MnistSlurmLauncherConf,
                             provider="mnist-slurm")


def _prepare(cfg):
    """Hydra's task function for each sweep run: check and resolve its config, nothing more."""
    from mnist.config import finalize

    return finalize(cfg), HydraConfig.get().runtime.output_dir


class MnistSlurmLauncher(Launcher):
    def setup(self, *, hydra_context, task_function, config):
        self.hydra_context = hydra_context
        self.config = config

    def launch(self, job_overrides, initial_job_idx):
        from mnist.config import report_errors
        from mnist.launch.slurm import submit_array

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        with report_errors():
            runs, returns = [], []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                log.info(f"#{idx} : {' '.join(filter_overrides(overrides))}")
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
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
            submit_array(runs)
        return returns or [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]
