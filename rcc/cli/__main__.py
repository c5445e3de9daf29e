"""``python -m rcc.cli ...``: the ``rcc`` command."""

import sys

from rcc.cli.commands import main

sys.exit(main())
