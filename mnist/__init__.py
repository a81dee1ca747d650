"""mnist-slurm: the course's MNIST MLP and CNN, trained locally or on a Slurm cluster."""
