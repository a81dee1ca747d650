"""What submitit runs on the compute node: train(cfg, run_dir) on the config composed at submit.

A task of an array trains one run (TrainJob) or, packed (launcher.runs_per_task), several one after
another in one process (PackedJob), paying the imports and the data read once. Either way each run
has its own folder, lock, checkpoint, metrics and usage.json.

Pickled on the login node, so this module must not import torch at import time.
"""
import signal
import sys
import time
import traceback

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """A run: its resolved config (a plain dict) and its run folder, fixed at submit time.

    Near its time limit (or on preemption) Slurm sends USR2. Training then finishes its step,
    writes a checkpoint of exactly where it is, and hands over to submitit, which calls
    `checkpoint()` (inherited) and requeues this same object: the run resumes in the same folder
    and the same log. Once `max_requeues` are used up, the job ignores the signal and Slurm ends
    it at its limit, as TIMEOUT, with the last whole epoch's checkpoint in place.
    """

    def __init__(self, config, run_dir, max_requeues, epoch_end=None, worker=None):
        self.config = config
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues
        self.epoch_end = epoch_end  # train()'s: a search's trial reports each epoch and may be pruned
        self.worker = worker  # a search's worker (SearchWorker) that trains this run as one of its trials

    def __call__(self):
        results = train_runs([self])
        return results[0] if results else None

    def finished(self) -> bool:
        """Whether every epoch of the run is done (a requeued packed task skips it)."""
        from mnist import rundir

        return rundir.finished(self.run_dir, self.config)

    def train(self) -> object:
        from omegaconf import OmegaConf

        from mnist import private_apis
        from mnist.env import restarts
        from mnist.stopping import REQUEUE_SIGNAL, StopFlag, StopRequested, stop_on_terminate
        from mnist.train import train

        cfg = OmegaConf.create(self.config)
        cfg.data.download = False  # jobs never download: compute nodes often have no internet
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # data-parallel: MASTER_ADDR, RANK, WORLD_SIZE... for torch, replacing any
            # the submitting shell had set (sbatch passes its environment on); a MASTER_PORT set there is kept
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        worker = getattr(self, "worker", None)
        # (a worker's flag and SIGTERMs: one that came before this trial began counts, and is not a requeue)
        requeues = restarts()
        stop, terminated = (worker.stop, worker.terminated) if worker else (StopFlag(), [])
        before = stop_on_terminate(stop, terminated)  # Slurm ends the job: preempted (it requeues it), cancelled...
        submitit_handler = worker.requeue if worker else private_apis.submitit_requeue_handler()
        if requeues >= self.max_requeues:
            signal.signal(REQUEUE_SIGNAL, self._last_warning)
        else:
            signal.signal(REQUEUE_SIGNAL, lambda signum, frame: setattr(stop, "requested", True))
        between = worker.between_trials if worker else submitit_handler
        try:
            return train(cfg, self.run_dir, stop, epoch_end=getattr(self, "epoch_end", None))
        except StopRequested:
            if terminated:
                if environment.global_rank == 0:
                    print(f"Checkpointed in {self.run_dir}: Slurm is ending this job (preempted: it requeues it, "
                          f"and it resumes there; cancelled or out of time: the checkpoint stays)", flush=True)
                if worker:  # the trial is free for another worker now, not once Slurm's kill comes
                    worker.release()
                wait_for_kill()
            if environment.global_rank != 0:  # rank 0 requeues the whole job, which ends this task too
                time.sleep(300)
                raise
            print(f"Checkpointed in {self.run_dir}; asking Slurm to requeue (requeue {requeues + 1} "
                  f"of at most {self.max_requeues})", flush=True)
            submitit_handler(REQUEUE_SIGNAL, None)  # submitit: checkpoint(), requeue, exit
            raise
        finally:  # between the runs of a packed task, a signal requeues the task at once (a search's worker: it
            signal.signal(REQUEUE_SIGNAL, between)  # remembers it, and is requeued before its next trial)
            signal.signal(signal.SIGTERM, before)

    def _last_warning(self, signum, frame):
        worker = getattr(self, "worker", None)
        later = (f"python -m mnist.jobs resubmit {worker.folder}" if worker else
                 f"python -m mnist.run hydra.run.dir={self.run_dir}")
        print(f"Time limit near and no requeue left ({self.max_requeues} used): Slurm will stop this job. "
              f"Resume it later with: {later}", file=sys.stderr, flush=True)


TERMINATED_WAIT_S = 3600  # longer than any GraceTime or KillWait


def wait_for_kill() -> None:
    """Wait for Slurm's kill after its SIGTERM: a preempted job that ended itself within its GraceTime would count
    as ended, not be requeued. (An exit, not an error submitit would record as the job's result.)"""
    from mnist.stopping import TERMINATED_EXIT

    time.sleep(TERMINATED_WAIT_S)
    raise SystemExit(TERMINATED_EXIT) from None


class PackedJob(submitit.helpers.Checkpointable):
    """Several runs of a sweep (TrainJobs) as one array task, trained one after another in this process.

    Its time limit is the sum of theirs. Near it, the run in progress checkpoints and submitit requeues
    this object (`checkpoint()`, inherited); the new attempt skips the finished runs and resumes that one.
    """

    def __init__(self, jobs):
        self.jobs = list(jobs)

    def __call__(self):
        return train_runs(self.jobs)


class SearchWorker(submitit.helpers.Checkpointable):
    """A task of a search's array (mnist.search): trial after trial of the study in `folder`, each a TrainJob in
    its trial's folder, until the study has its n_trials. Near its time limit the trial in progress checkpoints
    and submitit requeues this worker, which then finishes that trial first (it is this worker's, and free);
    a warning that comes between two trials requeues it before it takes the next."""

    def __init__(self, folder, max_requeues):
        self.folder = str(folder)
        self.max_requeues = max_requeues

    def __call__(self):
        from mnist import private_apis
        from mnist.env import job_id
        from mnist.search.worker import run_trials
        from mnist.stopping import REQUEUE_SIGNAL, StopFlag, stop_on_terminate

        self.stop, self.claimed, self.terminated = StopFlag(), None, []
        self.requeue = private_apis.submitit_requeue_handler()  # (submitit's, before this worker's own)
        signal.signal(REQUEUE_SIGNAL, self.between_trials)
        stop_on_terminate(self.stop, self.terminated)  # (a trial's TrainJob passes Slurm's SIGTERM on to it)

        def train_one(config, run_dir, reporter, claimed):
            self.claimed = claimed
            config["data"]["download"] = False
            train_run(TrainJob(config, run_dir, self.max_requeues, epoch_end=reporter, worker=self))

        return run_trials(self.folder, job_id(), train_one, before_each=self.requeue_if_asked)

    def between_trials(self, signum, frame) -> None:
        self.stop.requested = True

    def __getstate__(self):  # what submitit pickles, at submit and at a requeue: not this attempt's flag and trial
        return {"folder": self.folder, "max_requeues": self.max_requeues}

    def requeue_if_asked(self) -> None:
        """Before the next trial: a time-limit warning that came meanwhile requeues this worker now."""
        from mnist.env import restarts
        from mnist.stopping import REQUEUE_SIGNAL

        if self.terminated:  # Slurm is ending this job (cancelled, preempted): no next trial; wait for its kill
            print("Slurm is ending this worker: it takes no other trial", flush=True)
            wait_for_kill()
        if self.stop.requested and restarts() < self.max_requeues:
            print(f"Time limit near: asking Slurm to requeue this worker before its next trial (requeue "
                  f"{restarts() + 1} of at most {self.max_requeues})", flush=True)
            self.requeue(REQUEUE_SIGNAL, None)  # submitit: checkpoint(), requeue, exit
        self.stop.requested = False

    def release(self) -> None:
        """Let go of the trial in progress (checkpointed; this process waits for Slurm's kill)."""
        if self.claimed is not None:
            self.claimed.release()


def train_run(job, task=None) -> object:
    """One run of a task, with its usage.json (`task`: its place in a packed task)."""
    from mnist import usage

    with usage.recording(job.run_dir, task):  # the run's own record of what it used: usage.json
        return job.train()


def train_runs(jobs) -> list[list[dict]]:
    """Train each job's run in turn; a packed task announces each run by one line naming its folder, and
    a run that fails does not stop the others (the task then fails, naming it). Returns their results."""
    from mnist import private_apis, rundir, usage
    from mnist.stopping import REQUEUE_SIGNAL, StopRequested

    if not any(job.config["trainer"]["compile"] for job in jobs):
        private_apis.defer_dynamo()  # torch.optim imports torch._dynamo (as long as torch itself) for nothing
    import mnist.train  # noqa: F401  the start-up, paid once per task

    startup_s = round(time.time() - usage.process_started(), 3)
    packed, results, failed = len(jobs) > 1, [], []
    for index, job in enumerate(jobs):
        if job.finished():  # (a requeued task's finished runs; a run finished since it was submitted): no attempt
            print(f"Run {index + 1} of {len(jobs)} in this task: {job.run_dir} (done; skipped)" if packed else
                  rundir.nothing_left(job.run_dir, job.config["trainer"]["epochs"], job.config["trainer"]["epochs"]),
                  flush=True)
            continue
        if packed:
            print(f"Run {index + 1} of {len(jobs)} in this task: {job.run_dir}", flush=True)
        task = {"index": index, "runs": len(jobs), "startup_s": startup_s, "started": time.time()}
        try:
            results.append(train_run(job, task))
        except (StopRequested, KeyboardInterrupt):
            raise
        except Exception:
            if not packed:
                raise
            traceback.print_exc()
            failed.append(job.run_dir)
    signal.signal(REQUEUE_SIGNAL, signal.SIG_IGN)  # all trained: a late time-limit warning must not requeue or kill it
    if failed:
        raise RuntimeError(f"{len(failed)} of the {len(jobs)} runs of this task failed (see above): "
                           f"{', '.join(failed)}. "
                           f"The others are done; resubmit the failed ones.")
    return results
