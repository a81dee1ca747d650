"""`python -m mnist.run -m search=optuna ...` on the login node (or here): check the space and the settings, write
the search folder, then start its workers: ONE Slurm job array of search.workers tasks (launcher=slurm, returns at
once), or processes here, one after another's trials or side by side (launcher=local).

The same command again, with the same hydra.sweep.dir, continues the study: it never starts over.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mnist.config import report_errors
from mnist.errors import UserError
from mnist.search import space as spaces
from mnist.search import study as studies

# the settings a continued search may change; the others would make it another search
CHANGEABLE = ("n_trials", "workers", "pruner")


def search(config, arguments) -> None:
    """Hydra's sweeper hands over the composed config (the search's values, not its space) and the overrides."""
    with report_errors():
        settings = OmegaConf.to_container(config.search, resolve=True)
        spaces.check_settings(config.search, cpus=len(os.sched_getaffinity(0)))
        base = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        space = spaces.parse(list(arguments), base)
        space.fixed = [o for o in space.fixed if not _is_about_the_search(o)]
        folder = Path(str(config.hydra.sweep.dir)).resolve()
        if config.dry_run:
            return _dry_run(config, folder, space, settings)
        _continued(folder, space, settings)
        found = studies.write_search(folder, space, settings, [])
        studies.Study(found)  # the study itself, before any worker: a sampler that cannot be made is said here
        if config.launcher.name == "slurm":
            from mnist.launch.slurm import submit_workers

            submit_workers(config, folder, workers_wanted(found))
        else:
            sys.exit(run_here(found, min(int(settings["workers"]), len(os.sched_getaffinity(0)))))


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
