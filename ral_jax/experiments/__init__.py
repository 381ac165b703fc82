"""Experiments built from the training loop: `python -m ral_jax.experiments.compare` (RAL vs GRPO at equal compute)."""
