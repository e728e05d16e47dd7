"""``python -m lorafuse`` runs the ``lorafuse`` command (with no arguments: its help)."""

import sys

from lorafuse.cli import main

sys.exit(main())
