"""minima: compress LLaMA-family language models by scoring, pruning and distilling."""

__version__ = "0.1.0"
