"""`python -m vkeys`, the same as the `vkeys` console script."""

import sys

from vkeys.commands import main

sys.exit(main())
