"""The trainer: Hydra config, the training loop, optimizer/schedule, metrics."""
