"""Recipes and `minima run`: validation, stamps, running, dry runs, memory estimates, reports."""
