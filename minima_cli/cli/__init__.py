"""The `minima` command line (see app.py): `minima_cli.cli:main` is the console entry point."""

from minima_cli.cli.app import app, main

__all__ = ["app", "main"]
