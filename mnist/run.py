"""The entry point: `python -m mnist.run [overrides]` composes conf/ with Hydra, then either
trains right here (launcher=local) or submits a Slurm job (launcher=slurm).

    python -m mnist.run                                   the MLP, 3 epochs, on MNIST
    python -m mnist.run model=cnn optimizer=sgd trainer.epochs=10
    python -m mnist.run -m model=mlp,cnn                  a sweep, one run after another
"""
import re
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from mnist.config import CONF_DIR, check_choices, check_keys, finalize, report_errors
from mnist.errors import UserError


REQUEUE_ME = 3  # exit status of a run stopped by USR2: slurm/*.sh then requeues the job


def _task(cfg):
    """What Hydra runs on the composed config: train here, or submit to Slurm."""
    run_dir = HydraConfig.get().runtime.output_dir
    with report_errors():
        cfg = own_config(finalize(cfg), run_dir, HydraConfig.get().overrides.task)
        if cfg.launcher.name == "local":
            _train_here(cfg, run_dir)
        else:
            from mnist.launch.slurm import submit

            submit(cfg, run_dir)


_run = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)


# Where and how a run trains may change when it resumes; what it trains may not.
TAKEN_FROM_COMMAND = ("launcher", "resources", "dry_run", "trainer.device", "trainer.threads", "trainer.log_interval",
                      "trainer.progress", "trainer.precision", "trainer.channels_last", "trainer.compile")


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _leaves(child, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _under(key, prefixes):
    """Whether `key` is one of the dotted `prefixes` or inside one of them."""
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def own_config(cfg, run_dir, overrides):
    """A run folder that holds a checkpoint resumes with the config it was started with.

    Overrides of where and how it runs (launcher, resources, device, threads, log interval, progress
    bar, precision, channels-last, compile) and trainer.epochs (to train on) apply; any other
    override that differs from it is an error.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if not (Path(run_dir) / "checkpoint.pt").exists() or not saved_path.exists():
        return cfg
    saved = OmegaConf.load(saved_path)
    given = {re.sub(r"^[+~]+", "", o).split("=", 1)[0] for o in overrides}
    now, before = _leaves(OmegaConf.to_container(cfg)), _leaves(OmegaConf.to_container(saved))
    conflicts = sorted(
        key for key in set(now) | set(before)
        if now.get(key) != before.get(key) and key != "trainer.epochs"
        and _under(key, given) and not _under(key, TAKEN_FROM_COMMAND)
    )
    if conflicts:
        shown = ", ".join(f"{k} ({now.get(k)!r}, but the run has {before.get(k)!r})" for k in conflicts)
        raise UserError(
            f"{run_dir} holds a run to resume, and it resumes with its own config ({saved_path}). These "
            f"overrides differ from it: {shown}. Leave them out to resume, or start a new run in another folder."
        )
    for key in TAKEN_FROM_COMMAND + (("trainer.epochs",) if "trainer.epochs" in given else ()):
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    return saved


def _train_here(cfg, run_dir):
    """Train in this process. Ctrl-C (or USR2, which sbatch scripts forward before the time
    limit) finishes the step, writes a checkpoint and exits: 130 for Ctrl-C, 3 for USR2."""
    from mnist import datafiles

    if not datafiles.will_download(cfg.data):  # missing or bad data: said at once, not after torch loads (~2 s)
        datafiles.prepare(cfg.data.root, cfg.data.name)
    from mnist.train import StopFlag, StopRequested, train

    stop, received = StopFlag(), list(EARLY_STOPS)
    stop.requested = bool(received)

    def request_stop(signum, frame):
        if received and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        received.append(signum)
        stop.requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGUSR2, request_stop)
    try:
        train(cfg, run_dir, stop)
    except StopRequested:
        why = "Interrupted" if received[0] == signal.SIGINT else "Stopped before the time limit"
        print(f"\n{why}. {run_dir} keeps the log, config, metrics and a checkpoint of where training was; "
              f"resume with: python -m mnist.run hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(130 if received[0] == signal.SIGINT else REQUEUE_ME)


EARLY_STOPS = []  # USR2 that came before training began (Slurm's timing is coarse)


def main(overrides=None):
    signal.signal(signal.SIGUSR2, lambda signum, frame: EARLY_STOPS.append(signum))
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
