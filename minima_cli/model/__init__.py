"""LLaMA-family models: architecture access, checkpoints on disk, masks, scores and pruning."""
