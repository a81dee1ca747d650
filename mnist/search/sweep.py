"""`python -m mnist.run -m search=optuna ...` on the login node (or here): check the space and the settings, write
the search folder, then start its workers: ONE Slurm job array of search.workers tasks (launcher=slurm, returns at
once), or processes here, one after another's trials or side by side (launcher=local).

The same command again, with the same hydra.sweep.dir, continues the study: it never starts over.
"""
import contextlib
import itertools
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
CHANGEABLE = ("n_trials", "workers", "pruner", "prune_after")


def search(config, arguments, compose) -> None:
    """Hydra's sweeper hands over the composed config (the search's values, not its space), the overrides, and
    `compose(overrides)`: the config other overrides give, composed by its Hydra."""
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
        old = _continued(folder, space, settings)
        workers = _workers_wanted(settings, space, folder if old else None)
        asked, trial_cfgs = {}, []
        if here:
            _check_data_here(config)
        else:  # resources, the cluster, the data: all before anything is written
            from mnist.launch.slurm import check

            check(config, asked)
            trial_cfgs = _group_configs(space, space.fixed, compose)
            if old and not config.dry_run:
                _no_live_workers(folder, config.launcher.log_dir)
        if config.dry_run:
            return _dry_run(config, folder, space, settings, workers, asked, trial_cfgs)
        found = studies.write_search(folder, space, settings, [])
        studies.Study(found)  # the study itself, before any worker: a sampler that cannot be made is said here
        if here:
            sys.exit(run_here(found, workers))
        from mnist.launch.slurm import submit_workers

        submit_workers(config, folder, workers, asked=asked, trial_cfgs=trial_cfgs)


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
    """A folder that holds a search continues it, if it is the same search: the same space, the same values of what
    a trial trains, and the settings but CHANGEABLE (where and how its workers run may change). Any other non-empty
    folder is refused. Returns the search found, or None."""
    if studies.is_search(folder):
        old = studies.read_search(folder)
        differ = [f"search.{k}" for k in settings if k not in CHANGEABLE and old.settings.get(k) != settings[k]]
        if old.space.params != space.params:
            differ.insert(0, "search space")
        ours, theirs = _trained(space.fixed), _trained(old.space.fixed)
        differ += [f"{key} ({ours.get(key, 'not given')}, there {theirs.get(key, 'not given')})"
                   for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
        if differ:
            raise UserError(
                f"{folder} holds a search with a different {', '.join(differ)}: a search continues only as the same "
                f"search. Run this one in another folder (hydra.sweep.dir=...), or repeat that search's command to "
                f"continue it."
            )
        return old
    if folder.exists() and any(folder.iterdir()):
        raise UserError(
            f"{folder} already holds files that are not a search (a grid sweep?). Give the search a folder of its "
            f"own: hydra.sweep.dir=..."
        )
    return None


def _trained(fixed):
    """{key: value} of the fixed overrides that change what a trial trains (not where or how it runs)."""
    from mnist.rundir import TAKEN_FROM_COMMAND, _under

    pairs = (o.split("=", 1) for o in fixed if "=" in o)
    return {key.lstrip("+~"): value for key, value in pairs
            if not _under(key.lstrip("+~"), (*TAKEN_FROM_COMMAND, "data.root", "data.download"))}


def _workers_wanted(settings, space, folder=None):
    """As many workers as search.workers, but no more than trials are left (interrupted ones included)."""
    ended = studies.ended(folder) if folder is not None else 0
    return max(1, min(int(settings["workers"]), studies.trials_wanted(settings, space) - ended))


def _check_data_here(config):
    """The data is there and whole before the first trial (a run here downloads what is missing)."""
    from mnist import datafiles

    if not datafiles.will_download(config.data):
        datafiles.prepare(config.data.root, config.data.name)


def _no_live_workers(folder, log_dir):
    """Refuse to send more workers while some of the search's are still queued or running."""
    from mnist.launch import slurm

    going = slurm.still_queued(log_dir, [folder])
    if going:
        why = next(iter(going.values()))
        fix = ("Slurm is ending it: run this again once it has ended (seconds)" if "COMPLETING" in why else
               "it goes on with the study by itself. Cancel it first (python -m mnist.jobs cancel JOB) to send new "
               "workers")
        raise UserError(f"{folder} has a worker {why}: {fix}.")


def run_here(search, workers) -> int:
    """The search's workers as processes here (each starts torch and the data once); their worst exit status."""
    print(f"Searching in {search.folder}: {search.n_trials} trials, {workers} worker{'s' * (workers > 1)} here",
          flush=True)
    command = [sys.executable, "-m", "mnist.search.worker", str(search.folder)]  # (a process of its own: Hydra's
    names = ["local"] if workers == 1 else [f"local-{i}" for i in range(workers)]  # state is this one's)
    threads = ["--threads", str(max(1, len(os.sched_getaffinity(0)) // workers))] if workers > 1 else []
    processes = [subprocess.Popen([*command, "--worker", name, *threads]) for name in names]
    try:
        return max(p.wait() for p in processes)
    except KeyboardInterrupt:  # each worker got the Ctrl-C too, and checkpoints its trial
        return max(p.wait() for p in processes)


def _dry_run(config, folder, space, settings, workers, asked, trial_cfgs):
    """What would be searched and the workers' script: nothing written, nothing submitted."""
    params = {k: p.to_dict() for k, p in space.params.items()}
    print(f"(dry run) search in {folder}: {json.dumps(params)}; fixed: {' '.join(space.fixed) or 'nothing'}; "
          f"{settings['n_trials']} trials, {workers} worker{'s' * (workers > 1)}", file=sys.stderr)
    if config.launcher.name == "slurm":
        from mnist.launch.slurm import submit_workers

        submit_workers(config, folder, workers, asked=asked, trial_cfgs=trial_cfgs)


def resubmit_search(folder, log_dir, overrides, more=False) -> str | None:
    """`python -m mnist.jobs resubmit SWEEP` for a search: workers that first finish the interrupted trials, then go
    on to n_trials (as many as search.workers, no more than trials are left). Where and how they run comes from the
    search's command, then these overrides (`resources.*`, `launcher.*`); --more asks for what the last workers
    lacked: twice the memory of one killed for memory, twice the time of one that ran out of requeues."""
    from mnist.config import compose, finalize
    from mnist.launch import slurm

    folder = Path(folder).resolve()
    found = studies.read_search(folder)
    trained = sorted(_trained(overrides))
    if trained:
        raise UserError(
            f"{', '.join(trained)}: a resubmitted search trains its trials as its command said; only where and how "
            f"its workers run may change (resources.*, launcher.*). To search with other values, run a new search "
            f"in another folder (hydra.sweep.dir=...)."
        )
    if studies.ended(folder) >= found.n_trials:
        print(f"Nothing to rerun in {folder}: {studies.progress(folder, probe=True)}.")
        return None
    _no_live_workers(folder, log_dir)
    given = overrides
    overrides = ["launcher=slurm", *found.space.fixed, f"launcher.log_dir={log_dir}", *given]
    if more:
        overrides += _more(log_dir, folder, overrides, given)
    cfg = finalize(compose(overrides))
    _check_workers(cfg)
    workers = _workers_wanted(found.settings, found.space, folder)
    if not cfg.dry_run:
        print(f"Resubmitting {folder}: {studies.progress(folder, probe=True)}")
    return slurm.submit_workers(cfg, folder, workers, previous=_last_workers(log_dir, folder, workers),
                                trial_cfgs=_group_configs(found.space, overrides, lambda o: finalize(compose(o))))


def _group_configs(space, overrides, compose) -> list:
    """A config for each combination of the config groups the space chooses from (model=choice(mlp,cnn)): what a
    trial asks Slurm for may differ with them (the CNN's longer time limit), so a worker asks for the longest."""
    groups = {name: p.choices for name, p in space.params.items()
              if p.kind == "categorical" and spaces.group_of(name)}
    return [compose([*overrides, *(f"{name}={choice}" for name, choice in zip(groups, combination))])
            for combination in itertools.product(*groups.values())] if groups else []


def _more(log_dir, folder, overrides, given):
    """The overrides --more adds for the search's last workers (mnist.launch.resubmit.more_for's rules)."""
    from mnist import rundir
    from mnist.config import compose
    from mnist.launch import outcome, record, resources
    from mnist.launch.resubmit import limits_of, more_for

    entries = [e for e in record.read(log_dir) if Path(e.run_dir).resolve() == folder]
    last = [e for e in entries if e.job_id.split("_")[0] == entries[-1].job_id.split("_")[0]] if entries else []
    jobs = outcome.describe(last, record.states(last), log_dir)
    config = OmegaConf.to_container(compose(overrides), resolve=True)
    limits = limits_of(resources.limits_by_partition(resources.ask_cluster(config["dry_run"])), config)
    before = dict(config["resources"])
    killed = [j for j in jobs if j["memory_kill"] or j["state"] == "OUT_OF_MEMORY"]
    timed_out = [j for j in jobs if j["state"] == "TIMEOUT"]
    for job in [*killed[:1], *timed_out[:1]]:  # (one of each: the rules double what the config asks)
        for short in more_for(config, job, rundir.given_keys(given), limits):
            print(f"--more for {folder}: {short}", file=sys.stderr)
    added = [f"resources.{key}={config['resources'][key]}" for key in ("mem", "time")
             if config["resources"][key] != before[key]]
    print(f"--more for {folder}: " + (" ".join(added) if added else "no worker was killed for memory or ran out of "
                                      "time; nothing to raise"), file=sys.stderr)
    return added


def _last_workers(log_dir, folder, workers):
    """The job ids of the search's last workers, one for each new worker (the record links them)."""
    from mnist.launch import record

    mine = [e.job_id for e in record.read(log_dir) if Path(e.run_dir).resolve() == folder]
    last = [job for job in mine if mine and job.split("_")[0] == mine[-1].split("_")[0]]
    return (last + [""] * workers)[:workers]
