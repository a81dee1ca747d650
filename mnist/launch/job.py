"""What submitit runs on the compute node: train(cfg, run_dir) on the config composed at submit.

Pickled on the login node, so this module must not import torch at import time.
"""
import os
import signal
import sys
import time

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """A run: its resolved config (a plain dict) and its run folder, fixed at submit time.

    Near its time limit (or on preemption) Slurm sends USR2. Training then finishes its step,
    writes a checkpoint of exactly where it is, and hands over to submitit, which calls
    `checkpoint()` (inherited) and requeues this same object: the run resumes in the same folder
    and the same log. Once `max_requeues` are used up, the job ignores the signal and Slurm ends
    it at its limit, as TIMEOUT, with the last whole epoch's checkpoint in place.
    """

    def __init__(self, config, run_dir, max_requeues):
        self.config = config
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues

    def __call__(self):
        from mnist import usage

        with usage.recording(self.run_dir):  # the run's own record of what it used: usage.json
            return self._train()

    def _train(self):
        from omegaconf import OmegaConf

        from mnist import private_apis
        from mnist.stopping import REQUEUE_SIGNAL, StopFlag, StopRequested

        cfg = OmegaConf.create(self.config)
        if not cfg.trainer.compile:  # torch.optim would import torch._dynamo, as long as torch itself, for nothing
            private_apis.defer_dynamo()
        from mnist.train import train

        cfg.data.download = False  # jobs never download: compute nodes often have no internet
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # data-parallel: MASTER_ADDR, RANK, WORLD_SIZE... for torch
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        requeues = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if requeues >= self.max_requeues:
            signal.signal(REQUEUE_SIGNAL, self._last_warning)
            return train(cfg, self.run_dir)

        stop, submitit_handler = StopFlag(), signal.getsignal(REQUEUE_SIGNAL)
        signal.signal(REQUEUE_SIGNAL, lambda signum, frame: setattr(stop, "requested", True))
        try:
            return train(cfg, self.run_dir, stop)
        except StopRequested:
            if environment.global_rank != 0:  # rank 0 requeues the whole job, which ends this task too
                time.sleep(300)
                raise
            print(f"Checkpointed in {self.run_dir}; asking Slurm to requeue (requeue {requeues + 1} "
                  f"of at most {self.max_requeues})", flush=True)
            submitit_handler(REQUEUE_SIGNAL, None)  # submitit: checkpoint(), requeue, exit
            raise

    def _last_warning(self, signum, frame):
        print(f"Time limit near and no requeue left ({self.max_requeues} used): Slurm will stop this job. "
              f"Resume it later with: python -m mnist.run hydra.run.dir={self.run_dir}", file=sys.stderr, flush=True)
