"""``python -m medsilo`` runs the command line."""

import sys

from medsilo.cli import main

sys.exit(main())
