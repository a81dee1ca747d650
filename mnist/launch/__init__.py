"""Where a run goes: `slurm` submits it through submitit (login node, no torch), `job` is
what runs on the compute node, `scripts` writes the course's plain sbatch scripts."""
