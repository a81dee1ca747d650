#!/bin/bash
# The course's batch script for the MLP. From the repository root:  sbatch slurm/mlp.sh
# More overrides may follow:  sbatch slurm/mlp.sh trainer.epochs=1 data=fashion_mnist
# Generated from conf/resources/cpu.yaml (time_limits) and conf/model/mlp.yaml by `make slurm-scripts`.
#SBATCH --job-name=mlp
#SBATCH --time=0:5:0
#SBATCH --cpus-per-task=1
#SBATCH --mem=3G
#SBATCH --output=%x_%j.out
#SBATCH --error=%x_%j.err
#SBATCH --signal=B:USR2@90
#SBATCH --requeue
#SBATCH --open-mode=append

# sbatch runs this in the folder it was called from, which must be the repository root.
if [ ! -f mnist/run.py ]; then
    echo "error: run \`sbatch slurm/mlp.sh\` from the repository root (your mnist-slurm clone, the folder that holds mnist/ and .venv/), not from $PWD: cd there first." >&2
    exit 2
fi
source .venv/bin/activate

# 90 s before the time limit Slurm sends USR2: the run checkpoints where it is and exits 3,
# and the job requeues itself (same id, run folder outputs/%x_%j and log) to resume, 3 times at most.
python -u -m mnist.run model=mlp hydra.run.dir="outputs/${SLURM_JOB_NAME}_${SLURM_JOB_ID}" "$@" &
trap '[ "${SLURM_RESTART_COUNT:-0}" -lt 3 ] && kill -USR2 $!' USR2
wait $!; status=$?
if [ $status -gt 128 ]; then wait $!; status=$?; fi   # the trap woke us: wait for the run to stop
if [ $status -eq 3 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
exit $status
