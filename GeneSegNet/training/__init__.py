"""Training: configuration, batches, loop, recursive rounds and label refinement."""
