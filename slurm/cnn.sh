#!/bin/bash
# The course's batch script for the CNN. From the repository root:  sbatch slurm/cnn.sh
# More overrides may follow:  sbatch slurm/cnn.sh trainer.epochs=1 data=fashion_mnist
# Generated from conf/model/cnn.yaml and conf/resources/cpu.yaml by `make slurm-scripts`.
#SBATCH --job-name=cnn
#SBATCH --time=0:15:0
#SBATCH --cpus-per-task=1
#SBATCH --mem=3G
#SBATCH --output=%x_%j.out
#SBATCH --error=%x_%j.err

source .venv/bin/activate
python -u -m mnist.run model=cnn "$@"
