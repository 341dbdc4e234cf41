"""Training internals: config, noise schedule from the dataset stats, EMA, checkpoints, metrics, loop."""
