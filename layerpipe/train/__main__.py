"""``python -m layerpipe.train`` and ``torchrun ... -m layerpipe.train``."""

import sys

from .command import main

sys.exit(main())
