"""A search's study and its folder: what the login node writes before the workers start, what every worker
reads, and who trains which trial.

    <sweep>/search.json     the space, the settings and the overrides every trial shares (written once)
    <sweep>/study.journal   Optuna's study, shared by the workers through the file system (no server)
    <sweep>/<n>/            trial n's run folder: config.yaml, metrics.csv, checkpoint.pt, usage.json, train.log,
                            and trial.json (its state, parameters and objective)

A worker takes a trial under `.study.lock` and holds the trial's `.claim` (an flock: it dies with the
worker) while it trains it, so two workers never train one trial, and a trial whose worker died is
free to finish. No torch here; optuna only inside the functions that need it.
"""
import contextlib
import fcntl
import json
import os
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnist import atomic
from mnist.search import space as spaces

SEARCH = "search.json"
JOURNAL = "study.journal"
TRIAL = "trial.json"
STUDY_NAME = "search"
OBJECTIVES = {"accuracy": "accuracy", "test_loss": "test_loss"}  # search.objective -> metrics.csv's column


@dataclass
class Search:
    """search.json: what every worker of a search shares."""

    folder: Path
    space: spaces.Space
    settings: dict  # conf/search/optuna.yaml's values
    overrides: list  # every trial's overrides but its parameters (the command's fixed ones)

    @property
    def n_trials(self) -> int:
        return trials_wanted(self.settings, self.space)

    def objective(self, row) -> float:
        return float(row[OBJECTIVES[self.settings["objective"]]])

    def trial_overrides(self, params) -> list[str]:
        return [*self.overrides, *spaces.overrides(self.space, params)]


def trials_wanted(settings, space) -> int:
    """search.n_trials, but no more than a grid has points (a repeated one teaches nothing)."""
    n = int(settings["n_trials"])
    return min(n, grid_size(space)) if settings["sampler"] == "grid" else n


ENDED = ("COMPLETE", "PRUNED", "FAIL")  # a trial's states that count towards n_trials for good


def ended(folder) -> int:
    """How many of the search's trials have ended (not the running or interrupted ones)."""
    return sum(t.get("state") in ENDED for t in read_trials(folder))


def grid_size(space) -> int:
    size = 1
    for values in spaces.grid(space).values():
        size *= len(values)
    return size


def write_search(folder, space, settings, overrides) -> Search:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    document = {"space": {"fixed": space.fixed, "params": {k: p.to_dict() for k, p in space.params.items()}},
                "settings": dict(settings), "overrides": list(overrides)}
    atomic.write_whole(folder / SEARCH, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1) + "\n"))
    return read_search(folder)


def read_search(folder) -> Search:
    document = json.loads((Path(folder) / SEARCH).read_text())
    space = spaces.Space(fixed=document["space"]["fixed"],
                         params={k: spaces.Param.from_dict(p) for k, p in document["space"]["params"].items()})
    return Search(Path(folder), space, document["settings"], document["overrides"])


def is_search(folder) -> bool:
    return (Path(folder) / SEARCH).is_file()


class Study:
    """The search's Optuna study (created on first use) with its sampler, pruner and journal storage."""

    def __init__(self, search, worker="login"):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.search = search
        self.storage = JournalStorage(JournalFileBackend(str(search.folder / JOURNAL)))
        self.study = optuna.create_study(study_name=STUDY_NAME, storage=self.storage,
                                         direction=search.settings["direction"],
                                         pruner=_pruner(search.settings), load_if_exists=True)
        self.study.sampler = _sampler(search, _seed(search.settings.get("seed"), worker, len(self.study.trials)))

    def trial(self, number) -> object:
        """Trial `number` as a Trial to report to and ask whether to prune, also one another worker began (its
        worker died: this one finishes it)."""
        import optuna

        study_id = self.storage.get_study_id_from_name(STUDY_NAME)
        return optuna.trial.Trial(self.study, self.storage.get_trial_id_from_study_id_trial_number(study_id, number))


def _seed(seed, worker, trials):
    """search.seed for this worker at this point of the study: workers started together, or a search continued,
    would otherwise draw the very suggestions another already drew. None stays None (a fresh draw)."""
    if seed is None:
        return None
    return (int(seed) + zlib.crc32(str(worker).encode()) + 7919 * trials) % 2**32


def _sampler(search, seed):
    import optuna

    name = search.settings["sampler"]
    if name == "grid":
        return optuna.samplers.GridSampler(spaces.grid(search.space), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # (both are "experimental" in Optuna 4, and say so on every worker's start)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate: learns lr and width together; constant_liar: workers ask while others' trials still run,
        # and those count as bad until they end, so two workers are not sent to the same spot
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def _pruner(settings):
    import optuna

    name = settings["pruner"]
    if name == "median":  # (compares from a trial's first epoch on, once prune_after trials have completed;
        # a search.json written before prune_after existed keeps the 3 its search began with)
        return optuna.pruners.MedianPruner(n_startup_trials=settings.get("prune_after", 3), n_warmup_steps=0)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def trial_folder(search, number) -> Path:
    return search.folder / str(number)


@contextlib.contextmanager
def _locked(path) -> Iterator[None]:
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644)) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _claim(folder):
    """An open file holding `folder/.claim`'s flock, or None if a live worker holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(os.open(folder / ".claim", os.O_RDWR | os.O_CREAT, 0o644))
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


@dataclass
class Claimed:
    """A trial this worker trains: its number, parameters and folder, and the study's Trial to report to."""

    number: int
    params: dict
    folder: Path
    trial: object  # optuna.trial.Trial
    resumed: bool
    reported: tuple = ()  # the epochs whose objective the study has
    claim: object = None  # the open file that holds the trial's claim

    def release(self) -> None:
        """Let another worker take the trial (this one stopped, its checkpoint written)."""
        if self.claim is not None:
            self.claim.close()


@contextlib.contextmanager
def claim_next(opened, worker) -> Iterator[Claimed | None]:
    """The next trial for `worker` to train, held until the block ends: first an interrupted one (this worker's
    own before others'), then a new one from the sampler; None once the study has its n_trials."""
    import optuna

    study, search, claim = opened.study, opened.search, None
    with _locked(search.folder / ".study.lock"):
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        running.sort(key=lambda t: (t.user_attrs.get("worker") != worker, t.number))
        for frozen in running:
            claim = _claim(trial_folder(search, frozen.number))
            if claim is not None:
                number, params, resumed = frozen.number, frozen.params, True
                reported = tuple(frozen.intermediate_values)
                break
        else:
            if len(study.trials) < search.n_trials:
                trial = study.ask(spaces.distributions(search.space))
                number, params, resumed, reported = trial.number, trial.params, False, ()
                claim = _claim(trial_folder(search, number))
        if claim is None:
            yield None
            return
        trial = opened.trial(number)
        trial.set_user_attr("worker", worker)
        claimed = Claimed(number, params, trial_folder(search, number), trial, resumed, reported, claim)
        write_trial(claimed, "RUNNING", worker=worker, workers=[*_workers_of(claimed), worker])
    try:
        yield claimed
    finally:
        claimed.release()


def _workers_of(claimed):
    try:
        return json.loads((claimed.folder / TRIAL).read_text()).get("workers", [])
    except (OSError, ValueError):
        return []


def write_trial(claimed, state, **more) -> None:
    path = claimed.folder / TRIAL
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        document = {}
    document.update(number=claimed.number, state=state, params=claimed.params, **more)
    atomic.write_whole(path, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1) + "\n"))


def read_trials(folder) -> list[dict]:
    """Every trial.json of a search folder, by number (no optuna: for listings and reports)."""
    trials = []
    for path in Path(folder).glob(f"*/{TRIAL}"):
        with contextlib.suppress(OSError, ValueError):
            trials.append(json.loads(path.read_text()))
    return sorted(trials, key=lambda t: t.get("number", 0))


def progress(folder, probe=False, trials=None) -> str:
    """The study's progress: "4 done, 1 pruned, 2 running of 20 trials; best accuracy 0.981 (trial 3)", from the
    trials' own files (no optuna). `probe`: tell interrupted trials from running ones by taking each one's claim
    for a moment (not for listings, which may run every few seconds: a worker asking meanwhile would pass it by).
    `trials`: the folder's, if already read."""
    search, trials = read_search(folder), read_trials(folder) if trials is None else trials
    states = [t.get("state") for t in trials]
    running = [t for t in trials if t.get("state") == "RUNNING"]
    interrupted = sum(_is_free(trial_folder(search, t["number"])) for t in running) if probe else 0
    text = ", ".join(f"{n} {word}" for n, word in (
        (states.count("COMPLETE"), "done"), (states.count("PRUNED"), "pruned"),
        (len(running) - interrupted, "running"), (interrupted, "interrupted"), (states.count("FAIL"), "failed"))
        if n or word in ("done", "running")) + f" of {search.n_trials} trials"
    best = best_trial(search, trials)
    if best is not None:
        text += f"; best {search.settings['objective']} {best['value']:g} (trial {best['number']})"
    return text


def best_trial(search, trials) -> dict | None:
    """The best COMPLETE trial by the objective, or None."""
    done = [t for t in trials if t.get("state") == "COMPLETE" and t.get("value") is not None]
    if not done:
        return None
    pick = max if search.settings["direction"] == "maximize" else min
    return pick(done, key=lambda t: t["value"])


def _is_free(folder):
    """Whether no live worker holds the trial (its claim is taken, and let go, at once)."""
    claim = _claim(folder)
    if claim is None:
        return False
    claim.close()
    return True


def taken_by(trials, worker) -> list[dict]:
    """The trials `worker` took (began, or went on with after another worker), by number."""
    return [t for t in trials if worker in t.get("workers", [t.get("worker")])]


def current_trial(folder, worker, trials=None) -> int | None:
    """The trial `worker` trains, or the last it took (another worker may have finished it since), or None.
    `trials`: the folder's, if already read."""
    mine = taken_by(read_trials(folder) if trials is None else trials, worker)
    running = [t for t in mine if t.get("worker") == worker and t.get("state") == "RUNNING"]
    return (running or mine)[-1]["number"] if mine else None
