"""``python -m layerpipe``: the ``layerpipe`` command."""

import sys

from .cli import main

sys.exit(main())
