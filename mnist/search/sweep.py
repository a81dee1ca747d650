"""`python -m mnist.run -m search=optuna ...` on the login node (or here): check the space and the settings, write
the search folder, then start its workers: ONE Slurm job array of search.workers tasks (launcher=slurm, returns at
once), or processes here, one after another's trials or side by side (launcher=local).

The same command again, with the same hydra.sweep.dir, continues the study: it never starts over.
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mnist import callbacks
from mnist.config import report_errors
from mnist.errors import UserError
from mnist.search import space as spaces
from mnist.search import study as studies

# the settings a continued search may change; the others would make it another search
CHANGEABLE = ("n_trials", "workers", "pruner")


def search(config, arguments) -> None:
    """Hydra's sweeper hands over the composed config (the search's values, not its space) and the overrides."""
    folder = Path(str(config.hydra.sweep.dir)).resolve()
    with report_errors(), _removed_if_unused(folder):
        settings = OmegaConf.to_container(config.search, resolve=True)
        here = config.launcher.name != "slurm"  # (workers here are processes: at most the CPUs)
        spaces.check_settings(config.search, cpus=len(os.sched_getaffinity(0)) if here else None)
        if not here:
            _check_workers(config)
        base = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        space = spaces.parse(list(arguments), base)
        space.fixed = [o for o in space.fixed if not _is_about_the_search(o)]
        if config.dry_run:
            return _dry_run(config, folder, space, settings)
        _continued(folder, space, settings)
        found = studies.write_search(folder, space, settings, [])
        studies.Study(found)  # the study itself, before any worker: a sampler that cannot be made is said here
        if config.launcher.name == "slurm":
            from mnist.launch.slurm import submit_workers

            submit_workers(config, folder, workers_wanted(found))
        else:
            sys.exit(run_here(found, int(settings["workers"])))


@contextlib.contextmanager
def _removed_if_unused(folder):
    """A search refused before it starts leaves no folder behind (Hydra's callback made it for the sweep)."""
    try:
        yield
    except (UserError, SystemExit):
        if callbacks.created_here(folder) and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _check_workers(config):
    """What a Slurm worker asks for must fit a worker: one process that trains trial after trial."""
    res, launcher = config.resources, config.launcher
    if int(res.nodes) * int(res.tasks_per_node) > 1:
        raise UserError(
            f"resources.nodes={res.nodes} resources.tasks_per_node={res.tasks_per_node}: a search's worker trains "
            f"its trials in one process, not data-parallel. Leave both at 1; to train more trials at once, raise "
            f"search.workers."
        )
    if str(launcher.get("runs_per_task", 1)) != "1":
        raise UserError(
            f"launcher.runs_per_task={launcher.runs_per_task} packs a grid's runs into a task; a search's worker "
            f"already trains trial after trial in one task. Leave launcher.runs_per_task at 1."
        )
    auto = [key for key in ("mem", "time") if str(res[key]) == "auto"]
    if auto:
        raise UserError(
            f"resources.{auto[0]}=auto sizes one run from past runs like it; a search's worker trains many trials. "
            f"Give the worker resources.mem (what one trial needs) and resources.time (its limit: it checkpoints and "
            f"requeues itself there), e.g. resources.mem=2G resources.time=1:00:00."
        )


def _is_about_the_search(override):
    """Overrides that say how the search runs (search=optuna, search.n_trials=..., hydra.*), not what a trial
    trains: search.json keeps the settings, and a trial's config has none of them."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split(".")[0] in ("search", "hydra")


def _continued(folder, space, settings):
    """A folder that holds a search continues it, if it is the same search; any other non-empty folder is refused."""
    if studies.is_search(folder):
        old = studies.read_search(folder)
        differ = [k for k in settings if k not in CHANGEABLE and old.settings.get(k) != settings[k]]
        if old.space != space or differ:
            what = ", ".join([*(["the search space"] if old.space != space else []), *(f"search.{k}" for k in differ)])
            raise UserError(
                f"{folder} holds a search with a different {what}: a search continues only as the same search. Run "
                f"this one in another folder (hydra.sweep.dir=...), or repeat that search's command to continue it."
            )
        return old
    if folder.exists() and any(folder.iterdir()):
        raise UserError(
            f"{folder} already holds files that are not a search (a grid sweep?). Give the search a folder of its "
            f"own: hydra.sweep.dir=..."
        )
    return None


def workers_wanted(search) -> int:
    """As many workers as search.workers, but no more than trials left to train (interrupted ones included)."""
    trials = studies.read_trials(search.folder)
    ended = sum(t["state"] in ("COMPLETE", "PRUNED", "FAIL") for t in trials)
    return max(1, min(int(search.settings["workers"]), search.n_trials - ended))


def run_here(search, workers) -> int:
    """The search's workers as processes here (each starts torch and the data once); their worst exit status."""
    print(f"Searching in {search.folder}: {search.n_trials} trials, {workers} worker{'s' * (workers > 1)} here",
          flush=True)
    command = [sys.executable, "-m", "mnist.search.worker", str(search.folder)]  # (a process of its own: Hydra's
    names = ["local"] if workers == 1 else [f"local-{i}" for i in range(workers)]  # state is this one's)
    processes = [subprocess.Popen([*command, "--worker", name]) for name in names]
    try:
        return max(p.wait() for p in processes)
    except KeyboardInterrupt:  # each worker got the Ctrl-C too, and checkpoints its trial
        return max(p.wait() for p in processes)


def _dry_run(config, folder, space, settings):
    """What would be searched and the workers' script: nothing written, nothing submitted."""
    params = {k: p.to_dict() for k, p in space.params.items()}
    print(f"(dry run) search in {folder}: {json.dumps(params)}; fixed: {' '.join(space.fixed) or 'nothing'}; "
          f"{settings['n_trials']} trials, {settings['workers']} workers", file=sys.stderr)
    if config.launcher.name == "slurm":
        from mnist.launch.slurm import submit_workers

        submit_workers(config, folder, int(settings["workers"]))


def resubmit_search(folder, log_dir, overrides, more=False) -> str | None:
    """`python -m mnist.jobs resubmit SWEEP` for a search: workers that first finish the interrupted trials, then go
    on to n_trials (as many as search.workers, no more than trials are left). Its own where-and-how come from the
    search's command, then these overrides."""
    from mnist.config import compose, finalize
    from mnist.launch import slurm

    folder = Path(folder).resolve()
    found = studies.read_search(folder)
    if more:
        raise UserError("--more is for runs killed for memory or time; a search's workers requeue themselves at "
                        "their time limit. Give the workers more with resources.mem=... or resources.time=... "
                        f"instead: python -m mnist.jobs resubmit {folder} resources.time=...")
    trials = studies.read_trials(folder)
    ended = sum(t["state"] in ("COMPLETE", "PRUNED", "FAIL") for t in trials)
    if ended >= found.n_trials:
        print(f"Nothing to rerun in {folder}: {studies.progress(folder)}.")
        return None
    going = slurm.still_queued(log_dir, [folder])
    if going:
        why = next(iter(going.values()))
        fix = ("Slurm is ending it: run this again once it has ended (seconds)" if "COMPLETING" in why else
               "it goes on with the study by itself. Cancel it first (python -m mnist.jobs cancel JOB) to send new "
               "workers")
        raise UserError(f"{folder} has a worker {why}: {fix}.")
    cfg = finalize(compose(["launcher=slurm", *found.space.fixed, f"launcher.log_dir={log_dir}", *overrides]))
    workers = workers_wanted(found)
    if not cfg.dry_run:
        print(f"Resubmitting {folder}: {studies.progress(folder)}")
    return slurm.submit_workers(cfg, folder, workers, previous=_last_workers(log_dir, folder, workers))


def _last_workers(log_dir, folder, workers):
    """The job ids of the search's last workers, one for each new worker (the record links them)."""
    from mnist.launch import record

    mine = [e.job_id for e in record.read(log_dir) if Path(e.run_dir).resolve() == folder]
    last = [job for job in mine if mine and job.split("_")[0] == mine[-1].split("_")[0]]
    return (last + [""] * workers)[:workers]
