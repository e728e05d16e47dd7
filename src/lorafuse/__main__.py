"""``python -m lorafuse`` runs the ``lorafuse`` command."""

import sys

from lorafuse.cli import main

sys.exit(main())
