"""``python -m nodemanager`` = the ``nodemanager`` command."""

import sys

from .cli import main

sys.exit(main())
