"""``python -m serve_unlearn.cli``: the ``serve-unlearn`` command without its console script."""

import sys

from . import main

sys.exit(main())
