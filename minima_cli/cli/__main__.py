"""`python -m minima_cli.cli`: the `minima` command."""

import sys

from minima_cli.cli.app import main

sys.exit(main())
