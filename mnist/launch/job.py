"""What submitit runs on the compute node: train(cfg, run_dir) on the config composed at submit.

Pickled on the login node, so this module must not import torch at import time.
"""
import os
import signal
import sys

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """A run: its resolved config (a plain dict) and its run folder, fixed at submit time.

    Near its time limit (or on preemption) Slurm sends USR2; submitit then calls `checkpoint()`
    (inherited), which requeues this same object: the run resumes from the folder's last
    checkpoint, in the same folder and the same log. Once `max_requeues` requeues are used up,
    the job ignores the signal and Slurm ends it at its limit, as TIMEOUT.
    """

    def __init__(self, config, run_dir, max_requeues):
        self.config = config
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues

    def __call__(self):
        from omegaconf import OmegaConf

        from mnist.train import train

        requeues = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if requeues >= self.max_requeues:
            signal.signal(signal.SIGUSR2, self._last_warning)
        return train(OmegaConf.create(self.config), self.run_dir)

    def _last_warning(self, signum, frame):
        print(f"Time limit near and no requeue left ({self.max_requeues} used): Slurm will stop this job. "
              f"Resume it later with: python -m mnist.run hydra.run.dir={self.run_dir}", file=sys.stderr, flush=True)
