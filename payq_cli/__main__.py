"""``python -m payq_cli``: the ``payq`` command."""

import sys

from payq_cli import main

sys.exit(main())
