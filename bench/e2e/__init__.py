"""End-to-end invariance under continuous batching (``python -m bench.e2e``):
a small serving engine in each framework over a Llama-shaped model whose
weights are drawn from a seed, run with several random arrival schedules."""
