"""Where a run goes, on the login node (no torch) but for `job`:

- `slurm`: checks a run or sweep and submits it through submitit, as one job or one job array;
- `resources`: conf/resources/ checked and turned into sbatch options, and what the cluster's nodes hold;
- `history`: resources=auto and runs_per_task=auto, from what past runs like this one used;
- `gateway`: the one door to Slurm's commands (squeue, sacct, sinfo, scontrol, scancel); their figures
  (times, memory, states) are read and written by mnist/figures.py;
- `record`: the record of submitted jobs (logs/jobs.jsonl) and Slurm's states for them;
- `outcome`: why each job ended and what it used, with the fix;
- `resubmit`: reruns what did not complete, as one array;
- `job`: what runs on the compute node (one run, or a packed task of several);
- `scripts`: writes the course's plain sbatch scripts (slurm/*.sh).
"""
