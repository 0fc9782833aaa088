"""The training loop shared by distill and sft, its configuration and its checkpoints."""
