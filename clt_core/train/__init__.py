"""Training: config, loop, checkpoints, held-out evaluation, feature parallelism under torchrun."""
