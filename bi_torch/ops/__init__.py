"""One module per op: kernel, launcher and nothing else."""
