"""A search's worker: trains trial after trial of the study, each in its own run folder, until the study has its
n_trials. It starts Python, torch and the data once; no worker waits for another.

    python -m mnist.search.worker SWEEP_FOLDER [--worker NAME]     (what `python -m mnist.run -m search=optuna ...`
                                                                    starts here; on Slurm, each array task is one)

A trial interrupted (Ctrl-C, a time limit, preemption, a kill) keeps its checkpoint and stays RUNNING in the
study; the next worker to ask for a trial, this one after its requeue first, finishes it.
"""
import argparse
import re
import sys
import traceback

from mnist import rundir, stopping
from mnist.errors import UserError
from mnist.search import space as spaces
from mnist.search import study as studies


class Reporter:
    """train()'s epoch_end for a trial: each epoch's objective to the study (once), then whether to prune."""

    def __init__(self, search, claimed):
        self.search, self.claimed, self.pruned = search, claimed, False
        self.reported = set(claimed.reported)

    def __call__(self, rows) -> bool:
        for row in rows:
            epoch = int(row["epoch"])
            if epoch not in self.reported:
                self.claimed.trial.report(self.search.objective(row), epoch)
                self.reported.add(epoch)
        self.pruned = self.search.settings["pruner"] != "none" and self.claimed.trial.should_prune()
        return self.pruned


def trial_config(search, claimed, download=True) -> dict:
    """The trial's resolved config: every trial's overrides, then its parameters."""
    from omegaconf import OmegaConf

    from mnist.config import compose, finalize, validate

    cfg = finalize(compose(search.trial_overrides(claimed.params)))
    validate(cfg)
    if not download:
        cfg.data.download = False
    return OmegaConf.to_container(cfg, resolve=True)


def run_trials(folder, worker, train_one, before_each=None) -> int:
    """Claim and train trials until none is left; returns how many this worker ended.
    `train_one(config, run_dir, reporter, claimed)` trains one (raising StopRequested when stopped: the trial
    stays open); `before_each()` runs before a trial is claimed. A trial that fails is recorded FAIL and the
    worker goes on: a bad searched value fails that trial only (the data was checked before any trial)."""
    search = studies.read_search(folder)
    opened = studies.Study(search, seed_key(worker))
    ended = 0
    while True:
        if before_each is not None:
            before_each()
        with studies.claim_next(opened, worker) as claimed:
            if claimed is None:
                print(f"Worker {worker}: no trial left to take ({studies.progress(folder)}); done.", flush=True)
                return ended
            print(f"Trial {claimed.number}{' (resuming)' if claimed.resumed else ''}: "
                  f"{' '.join(spaces.overrides(search.space, claimed.params)[len(search.space.fixed):])}  "
                  f"in {claimed.folder}", flush=True)
            reporter = Reporter(search, claimed)
            try:
                train_one(trial_config(search, claimed), claimed.folder, reporter, claimed)
            except (stopping.StopRequested, KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                opened.study.tell(claimed.number, state=_states().FAIL)
                why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                studies.write_trial(claimed, "FAIL", error=why)
                if isinstance(e, UserError):
                    print(f"Trial {claimed.number} failed: {e}", flush=True)
                else:
                    traceback.print_exc()
                continue
            finish(opened, search, claimed, rundir.read_metrics(claimed.folder), reporter)
            ended += 1


def seed_key(worker) -> str:
    """What makes a worker's seed its own: its place (an array task's index, local-i's i), not its job id, so that
    a seeded search proposes the same trials on every submission."""
    match = re.search(r"[_-](\d+)$", str(worker))
    return match.group(1) if match else "0"


def finish(opened, search, claimed, rows, reporter) -> None:
    """Tell the study how the trial ended, and write it into its folder (trial.json)."""
    reporter(rows)  # (a run found finished trains nothing, and reports nothing, by itself)
    value = search.objective(rows[-1])
    if reporter.pruned and len(rows) < _epochs(opened, claimed):
        opened.study.tell(claimed.number, state=_states().PRUNED)
        studies.write_trial(claimed, "PRUNED", value=value, epochs=len(rows))
        print(f"Trial {claimed.number} pruned after epoch {len(rows)}: {search.settings['objective']} {value:g}, "
              f"behind the trials before it at that epoch", flush=True)
    else:
        try:
            opened.study.tell(claimed.number, value)
        except RuntimeError:  # GridSampler's last point calls study.stop(), which only an optimize() loop takes;
            pass  # the trial is recorded COMPLETE all the same
        studies.write_trial(claimed, "COMPLETE", value=value, epochs=len(rows))
        print(f"Trial {claimed.number} done: {search.settings['objective']} {value:g}", flush=True)


def _epochs(opened, claimed):
    return int(rundir.read_config(claimed.folder)["trainer"]["epochs"])


def _states():
    import optuna

    return optuna.trial.TrialState


def train_here(config, run_dir, reporter, stop, threads=None) -> list[dict]:
    """One trial in this process, with its usage.json, as `python -m mnist.run` trains a run; `threads`: this
    worker's share of the CPUs, where the trial's config leaves it to auto."""
    from omegaconf import OmegaConf

    from mnist import usage
    from mnist.train import train

    if threads and str(config["trainer"]["threads"]) == "auto":
        config["trainer"]["threads"] = threads
    with usage.recording(run_dir):
        return train(OmegaConf.create(config), run_dir, stop, epoch_end=reporter)


def main(argv=None) -> int:
    """A local worker: Ctrl-C or SIGTERM checkpoint the trial in progress and stop; the same command again
    (or any worker of the study) finishes it."""
    stopping.catch_early_signals()
    parser = argparse.ArgumentParser(prog="python -m mnist.search.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the search's sweep folder (it holds search.json)")
    parser.add_argument("--worker", default="local", help="this worker's name in the study")
    parser.add_argument("--threads", type=int, help="CPU threads a trial trains on (default: trainer.threads)")
    args = parser.parse_args(argv)
    stop, received = stopping.stop_on_signals()
    try:
        run_trials(args.folder, args.worker, lambda config, run_dir, reporter, claimed: train_here(
            config, run_dir, reporter, stop, args.threads))
    except stopping.StopRequested:
        why, code = stopping.stopped_by(received)
        print(f"\n{why}. The trial in progress keeps its checkpoint in {args.folder}; run the same search command "
              f"again to finish it and go on.", file=sys.stderr)
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
