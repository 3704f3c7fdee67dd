"""``python -m cluster.cli``: the same as the ``vismem`` command."""

import sys

from cluster.cli import main

sys.exit(main())
