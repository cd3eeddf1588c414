"""``python -m quotientopt`` runs the command line."""

import sys

from quotientopt.cli import main

sys.exit(main())
