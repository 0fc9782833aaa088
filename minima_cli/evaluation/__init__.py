"""The evaluation library behind `minima eval` (docs/stages.md, "eval"): task specs, perplexity,
multiple choice, generation and the lm-evaluation-harness bridge; the stage is
stages/evaluate.py."""
