"""``python -m bench``: throughput and batch invariance of the bi_ kernels
against the framework defaults, for every op in the harness registry."""
