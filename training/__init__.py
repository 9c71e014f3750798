"""Training library: datasets, models, the Langevin sampler, checkpoints and evaluation."""
