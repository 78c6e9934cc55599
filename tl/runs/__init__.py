"""A run directory and what it holds: the lock, checkpoints and the Checkpointer, provenance, W&B, the pictures."""
