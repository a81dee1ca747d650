"""The entry point: `python -m mnist.run [overrides]` composes conf/ with Hydra, then either
trains right here (launcher=local) or submits a Slurm job (launcher=slurm).

    python -m mnist.run                                   the MLP, 3 epochs, on MNIST
    python -m mnist.run model=cnn optimizer=sgd trainer.epochs=10
    python -m mnist.run -m model=mlp,cnn                  a sweep, one run after another
"""
import shutil
import sys
from contextlib import contextmanager

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mnist import callbacks, rundir, stopping, usage
from mnist.config import CONF_DIR, check_choices, check_keys, finalize, report_errors
from mnist.errors import UserError


def _task(cfg):
    """What Hydra runs on the composed config: train here, or submit to Slurm."""
    run_dir = HydraConfig.get().runtime.output_dir
    overrides = list(HydraConfig.get().overrides.task)
    with report_errors(), _removed_if_unused(run_dir):
        if cfg.search.name != "none":  # (with -m, the sweeper searches and this never runs)
            raise UserError(f"search={cfg.search.name} searches the space a -m command line gives: add -m, e.g. "
                            f"python -m mnist.run -m search={cfg.search.name} 'optimizer.lr=tag(log, interval(0.01, "
                            f"3))' (conf/search/{cfg.search.name}.yaml).")
        cfg = own_config(finalize(cfg), run_dir, overrides)
        rundir.check_free(run_dir, _job_id())
        if cfg.launcher.name == "local":  # (a finished run: train() says so, once it has read the checkpoint)
            rundir.record_start(run_dir, overrides)
            _train_here(cfg, run_dir)
        elif not _finished(cfg, run_dir):
            from mnist.launch.slurm import submit

            submit(cfg, run_dir, overrides)


_run = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)


def own_config(cfg, run_dir, overrides) -> DictConfig:
    """A folder that holds a run resumes it with the config it was started with, as
    mnist.rundir.resume_config rules: where and how it runs comes from this command."""
    if not rundir.holds_run(run_dir):
        return cfg
    return OmegaConf.create(rundir.resume_config(run_dir, OmegaConf.to_container(cfg), overrides))


def _finished(cfg, run_dir):
    """A run with every epoch done has nothing left to do: say so and submit nothing."""
    if not rundir.complete(run_dir, cfg):
        return False
    print(rundir.nothing_left(run_dir, len(rundir.read_metrics(run_dir)), cfg.trainer.epochs))
    return True


def _job_id():
    from mnist.env import job_id

    return job_id()


@contextmanager
def _removed_if_unused(run_dir):
    """A run that stops before it trains (bad data, config or request) leaves no run folder behind."""
    try:
        yield
    except UserError:
        if callbacks.created_here(run_dir) and rundir.unused(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train_here(cfg, run_dir):
    """Train in this process. Ctrl-C, USR2 (which sbatch scripts forward before the time limit) or SIGTERM (Slurm
    ending the job) finishes the step, writes a checkpoint and exits: 130 for Ctrl-C, 3 for USR2, 143 for SIGTERM."""
    from mnist import datafiles, private_apis

    if not datafiles.will_download(cfg.data):  # missing or bad data: said at once, not after torch loads (~2 s)
        datafiles.prepare(cfg.data.root, cfg.data.name)
    # torch.optim imports torch._dynamo (~1 s, as long as torch itself) for nothing in an eager run; not in a local
    # multirun, whose runs share this process: a later one may compile, and torch keeps what the stand-in said
    if not cfg.trainer.compile and HydraConfig.get().mode == RunMode.RUN:
        private_apis.defer_dynamo()
    from mnist.train import train

    stop, received = stopping.stop_on_signals()  # (before usage's SIGTERM handler, which writes its figures, then this)
    try:
        with usage.recording(run_dir):
            train(cfg, run_dir, stop)
    except stopping.StopRequested:
        why, code = stopping.stopped_by(received)
        print(f"\n{why}. {run_dir} keeps the log, config, metrics and a checkpoint of where training was; "
              f"resume with: python -m mnist.run hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(code)


def main(overrides=None) -> None:
    stopping.catch_early_signals()
    if overrides is not None:
        sys.argv = [sys.argv[0], *overrides]
    args = sys.argv[1:]
    submitting = _submits_one_run(args)
    with report_errors():  # (submitting: an unknown key is explained only if composing fails, see below)
        check_choices([a for a in args if not a.startswith("-")], keys=not submitting)
    if submitting:
        _submit_one_run(args)
    else:
        _run()


def _submits_one_run(args):
    """`launcher=slurm` with overrides only (no -m, --cfg, --help, ...): the login node's everyday path."""
    return "launcher=slurm" in args and not any(a.startswith("-") or "hydra.mode" in a for a in args)


def _submit_one_run(overrides):
    """What hydra.main does for these overrides (compose, callbacks, the run folder with .hydra/, then
    _task), through the same Hydra calls, but composing once instead of three times: hydra.main first
    composes to read hydra.mode (which conf/ never sets, and these overrides do not), and check_keys
    composes to explain an unknown key; here that happens only if composing failed. A dry run
    (`dry_run=true`) composes and prints the script without a run folder."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    from mnist import private_apis

    def run():
        try:
            if "dry_run=true" in overrides:
                _print_script(hydra, overrides)
            else:  # hydra.main, finding no hydra.mode, adds this override too (it lands in .hydra/hydra.yaml)
                private_apis.run_job(hydra, "config", [*overrides, "hydra.mode=RUN"], _task)
        except (ConfigCompositionException, OmegaConfBaseException):
            GlobalHydra.instance().clear()  # check_keys composes with a Hydra of its own
            with report_errors():
                check_keys(overrides)  # an unknown key: our paragraph instead of Hydra's
            raise

    hydra = private_apis.run_and_report(lambda: private_apis.create_hydra(str(CONF_DIR), task_name="run"))
    try:
        private_apis.run_and_report(run)
    finally:
        GlobalHydra.instance().clear()


def _print_script(hydra, overrides):
    """A dry run prints the sbatch script and makes nothing: no run folder, no .hydra/ (as for sweeps)."""
    from omegaconf import open_dict

    from mnist import private_apis
    from mnist.launch.slurm import submit

    cfg = private_apis.compose_run_config(hydra, "config", overrides)
    HydraConfig.instance().set_config(cfg)  # resolves hydra.run.dir's ${now:...}
    run_dir, given = cfg.hydra.run.dir, cfg.hydra.overrides.task
    with open_dict(cfg):
        del cfg["hydra"]
    with report_errors():
        submit(own_config(finalize(cfg), run_dir, given), run_dir)


if __name__ == "__main__":
    main()
