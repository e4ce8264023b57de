"""``python -m layerpipe.cli``: the ``layerpipe`` command."""

import sys

from . import main

sys.exit(main())
