import sys

from minima_cli.cli.app import main

sys.exit(main())
